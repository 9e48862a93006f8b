"""Small random transformers models of each encoder family, written with save_pretrained: what
the model tests load and compare against (no network)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

# one small config per family: head dim 16, two layers, an odd intermediate size, and a
# position table the tests can overflow
CONFIGS = {
    "bert": (transformers.BertConfig, dict(
        vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=40, type_vocab_size=2)),
    "roberta": (transformers.RobertaConfig, dict(
        vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=40, type_vocab_size=1, pad_token_id=1)),
    "distilbert": (transformers.DistilBertConfig, dict(
        vocab_size=101, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_position_embeddings=40)),
}
MASKED_LM = {"bert": transformers.BertForMaskedLM, "roberta": transformers.RobertaForMaskedLM,
             "distilbert": transformers.DistilBertForMaskedLM}
BASE = {"bert": transformers.BertModel, "roberta": transformers.RobertaModel, "distilbert": transformers.DistilBertModel}
NO_DROPOUT = {
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "roberta": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "distilbert": dict(dropout=0.0, attention_dropout=0.0),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn afresh, large enough that attention is far from uniform (the
    default 0.02 init gives near-equal scores, which would hide a wrongly masked key) and the
    norms' weights and biases matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def make(family: str, path: Path, *, head: str = "mlm", seed: int = 0, **config) -> torch.nn.Module:
    """A random transformers model of ``family`` (head "mlm": *ForMaskedLM, "base": *Model),
    saved to ``path``; returned in eval mode, fp32."""
    torch.manual_seed(seed)
    config_class, defaults = CONFIGS[family]
    cfg = config_class(**{**defaults, **NO_DROPOUT[family], **config})
    cfg._attn_implementation = "eager"
    model = (MASKED_LM if head == "mlm" else BASE)[family](cfg)
    randomize(model, seed)
    model.save_pretrained(path)
    return model.eval()


def batch(family: str, lengths: list[int], seqlen: int, vocab: int = 101, seed: int = 0):
    """input_ids, attention_mask (int64 0/1) and token_type_ids of a right-padded batch: row i
    holds lengths[i] real tokens (a length 0 row is all padding), padding positions the
    family's padding id."""
    g = torch.Generator().manual_seed(seed)
    pad = 1 if family == "roberta" else 0
    ids = torch.randint(3, vocab, (len(lengths), seqlen), generator=g)
    mask = (torch.arange(seqlen) < torch.tensor(lengths).unsqueeze(1)).long()
    ids = ids.masked_fill(mask == 0, pad)
    types = torch.randint(0, 2 if family == "bert" else 1, ids.shape, generator=g) * mask
    return ids, mask, types
