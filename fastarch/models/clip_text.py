"""CLIP's text tower (Radford et al., 2021) on fastarch's kernels, from Hugging Face checkpoints
of ``CLIPTextModel`` and ``CLIPTextModelWithProjection`` (model_type "clip_text_model") and of
a whole ``CLIPModel`` (model_type "clip"): of that one only the text tower and its projection
are built; the vision tower is not, and its tensors (vision_model.*, visual_projection.*) and
logit_scale are skipped by name.

    model = CLIPText.from_pretrained("openai/clip-vit-base-patch32")
    batch = tokenizer(texts, padding=True, return_tensors="pt")     # CLIP's tokenizer pads on the right
    text_embeds = model(batch["input_ids"], batch["attention_mask"]).text_embeds

Token and position embeddings, then pre-LN transformer blocks with causal self-attention, a
final LayerNorm, the state of each text's end-of-text token (pooler_output) and its linear
projection (text_embeds). The padding of a batch never reaches a matmul, a norm or the
attention: the real tokens are packed into one (tokens, hidden) sequence, and
fastarch.ops.attention runs causal attention over each text's stretch of it (cu_seqlens), which
is exactly what CLIP's causal mask plus its padding mask compute for the real tokens. Every
residual add is fused into the LayerNorm after it (fastarch.ops.add_layer_norm).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastarch import ops
from fastarch.models.layers import LayerNorm
from fastarch.nn import Linear  # nn.Linear on fastarch.ops.linear
from fastarch.models.loading import CheckpointError, load_into, read_config, read_weights

# transformers' hidden_act name -> bias_gelu's approximate; "quick_gelu" is computed apart (MLP)
_GELU_FORMS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
_ACTIVATIONS = ("quick_gelu", *_GELU_FORMS)


@dataclass(frozen=True)
class CLIPTextConfig:
    """Every hyperparameter the model reads from config.json (of a CLIPModel: its text_config,
    and the top-level projection_dim). Defaults: transformers' CLIPTextConfig."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    # The pooled token. 2 is the value configs had before transformers fixed it (its PR 24773):
    # such models pool the highest token id of each text (the end-of-text token is the
    # vocabulary's last); any other value: the first occurrence of this id.
    eos_token_id: int = 49407
    projection_dim: int = 512  # text_projection's output (used when the checkpoint holds one)

    @classmethod
    def from_dict(cls, config: dict) -> CLIPTextConfig:
        model_type = config.get("model_type")
        if model_type == "clip":
            text = {**(config.get("text_config") or {}), **(config.get("text_config_dict") or {})}
            if "projection_dim" in config:  # CLIPModel's text_projection is sized by the top level
                text["projection_dim"] = config["projection_dim"]
        elif model_type == "clip_text_model":
            text = config
        else:
            raise CheckpointError(f"config.json: model_type {model_type!r} is neither 'clip_text_model' nor 'clip'")
        c = cls(**{k: text[k] for k in cls.__dataclass_fields__ if k in text and text[k] is not None})
        if c.hidden_act not in _ACTIVATIONS:
            raise CheckpointError(f"config.json: hidden_act {c.hidden_act!r} is not built (one of {list(_ACTIVATIONS)})")
        if isinstance(c.eos_token_id, bool) or not isinstance(c.eos_token_id, int):
            raise CheckpointError(f"config.json: eos_token_id must be one int (the pooled token), got {c.eos_token_id!r}")
        if c.hidden_size % c.num_attention_heads:
            raise CheckpointError(
                f"config.json: hidden_size {c.hidden_size} is not a multiple of num_attention_heads {c.num_attention_heads}"
            )
        return c


class CLIPTextOutput(NamedTuple):
    text_embeds: Tensor | None  # (B, projection_dim); None when the checkpoint has no text_projection
    last_hidden_state: Tensor  # (B, S, hidden_size) after the final LayerNorm; zeros at padding positions
    pooler_output: Tensor  # (B, hidden_size): last_hidden_state at each text's end-of-text token


# ----------------------------------------------------------------------------- packing


class Packing(NamedTuple):
    """Where the real tokens of a padded (B, S) batch lie once packed into one sequence."""

    index: Tensor | None  # (T,) int64: flat positions b * S + s of the real tokens, row by row; None: all real
    cu_seqlens: Tensor  # (B + 1,) int32: text b is packed rows cu_seqlens[b] : cu_seqlens[b + 1]
    max_seqlen: int  # a bound on the texts' lengths: S (no host wait to find the longest)


