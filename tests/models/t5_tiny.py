"""Small random transformers T5ForConditionalGeneration checkpoints written with save_pretrained:
what the T5 tests load and compare against (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

VOCAB = 97
SCALE = 0.25  # the weights' std


def make(path: Path, *, ff: str = "relu", tied: bool = True, seed: int = 0, scale: float = SCALE, bias_scale: float = 2.0,
         **kw) -> torch.nn.Module:
    """A random T5ForConditionalGeneration saved to ``path`` (fp32, eval mode): head dim 8,
    d_model 32 with inner 48 (num_heads * d_kv != d_model, as in T5 v1.1), two encoder and
    three decoder layers, an odd d_ff, 8 buckets over distance 20 (the test prompts reach the
    logarithmic buckets and the last one), no dropout.

    tied=False writes a T5 v1.1 / FLAN-T5 style checkpoint: config tie_word_embeddings false
    (no output scaling) and a separate lm_head.weight (transformers 5 itself would save the
    head tied; the file is rewritten as those checkpoints are)."""
    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=6, d_ff=40, num_layers=2, num_decoder_layers=3,
                relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
                feed_forward_proj=ff, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    cfg = transformers.T5Config(**{**base, **kw}, tie_word_embeddings=tied)
    cfg._attn_implementation = "eager"
    model = transformers.T5ForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "relative_attention_bias" in name:  # large enough to move attention: a misplaced bucket shows
                p.copy_(bias_scale * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    if not tied:
        model.lm_head.weight = torch.nn.Parameter(scale * torch.randn(VOCAB, cfg.d_model, generator=g))
    model.save_pretrained(path)
    if not tied:
        from safetensors.torch import load_file, save_file

        weights = load_file(str(path / "model.safetensors"))
        weights["lm_head.weight"] = model.lm_head.weight.detach().clone()
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((path / "config.json").read_text())
        config.pop("scale_decoder_outputs", None)
        config["tie_word_embeddings"] = False
        (path / "config.json").write_text(json.dumps(config))
        model = transformers.T5ForConditionalGeneration.from_pretrained(path)
        assert model.lm_head.weight is not model.shared.weight and not model.config.scale_decoder_outputs
        model.config._attn_implementation = "eager"
    return model.eval()


def batch(lengths: list[int], seed: int = 0, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (int64) of a right-padded batch; the padding ids are
    random real ids (a model that reads them shows it)."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.randint(2, vocab, (len(lengths), S), generator=g)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask
