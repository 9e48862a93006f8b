"""Small random transformers GPT-2 / GPT-Neo models written with save_pretrained, and a tiny
byte-level BPE tokenizer trained here: what the GPT-2 and generation tests load and compare
against (no network)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import transformers

VOCAB = 97
POSITIONS = 64


def config(family: str = "gpt2", **kw) -> transformers.PretrainedConfig:
    """Head dim 16, two layers, an odd MLP width, no dropout, no eos token; GPT-Neo with one global and one
    local layer whose window (5) is shorter than the test prompts."""
    if family == "gpt2":
        base = dict(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=64, n_layer=2, n_head=4, n_inner=80,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
        cfg = transformers.GPT2Config(**{**base, **kw})
    else:
        base = dict(vocab_size=VOCAB, max_position_embeddings=POSITIONS, hidden_size=64, num_layers=2, num_heads=4,
                    intermediate_size=80, attention_types=[[["global", "local"], 1]], window_size=5,
                    embed_dropout=0.0, resid_dropout=0.0, attention_dropout=0.0, bos_token_id=None, eos_token_id=None)
        cfg = transformers.GPTNeoConfig(**{**base, **kw})
    cfg._attn_implementation = "eager"
    return cfg


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from the 0.02 init (whose near-uniform attention would hide a wrongly masked
    key), the norms' weights near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def make(path: Path, family: str = "gpt2", *, seed: int = 0, **kw) -> torch.nn.Module:
    """A random *ForCausalLM saved to ``path``, returned fp32 in eval mode."""
    torch.manual_seed(seed)
    cls = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.GPTNeoForCausalLM
    model = cls(config(family, **kw))
    randomize(model, seed)
    model.save_pretrained(path)
    return model.eval()


def prompts(lengths: list[int], side: str = "left", seed: int = 0, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (int64) of a batch padded on ``side``; padding ids are
    random too (a model that reads them shows it)."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.randint(2, vocab, (len(lengths), S), generator=g)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, S - n:] = 1
        else:
            mask[i, :n] = 1
    return ids, mask


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """The position_ids transformers' generate gives a padded batch."""
    return (mask.cumsum(1) - 1).clamp(min=0)


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a small model that generated text.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9: bytes split across tokens, \u00fcber and \u2603.",
    "Hello world! Hello fastarch. Stop here, or go on and on.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tokenizer(path: Path) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (the 256 bytes, merges up to 300 tokens, <|endoftext|> its eos)
    with a chat template, saved to ``path``: a model for it needs vocab_size=len(tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


@contextlib.contextmanager
def one_thread():
    """Tiny matmuls on one thread: OpenMP's hand-off costs milliseconds per op on a shared
    machine (measured 50x slower generation with 2 threads under load), far more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
