"""GPT-2 on fastarch's kernels, and GPT-Neo (GPT-2 with GPT-3's alternating local attention).

    model = GPT2.from_pretrained("path/to/gpt2")            # a transformers checkpoint
    logits = model(input_ids, attention_mask)                # (B, S, vocab)
    ids = fastarch.models.generate.generate(model, input_ids, attention_mask, max_new_tokens=20)

Pre-LN blocks with learned positions: x + attn(ln_1(x)), then x + mlp(ln_2(x)), a final
ln_f, and the LM head tied to the token embeddings. The residual adds are fused into the next
norm (fastarch.ops.add_layer_norm), the MLP's bias into its GELU (fastarch.ops.bias_gelu).
Attention runs on the packed real tokens of a padded batch (fastarch.ops.attention with
cu_seqlens, causal): nothing is computed on padding, and each row's positions count its own
real tokens from 0, as transformers' generate does (the cumsum of the attention mask). A
"local" layer sees only the window_size most recent tokens (itself included): GPT-Neo's
attention_types, or for model_type gpt2 the fastarch keys "attention_layers" (one "global" or
"local" per layer) and "window_size" in config.json.

The model follows the decoder protocol of fastarch/models/generate.py (new_cache, forward with a
cache, last_only).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastarch import ops
from fastarch.nn import Linear  # nn.Linear on fastarch.ops.linear: a decode step's weights streamed once
from fastarch.models.generate import CausalLM, KVCache, PackedPrompts
from fastarch.models.loading import (
    CheckpointError, check_sizes, load_into, read_config, read_weights, untie_stored_head, without_random_init,
)

# transformers' activation names -> bias_gelu's approximate
_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


@dataclass
class GPT2Config:
    """The hyperparameters, under GPT-2's config.json names (GPT-Neo's are translated)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True  # scores / sqrt(head_dim); GPT-Neo does not scale
    scale_attn_by_inverse_layer_idx: bool = False  # and / (layer + 1)
    tie_word_embeddings: bool = True
    embd_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    attention_layers: list[str] = field(default_factory=list)  # "global" / "local" per layer; empty: all global
    window_size: int = 256  # keys a local layer's token sees, itself included
    qkv_bias: bool = True  # GPT-Neo's q/k/v projections have no bias
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_dict(cls, config: dict) -> GPT2Config:
        """From a config.json of model_type gpt2 or gpt_neo."""
        model_type = config.get("model_type", "gpt2")
        if model_type == "gpt_neo":
            layers = [kind for kinds, repeat in config.get("attention_types", [[["global", "local"], 12]])
                      for _ in range(repeat) for kind in kinds]
            config = {
                "vocab_size": config.get("vocab_size", 50257),
                "n_positions": config.get("max_position_embeddings", 2048),
                "n_embd": config.get("hidden_size", 2048),
                "n_layer": config.get("num_layers", 24),
                "n_head": config.get("num_heads", 16),
                "n_inner": config.get("intermediate_size"),
                "layer_norm_epsilon": config.get("layer_norm_epsilon", 1e-5),
                "activation_function": config.get("activation_function", "gelu_new"),
                "scale_attn_weights": False,
                "tie_word_embeddings": config.get("tie_word_embeddings", True),
                "embd_pdrop": config.get("embed_dropout", 0.0),
                "resid_pdrop": config.get("resid_dropout", 0.0),
                "attn_pdrop": config.get("attention_dropout", 0.0),
                "attention_layers": layers,
                "window_size": config.get("window_size", 256),
                "qkv_bias": False,
                "bos_token_id": config.get("bos_token_id"),
                "eos_token_id": config.get("eos_token_id"),
            }
        elif model_type != "gpt2":
            raise CheckpointError(f"GPT2Config reads model_type gpt2 or gpt_neo, got {model_type!r}")
        elif config.get("add_cross_attention"):
            raise CheckpointError("config.json: add_cross_attention (GPT-2 as a seq2seq decoder) is not supported")
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in config.items() if k in names and (v is not None or k == "n_inner")})
        cfg.check()
        return cfg

    def check(self) -> None:
        check_sizes(self, ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"))
        if self.n_embd % self.n_head:
            raise CheckpointError(f"config.json: n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.activation_function not in _GELU:
            raise CheckpointError(
                f"config.json: activation_function {self.activation_function!r} is not supported ({', '.join(_GELU)})"
            )
        if self.attention_layers:
            if len(self.attention_layers) != self.n_layer:
                raise CheckpointError(
                    f"config.json: attention_layers names {len(self.attention_layers)} layers, the model has {self.n_layer}"
                )
            bad = set(self.attention_layers) - {"global", "local"}
            if bad:
                raise CheckpointError(f"config.json: attention_layers may hold 'global' or 'local', got {sorted(bad)}")
            if "local" in self.attention_layers and not (isinstance(self.window_size, int) and self.window_size >= 1):
                raise CheckpointError(f"config.json: window_size must be an int >= 1, got {self.window_size!r}")

    @property
    def kv_heads(self) -> int:
        """Key/value heads (GPT-2: one per query head; StarCoder's multi-query attention: 1)."""
        return self.n_head

    def window(self, layer: int) -> int | None:
        """fastarch.ops.attention's window (keys to the left) of a layer; None: global."""
        if self.attention_layers and self.attention_layers[layer] == "local":
            return self.window_size - 1
        return None


class Block(nn.Module):
    """One pre-LN block's parameters; GPT2.forward runs it (the residual adds are fused into
    the norms, which crosses block boundaries)."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        C, inner = cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd
        kv = cfg.kv_heads * (C // cfg.n_head)
        self.ln_1 = nn.LayerNorm(C, eps=cfg.layer_norm_epsilon)
        self.c_attn = Linear(C, C + 2 * kv, bias=cfg.qkv_bias)  # q, k, v stacked on the output axis
        self.attn_proj = Linear(C, C)
        self.ln_2 = nn.LayerNorm(C, eps=cfg.layer_norm_epsilon)
        self.c_fc = Linear(C, inner)
        self.mlp_proj = Linear(inner, C)


class GPT2(CausalLM):
    """GPT-2 / GPT-Neo language model: token ids -> next-token logits."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.n_embd // cfg.n_head

    # the decoder protocol (fastarch/models/generate.py)
    @property
    def max_positions(self) -> int:
        return self.config.n_positions

    @property
    def n_layers(self) -> int:
        return self.config.n_layer

    def _scale(self, layer: int) -> float:
        scale = 1.0 / math.sqrt(self.head_dim) if self.config.scale_attn_weights else 1.0
        if self.config.scale_attn_by_inverse_layer_idx:
            scale /= layer + 1
        return scale

    def _qkv(self, layer: int, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normed hidden states (..., C) -> q (..., n_head, D), k and v (..., n_kv, D)."""
        return self.h[layer].c_attn(y).unflatten(-1, (3, self.n_head, self.head_dim)).unbind(-3)

    def _embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        x = self.wte(ids) + self.wpe(positions)
        return F.dropout(x, self.config.embd_pdrop, self.training)

    def _mlp(self, block: Block, y: Tensor) -> Tensor:
        h = ops.bias_gelu(ops.linear(y, block.c_fc.weight), block.c_fc.bias, _GELU[self.config.activation_function])
        return F.dropout(block.mlp_proj(h), self.config.resid_pdrop, self.training)

    def _blocks(self, x: Tensor, attend) -> Tensor:
        """The stack of blocks on hidden states x (..., C); attend(layer, y) -> the attention's
        output before its projection. Returns ln_f of the last residual stream."""
        norms = [b.ln_1 for b in self.h] + [self.ln_f]
        y = ops.layer_norm(x, norms[0].weight, norms[0].bias, eps=norms[0].eps)
        h = x
        for i, block in enumerate(self.h):
            a = F.dropout(block.attn_proj(attend(i, y)), self.config.resid_pdrop, self.training)
            y, h = ops.add_layer_norm(a, h, block.ln_2.weight, block.ln_2.bias, eps=block.ln_2.eps)
            nxt = norms[i + 1]
            y, h = ops.add_layer_norm(self._mlp(block, y), h, nxt.weight, nxt.bias, eps=nxt.eps)
        return y

    def _prefill(self, ids: Tensor, prompts: PackedPrompts, cache: KVCache | None) -> Tensor:
        """ids (total,) packed -> ln_f output (total, C)."""
        packing = prompts.packing
        dropout = self.config.attn_pdrop if self.training else 0.0

        def attend(i: int, y: Tensor) -> Tensor:
            q, k, v = self._qkv(i, y)
            if cache is not None:
                cache.write_packed(i, k, v, prompts)
            out = ops.attention(
                q, k, v, causal=True, cu_seqlens_q=packing.cu_seqlens, cu_seqlens_k=packing.cu_seqlens,
                max_seqlen_q=packing.max_seqlen, max_seqlen_k=packing.max_seqlen, window=self.config.window(i),
                scale=self._scale(i), dropout_p=dropout,
            )
            return out.reshape(-1, self.n_head * self.head_dim)

        return self._blocks(self._embed(ids, prompts.positions), attend)

    def _decode(self, input_ids: Tensor, cache: KVCache, last_only: bool) -> Tensor:
        """The next n tokens (B, n) of every row against the filled cache -> logits."""
        B, n = input_ids.shape
        if B != cache.batch:
            raise ValueError(f"cache was made for batch {cache.batch}, input_ids has {B} rows")
        cache.check_room(n)
        if input_ids.device.type == "cpu":  # on a GPU the check would make the host wait at every step
            self._check_ids(input_ids)
        positions = cache.seqlens.long()[:, None] + torch.arange(n, device=input_ids.device)
        seqlens = cache.seqlens_after(n)

        def attend(i: int, y: Tensor) -> Tensor:
            q, k, v = (t.transpose(1, 2) for t in self._qkv(i, y))  # (B, heads, n, D)
            cache.append(i, k, v)
            out = ops.attention_decode(q, cache.k[i], cache.v[i], seqlens, causal=True, window=self.config.window(i),
                                       scale=self._scale(i))
            return out.transpose(1, 2).reshape(B, n, self.n_head * self.head_dim)

        x = self._blocks(self._embed(input_ids, positions), attend)
        cache.advance(n)
        return self.lm_head(x[:, -1:] if last_only else x)

    # ------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> GPT2:
        """The model of a transformers GPT-2 / GPT-Neo checkpoint directory (GPT2LMHeadModel,
        GPT2Model, GPTNeoForCausalLM), in eval mode."""
        config = read_config(path)
        weights = read_weights(path)
        cfg = untie_stored_head(GPT2Config.from_dict(config), weights, ("transformer.wte.weight", "wte.weight"), path)
        with without_random_init():  # load_into fills every parameter
            model = cls(cfg)
        if config.get("model_type") == "gpt_neo":
            weights = _neo_weights(weights)
        weights = _from_conv1d(weights, model)
        tied = cfg.tie_word_embeddings

        def name_of(ckpt_name: str) -> str | None:
            target = _model_name(ckpt_name)
            return None if tied and target == "lm_head.weight" else target  # a copy of wte, if saved

        return load_into(model, weights, name_of, dtype=dtype, device=device, optional=["lm_head.weight"] if tied else [])


# transformers' names within a block -> ours. GPT-2's Conv1D layers store (in, out) weights; ours
# are nn.Linear's (out, in): _from_conv1d transposes exactly these.
_BLOCK_NAMES = {
    "ln_1": "ln_1", "ln_2": "ln_2", "attn.c_attn": "c_attn", "attn.c_proj": "attn_proj",
    "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp_proj",
}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_DROPPED = ("attn.bias", "attn.masked_bias", "attn.attention.bias", "attn.attention.masked_bias")  # causal-mask buffers


def _model_name(ckpt_name: str) -> str | None:
    """A checkpoint tensor's name in GPT2 (None: not a parameter); unknown names pass through
    unchanged, for load_into to report."""
    name = ckpt_name.removeprefix("transformer.")
    if name.startswith("h."):
        _, layer, rest = name.split(".", 2)
        if rest in _DROPPED:
            return None
        module, _, param = rest.rpartition(".")
        if module in _BLOCK_NAMES:
            return f"h.{layer}.{_BLOCK_NAMES[module]}.{param}"
    return name


def _from_conv1d(weights: dict[str, Tensor], model: GPT2) -> dict[str, Tensor]:
    """Conv1D (in, out) weights transposed to Linear (out, in); a misfit shape is reported in
    the checkpoint's layout."""
    own = dict(model.named_parameters())
    out = {}
    for name, t in weights.items():
        if name.removeprefix("transformer.").split(".", 2)[-1] in _CONV1D:
            target = own.get(_model_name(name) or "")
            if t.dim() != 2 or (target is not None and tuple(t.shape[::-1]) != tuple(target.shape)):
                want = tuple(target.shape[::-1]) if target is not None else "2-D"
                raise CheckpointError(
                    f"tensor {name} has shape {tuple(t.shape)}, but GPT2 needs {want} (Conv1D's (in, out) layout;"
                    " does config.json fit these weights?)"
                )
            t = t.t()
        out[name] = t
    return out


def _neo_weights(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """GPT-Neo's separate q/k/v projections stacked into c_attn (Linear layout), its names
    mapped to GPT-2's."""
    out, qkv = {}, {}
    for name, t in weights.items():
        base = name.removeprefix("transformer.")
        parts = base.split(".")
        if base.startswith("h.") and parts[2:4] == ["attn", "attention"]:
            proj = parts[4]
            if proj in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault(parts[1], {})[proj] = t
                continue
            if proj == "out_proj":
                out[f"h.{parts[1]}.attn_proj.{parts[5]}"] = t
                continue
            if proj in ("bias", "masked_bias"):
                continue
        if base.startswith("h.") and parts[2] == "mlp":  # nn.Linear already: keep out of _CONV1D
            out[f"h.{parts[1]}.{'c_fc' if parts[3] == 'c_fc' else 'mlp_proj'}.{parts[4]}"] = t
            continue
        out[name] = t
    for layer, projs in qkv.items():
        missing = {"q_proj", "k_proj", "v_proj"} - set(projs)
        if missing:
            raise CheckpointError(f"the checkpoint lacks tensors h.{layer}.attn.attention.{sorted(missing)[0]}.weight")
        out[f"h.{layer}.c_attn.weight"] = torch.cat([projs["q_proj"], projs["k_proj"], projs["v_proj"]], 0)
    return out


__all__ = ["GPT2", "GPT2Config"]
