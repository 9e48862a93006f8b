"""DistilBERT on fastarch's kernels, loaded from Hugging Face checkpoints.

    model = DistilBert.from_pretrained("path/to/distilbert")
    out = model(input_ids, attention_mask)          # out.last_hidden_state (B, S, dim); no pooler
    mlm = model.masked_lm(input_ids, attention_mask, labels=labels)

BERT's post-LN encoder (the block is bert.EncoderLayer, on packed tokens) with word and
position embeddings only (no token types), LayerNorm eps 1e-12 throughout, and a masked-LM head
(vocab_transform, activation, vocab_layer_norm, vocab_projector tied to the word embeddings).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastarch import ops
from fastarch.models.bert import (
    EncoderLayer,
    EncoderOutput,
    MaskedLMHead,
    MaskedLMOutput,
    build_from_checkpoint,
    check_input_ids,
    check_like,
    gelu_approximation,
    init_random,
    masked_lm_output,
)
from fastarch.models.loading import CheckpointError, read_config
from fastarch.models.packing import Packing, pack, unpack, unpad

EPS = 1e-12  # transformers' DistilBERT fixes every LayerNorm's eps


@dataclass(frozen=True)
class DistilBertConfig:
    """Every hyperparameter DistilBERT reads from config.json (defaults: transformers')."""

    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 6
    n_heads: int = 12
    hidden_dim: int = 3072
    activation: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False  # the table is then fixed (stored in the checkpoint; not trained)
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = True

    @property
    def max_seqlen(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> DistilBertConfig:
        if d.get("model_type") != "distilbert":
            raise CheckpointError(f"{where}: model_type {d.get('model_type')!r} is not DistilBERT")
        fields = {f: d[f] for f in cls.__dataclass_fields__ if f in d and (d[f] is not None or f == "pad_token_id")}
        config = cls(**fields)
        gelu_approximation(config.activation, f"{where} activation")
        if config.dim % config.n_heads:
            raise CheckpointError(f"{where}: dim {config.dim} is not a multiple of n_heads {config.n_heads}")
        return config


class DistilBert(nn.Module):
    """DistilBERT: word + position embeddings, LayerNorm, post-LN encoder layers, an optional
    masked-LM head tied to the word embeddings."""

    model_type = "distilbert"
    encoder_prefix = "distilbert."
    takes_token_type_ids = False

    def __init__(self, config: DistilBertConfig, *, pooler: bool = False, mlm_head: bool = True):
        super().__init__()
        if pooler:
            raise ValueError("DistilBERT has no pooler")
        self.config = c = config
        approximate = gelu_approximation(c.activation, "activation")
        self.word_embeddings = nn.Embedding(c.vocab_size, c.dim, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.dim)
        self.position_embeddings.weight.requires_grad_(not c.sinusoidal_pos_embds)
        self.embedding_norm = nn.LayerNorm(c.dim, eps=EPS)
        self.layers = nn.ModuleList(
            EncoderLayer(c.dim, c.n_heads, c.hidden_dim, approximate, EPS, c.attention_dropout, c.dropout)
            for _ in range(c.n_layers)
        )
        self.pooler = None
        self.mlm = MaskedLMHead(c.dim, c.vocab_size, approximate, EPS, c.tie_word_embeddings) if mlm_head else None

    def encode_packed(self, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Packing]:
        """The last hidden states of the real tokens, packed: (total, dim), and the Packing."""
        c = self.config
        check_input_ids(input_ids, c.vocab_size, c.max_seqlen)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        check_like(attention_mask, "attention_mask", input_ids)
        packing = unpad(attention_mask)
        ids = pack(input_ids, packing)
        positions = packing.indices % input_ids.shape[1]  # 0 .. S-1 over the padded row, as transformers
        x = F.embedding(ids, self.word_embeddings.weight, padding_idx=c.pad_token_id) + F.embedding(
            positions, self.position_embeddings.weight
        )
        x = ops.layer_norm(x, self.embedding_norm.weight, self.embedding_norm.bias, EPS)
        x = F.dropout(x, c.dropout, self.training)
        for layer in self.layers:
            x = layer(x, packing)
        return x, packing

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> EncoderOutput:
        """input_ids: (B, S) int64/int32; attention_mask: (B, S) bool or 0/1 (default: every
        token real). Returns last_hidden_state (B, S, dim), zeros at padding positions, and
        pooler_output None."""
        x, packing = self.encode_packed(input_ids, attention_mask)
        return EncoderOutput(unpack(x, packing), None)

    def masked_lm(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> MaskedLMOutput:
        """Masked-LM logits (B, S, vocab), zeros at padding; with labels (B, S) (-100 = none)
        the mean cross-entropy over the labelled real tokens."""
        if self.mlm is None:
            raise RuntimeError("this DistilBert has no masked-LM head (its checkpoint held none)")
        x, packing = self.encode_packed(input_ids, attention_mask)
        return masked_lm_output(self, x, packing, input_ids, labels)

    @classmethod
    def random(
        cls,
        config: dict | DistilBertConfig | None = None,
        *,
        seed: int = 0,
        mlm_head: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> DistilBert:
        """A randomly initialized model (see bert.Bert.random); None gives distilbert-base."""
        if not isinstance(config, DistilBertConfig):
            config = DistilBertConfig.from_dict({"model_type": "distilbert", **(config or {})}, "config")
        return init_random(cls(config, mlm_head=mlm_head), seed, dtype, device)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> DistilBert:
        """The model of a transformers DistilBertModel / DistilBertForMaskedLM checkpoint
        directory; the masked-LM head is built when the checkpoint holds it. In eval mode, fp32
        unless ``dtype``, on the CPU unless ``device``."""
        config = DistilBertConfig.from_dict(read_config(path), f"{path}/config.json")
        decoder = None if config.tie_word_embeddings else "mlm.decoder"  # tied: the word embeddings
        head_names = [
            (r"vocab_transform\.(weight|bias)", r"mlm.dense.\1"),
            (r"vocab_layer_norm\.(weight|bias)", r"mlm.norm.\1"),
            (r"vocab_projector\.bias", "mlm.bias"),
            (r"vocab_projector\.weight", decoder),
        ]
        return build_from_checkpoint(cls, config, path, ENCODER_NAMES, cls.encoder_prefix, lambda names: head_names,
                                     dtype=dtype, device=device, parts=("q_lin", "k_lin", "v_lin"))


# transformers' DistilBertModel tensor names -> ours ("{q_lin,k_lin,v_lin}": stacked by
# bert.fuse_projections)
ENCODER_NAMES: list[tuple[str, str | None]] = [
    (r"embeddings\.word_embeddings\.weight", "word_embeddings.weight"),
    (r"embeddings\.position_embeddings\.weight", "position_embeddings.weight"),
    (r"embeddings\.LayerNorm\.(weight|bias)", r"embedding_norm.\1"),
    (r"embeddings\.position_ids", None),  # a buffer of 0 .. max_position_embeddings - 1
    (r"transformer\.layer\.(\d+)\.attention\.\{q_lin,k_lin,v_lin\}\.(weight|bias)", r"layers.\1.qkv.\2"),
    (r"transformer\.layer\.(\d+)\.attention\.out_lin\.(weight|bias)", r"layers.\1.out.\2"),
    (r"transformer\.layer\.(\d+)\.sa_layer_norm\.(weight|bias)", r"layers.\1.attn_norm.\2"),
    (r"transformer\.layer\.(\d+)\.ffn\.lin1\.(weight|bias)", r"layers.\1.up.\2"),
    (r"transformer\.layer\.(\d+)\.ffn\.lin2\.(weight|bias)", r"layers.\1.down.\2"),
    (r"transformer\.layer\.(\d+)\.output_layer_norm\.(weight|bias)", r"layers.\1.mlp_norm.\2"),
]