def pack(attention_mask: Tensor | None, batch: int, length: int, device: torch.device) -> Packing:
    """attention_mask: (B, S), nonzero = a real token, or None (every token real).

    Packing rather than a (B, S) batch with key_padding_mask: the projections, norms and MLPs
    then skip the padding (CLIP batches mix short captions with long ones), and a padding
    query never exists, so no row of the attention sees no key."""
    if attention_mask is None:
        cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
        return Packing(None, cu, length)
    real = attention_mask.bool()
    cu = F.pad(real.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    return Packing(real.flatten().nonzero().squeeze(1), cu, length)


def unpack(x: Tensor, packing: Packing, batch: int, length: int) -> Tensor:
    """(T, D) packed rows -> (B, S, D), zeros at the padding."""
    if packing.index is None:
        return x.view(batch, length, -1)
    return x.new_zeros(batch * length, x.shape[-1]).index_copy(0, packing.index, x).view(batch, length, -1)


# ----------------------------------------------------------------------------- the model


class CausalSelfAttention(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.q = Linear(c.hidden_size, c.hidden_size)
        self.k = Linear(c.hidden_size, c.hidden_size)
        self.v = Linear(c.hidden_size, c.hidden_size)
        self.out = Linear(c.hidden_size, c.hidden_size)
        self.dropout_p = c.attention_dropout

    def forward(self, x: Tensor, packing: Packing) -> Tensor:
        """x: (T, D) packed tokens."""
        T, D = x.shape
        q, k, v = (proj(x).view(T, self.heads, -1) for proj in (self.q, self.k, self.v))
        y = ops.attention(
            q, k, v, causal=True, cu_seqlens_q=packing.cu_seqlens, cu_seqlens_k=packing.cu_seqlens,
            max_seqlen_q=packing.max_seqlen, max_seqlen_k=packing.max_seqlen,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        return self.out(y.reshape(T, D))


class MLP(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.fc1 = Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = Linear(c.intermediate_size, c.hidden_size)
        self.act = c.hidden_act

    def forward(self, x: Tensor) -> Tensor:
        if self.act == "quick_gelu":
            # x * sigmoid(1.702 x), the GELU approximation OpenAI trained CLIP with. bias_gelu
            # computes the erf or tanh GELU, which differ from it by up to ~0.02: the model
            # would not be the trained one. Plain torch ops; torch.compile fuses them.
            h = self.fc1(x)
            h = h * torch.sigmoid(1.702 * h)
        else:  # fc1's bias goes into the fused bias + GELU rather than into the matmul
            h = ops.bias_gelu(ops.linear(x, self.fc1.weight), self.fc1.bias, _GELU_FORMS[self.act])
        return self.fc2(h)


class Block(nn.Module):
    """A pre-LN block that carries the residual stream beside the last sublayer's output, so
    each residual add is fused into the LayerNorm after it (the next block's norm1, or the
    final norm): forward(x, residual, packing) -> (mlp output, residual before it is added)."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.norm1 = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.attn = CausalSelfAttention(c)
        self.norm2 = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: Tensor, residual: Tensor | None, packing: Packing) -> tuple[Tensor, Tensor]:
        if residual is None:  # the first block: x is the embeddings, nothing to add yet
            h, residual = self.norm1(x), x
        else:
            h, residual = self.norm1.add(x, residual)
        h, residual = self.norm2.add(self.attn(h, packing), residual)
        return self.mlp(h), residual


class CLIPText(nn.Module):
    """CLIPTextModel / CLIPTextModelWithProjection / CLIPModel's text tower:
    forward(input_ids, attention_mask=None) -> CLIPTextOutput."""

    def __init__(self, config: CLIPTextConfig, *, projection: bool = True):
        super().__init__()
        c = self.config = config
        self.tok_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.pos_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.final_norm = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.text_projection = Linear(c.hidden_size, c.projection_dim, bias=False) if projection else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> CLIPTextOutput:
        """input_ids: (B, S) integer token ids; attention_mask: (B, S), 1/True for a real token
        and 0/False for padding, or None (no padding).

        As in transformers, a token's position is its index in its padded row (left padding
        shifts the positions; CLIP's tokenizer pads on the right) and a token sees the real
        tokens up to itself. The pooled token is chosen among the real tokens; where
        transformers would pool a padding position (left padding that uses the end-of-text id
        as its pad, as CLIP's tokenizer does) this pools the text's own end-of-text token. A
        row without real tokens gets zeros."""
        B, S = self._check(input_ids, attention_mask)
        packing = pack(attention_mask, B, S, input_ids.device)
        ids, positions = input_ids.flatten(), torch.arange(S, device=input_ids.device).repeat(B)
        if packing.index is not None:
            ids, positions = ids[packing.index], positions[packing.index]
        self._check_vocabulary(ids)

        x, residual = self.tok_embedding(ids) + self.pos_embedding(positions), None  # (T, D)
        for block in self.blocks:
            x, residual = block(x, residual, packing)
        x = self.final_norm(x) if residual is None else self.final_norm.add(x, residual)[0]
        hidden = unpack(x, packing, B, S)

        pooled = hidden[torch.arange(B, device=hidden.device), self._pooled_positions(input_ids, attention_mask)]
        text_embeds = self.text_projection(pooled) if self.text_projection is not None else None
        return CLIPTextOutput(text_embeds, hidden, pooled)

    def _pooled_positions(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """(B,) the index in each row of the token whose state is pooled (transformers' rule,
        among the real tokens)."""
        real = attention_mask.bool() if attention_mask is not None else None
        if self.config.eos_token_id == 2:  # the highest id (argmax gives the first on ties)
            ids = input_ids if real is None else input_ids.masked_fill(~real, -1)
            return ids.argmax(dim=-1)
        is_eos = input_ids == self.config.eos_token_id
        if real is not None:
            is_eos = is_eos & real
        return is_eos.int().argmax(dim=-1)  # the first end-of-text token; none: position 0

    def _check(self, input_ids: object, attention_mask: object) -> tuple[int, int]:
        if not isinstance(input_ids, Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
            raise TypeError(f"CLIPText: input_ids must be an integer tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"CLIPText: input_ids must have shape (batch, length) with both > 0, got {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        if S > self.config.max_position_embeddings:
            raise ValueError(
                f"CLIPText: input_ids holds sequences of {S} tokens, longer than the {self.config.max_position_embeddings}"
                " positions of the checkpoint (max_position_embeddings): truncate them when tokenizing"
            )
        device = self.tok_embedding.weight.device
        if input_ids.device != device:
            raise ValueError(f"CLIPText: input_ids is on {input_ids.device}, the model on {device}")
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor):
                raise TypeError(f"CLIPText: attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
            if tuple(attention_mask.shape) != (B, S):
                raise ValueError(
                    f"CLIPText: attention_mask must have input_ids' shape {(B, S)}, got {tuple(attention_mask.shape)}"
                )
            if attention_mask.device != device:
                raise ValueError(f"CLIPText: attention_mask is on {attention_mask.device}, the model on {device}")
        return B, S

    def _check_vocabulary(self, ids: Tensor) -> None:
        """ids (the real tokens) within the vocabulary. Out of range they would index out of the
        embedding table (on a GPU a device assert that ruins the CUDA context): an error on the
        CPU; on a GPU an asynchronous assert, so the host does not wait."""
        vocab = self.config.vocab_size
        ok = (ids >= 0).all() & (ids < vocab).all()
        if ids.device.type == "cpu" and not torch.compiler.is_compiling():
            if not ok:
                bad = ids[(ids < 0) | (ids >= vocab)][0].item()
                raise ValueError(f"CLIPText: input_ids holds token id {bad}, outside the vocabulary 0 .. {vocab - 1}")
        else:
            torch._assert_async(ok, f"CLIPText: input_ids holds a token id outside the vocabulary 0 .. {vocab - 1}")

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> CLIPText:
        """The text tower of a CLIPTextModel, CLIPTextModelWithProjection or CLIPModel
        checkpoint directory, in eval mode; with text_projection when the checkpoint holds it."""
        raw = read_config(path)
        config = CLIPTextConfig.from_dict(raw)
        weights = read_weights(path)
        skipped = _SKIPPED_OF_CLIP_MODEL if raw.get("model_type") == "clip" else ()
        model = cls(config, projection="text_projection.weight" in weights)

        def name_of(checkpoint_name: str) -> str | None:
            if checkpoint_name.startswith(skipped):
                return None
            return _model_name(checkpoint_name)

        return load_into(model, weights, name_of, dtype=dtype, device=device)


# A CLIPModel's tensors that belong to the vision tower (not built) or to the image-text logits.
_SKIPPED_OF_CLIP_MODEL = ("vision_model.", "visual_projection.", "logit_scale")

# checkpoint name (without the "text_model." of CLIPTextModelWithProjection and CLIPModel) -> model name
_NAMES = [
    (r"embeddings\.token_embedding\.weight", "tok_embedding.weight"),
    (r"embeddings\.position_embedding\.weight", "pos_embedding.weight"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"blocks.\1.attn.q.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"blocks.\1.attn.k.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"blocks.\1.attn.v.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.out.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"final_layer_norm\.(weight|bias)", r"final_norm.\1"),
    (r"text_projection\.weight", "text_projection.weight"),
]


def _model_name(checkpoint_name: str) -> str | None:
    """The model's name for a checkpoint tensor; None for the position ids older checkpoints
    saved (a constant arange); a name no rule knows comes back unchanged, so load_into reports
    it as a tensor the model has no place for."""
    name = checkpoint_name.removeprefix("text_model.")
    if name == "embeddings.position_ids":
        return None
    for pattern, target in _NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    return checkpoint_name


__all__ = ["CLIPText", "CLIPTextConfig", "CLIPTextOutput"]
