"""The LLaMA family on fastarch's kernels: LLaMA 1-3, Code LLaMA, SmolLM, Mistral (sliding
window attention), Qwen2 (biased q/k/v projections).

    model = Llama.from_pretrained("path/to/llama")                         # a transformers checkpoint
    model = Llama.from_pretrained("dir", gguf_file="model.Q4_1.gguf")      # or a llama.cpp GGUF file
    ids = fastarch.models.generate.generate(model, input_ids, attention_mask, max_new_tokens=20)

Pre-norm blocks: x + attn(rms(x)), then x + mlp(rms(x)), a final RMSNorm and the LM head
(tied to the token embeddings or not). The residual adds are fused into the next norm
(fastarch.ops.add_rms_norm). Attention rotates q and k (fastarch.ops.rotary, the half-split
layout, tables from fastarch.ops.rotary_tables with the config's rope_theta and rope_scaling),
reads each key/value head for its group of query heads (GQA: num_key_value_heads), and runs on
the packed real tokens of a padded batch (fastarch.ops.attention with cu_seqlens, causal;
positions count each row's real tokens from 0). Mistral's sliding_window: a token sees the
sliding_window most recent tokens, itself included. The MLP is SwiGLU: down(silu(gate(x)) *
up(x)). q/k/v and gate/up are each one matmul: the checkpoint's weights are stacked at load.

The model follows the decoder protocol of fastarch/models/generate.py (new_cache, forward with a
cache, last_only). On the CPU a prefill's and a decode step's layers run in one C++ call when
every op chose its CPU kernel (llama_fused_step.py: the same kernels, bit for bit, without the
Python between them).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from fastarch import ops
from fastarch.finite import finite_number
from fastarch.models import llama_fused_step as fused_step
from fastarch.models.generate import CausalLM, KVCache, PackedPrompts
from fastarch.models.loading import (
    CheckpointError, check_sizes, load_into, read_config, read_weights, untie_stored_head, without_random_init,
)
from fastarch.nn import Linear, QuantizedLinear, QuantizedLinearStack, set_activations  # the head on fastarch.ops.linear: the generation loop calls it as a module
from fastarch.ops.qlinear.formats import dequantize_blocks, row_bytes, widen_to_q8_0

MODEL_TYPES = ("llama", "mistral", "qwen2")


# the config's sizes, each an int >= 1
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "max_position_embeddings")


@dataclass
class LlamaConfig:
    """The hyperparameters, under transformers' LlamaConfig names."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0
    attention_bias: bool = False  # a bias on q, k, v and o (LLaMA's flag)
    qkv_bias: bool = False  # a bias on q, k, v only (Qwen2)
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    sliding_window: int | None = None  # keys a token sees, itself included; None: all
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_dict(cls, config: dict) -> LlamaConfig:
        """From a config.json of model_type llama, mistral or qwen2 (or read_gguf's dict)."""
        model_type = config.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise CheckpointError(f"LlamaConfig reads model_type {', '.join(MODEL_TYPES)}; got {model_type!r}")
        config = dict(config)
        # transformers 5 moves rope_theta and rope_scaling into rope_parameters
        rope = config.get("rope_parameters")
        if isinstance(rope, dict):
            config.setdefault("rope_theta", rope.get("rope_theta"))
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
            if rope.get("partial_rotary_factor") is not None:
                config.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        layers = config.get("layer_types")
        if model_type == "qwen2":
            config["qkv_bias"] = True
            if not config.get("use_sliding_window", False):
                config["sliding_window"] = None
            elif layers is None:  # the window applies from layer max_window_layers on
                n, first = config.get("num_hidden_layers", 32), config.get("max_window_layers", 28)
                layers = ["full_attention" if i < first else "sliding_attention" for i in range(n)]
        if layers:
            if set(layers) == {"full_attention"}:
                config["sliding_window"] = None
            elif set(layers) != {"sliding_attention"}:
                raise CheckpointError(f"config.json: layer_types {sorted(set(layers))}: a sliding window on only"
                                      " some layers is not supported")
        if config.get("hidden_act") is None:
            config["hidden_act"] = "silu"
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in config.items() if k in names and v is not None})
        check_sizes(cfg, _SIZES)  # (before the sizes derived from them)
        if config.get("num_key_value_heads") is None:
            cfg.num_key_value_heads = cfg.num_attention_heads
        if config.get("head_dim") is None:
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        cfg.check()
        return cfg

    def check(self) -> None:
        check_sizes(self, _SIZES)
        eps = self.rms_norm_eps
        if not finite_number(eps) or not eps >= 0:
            # (else every forward fails in its first norm, and generate blames NaN logits)
            raise CheckpointError(f"config.json: rms_norm_eps must be a finite number >= 0, got {eps!r}")
        if self.hidden_act != "silu":
            raise CheckpointError(f"config.json: hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        kv = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % kv:
            raise CheckpointError(f"config.json: num_attention_heads {self.num_attention_heads} is not a multiple of"
                                  f" num_key_value_heads {kv}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise CheckpointError(f"config.json: hidden_size {self.hidden_size} is not a multiple of"
                                  f" num_attention_heads {self.num_attention_heads} (and no head_dim)")
        if self.partial_rotary_factor != 1.0:  # no LLaMA-family model in transformers rotates part of a head
            raise CheckpointError(f"config.json: partial_rotary_factor {self.partial_rotary_factor} is not supported")
        if self.sliding_window is not None and not (isinstance(self.sliding_window, int) and self.sliding_window >= 1):
            raise CheckpointError(f"config.json: sliding_window must be an int >= 1, got {self.sliding_window!r}")
        try:
            ops.rotary_tables(self.rotary_dim, 1, self.rope_theta, self.scaling)
        except ValueError as e:
            raise CheckpointError(f"config.json: rope_theta / rope_scaling: {e}") from None

    @property
    def scaling(self) -> dict | None:
        """rope_scaling as rotary_tables takes it: the context lengths that transformers takes
        from the config when the dict has none (dynamic's trained length, YaRN's original one)."""
        if not self.rope_scaling:
            return None
        scaling = dict(self.rope_scaling)
        scaling.setdefault("max_position_embeddings", self.max_position_embeddings)
        if scaling.get("rope_type", scaling.get("type")) == "yarn":
            scaling.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        return scaling

    @property
    def rotary_dim(self) -> int:
        return int((self.head_dim or self.hidden_size // self.num_attention_heads) * self.partial_rotary_factor)

    @property
    def window(self) -> int | None:
        """fastarch.ops.attention's window (keys to the left); None: global."""
        return None if self.sliding_window is None else self.sliding_window - 1


def _linear(layer: nn.Linear | QuantizedLinear | QuantizedLinearStack, x: Tensor) -> Tensor:
    """layer(x) on fastarch.ops.linear (the weight streamed once for a decode step's few rows),
    or quantized_linear for a QuantizedLinear, without the module call's hook machinery (a few
    microseconds, ~120 times per decode step); the blocks are parameter holders that Llama runs
    itself."""
    if type(layer) is QuantizedLinear:
        return ops.quantized_linear(x, layer.weight, layer.quant, layer.bias, activations=layer._activations)
    if type(layer) is QuantizedLinearStack:
        return QuantizedLinearStack.forward(layer, x)
    return ops.linear(x, layer.weight, layer.bias)


def _swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of the stacked (..., 2 * inner) gate/up projection."""
    gate, up = gate_up.chunk(2, dim=-1)  # strided halves: the kernels read them in place
    return ops.swiglu(gate, up)


class RMSNorm(nn.Module):
    """An RMSNorm's weight and eps; the model calls fastarch.ops.rms_norm / add_rms_norm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class Block(nn.Module):
    """One decoder layer's parameters; Llama.forward runs it (the residual adds are fused into
    the norms, which crosses layer boundaries)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        C, D = cfg.hidden_size, cfg.head_dim
        H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.input_layernorm = RMSNorm(C, cfg.rms_norm_eps)
        # q, k, v stacked on the output axis: (H + 2 Hkv) * D rows
        self.qkv_proj = nn.Linear(C, (H + 2 * Hkv) * D, bias=cfg.attention_bias or cfg.qkv_bias)
        self.o_proj = nn.Linear(H * D, C, bias=cfg.attention_bias)
        self.post_attention_layernorm = RMSNorm(C, cfg.rms_norm_eps)
        self.gate_up_proj = nn.Linear(C, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)  # gate rows, then up
        self.down_proj = nn.Linear(cfg.intermediate_size, C, bias=cfg.mlp_bias)


class Llama(CausalLM):
    """A LLaMA-family causal language model: token ids -> next-token logits."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # fp32 tables, kept off the module's buffers so that a cast of the model (.to(bfloat16))
        # does not round them; a copy per device is made on first use
        cos, sin, _ = ops.rotary_tables(cfg.rotary_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.scaling)
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {cos.device: (cos, sin)}

    def _apply(self, fn, recurse=True):  # .to(), .half(), ...: the decode plans' parameters change
        fused_step.forget(self)
        return super()._apply(fn, recurse)

    def _rope(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._tables:
            cos, sin = next(iter(self._tables.values()))
            self._tables[device] = (cos.to(device), sin.to(device))
        return self._tables[device]

    # the decoder protocol (fastarch/models/generate.py)
    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    def _blocks(self, x: Tensor, attend) -> Tensor:
        """The stack of layers on hidden states x (..., C); attend(layer, y) -> the attention's
        output before o_proj. Returns the final norm of the last residual stream."""
        norms = [b.input_layernorm for b in self.layers] + [self.norm]
        y = ops.rms_norm(x, norms[0].weight, eps=norms[0].eps)
        h = x
        for i, block in enumerate(self.layers):
            a = _linear(block.o_proj, attend(i, y))
            post = block.post_attention_layernorm
            y, h = ops.add_rms_norm(a, h, post.weight, eps=post.eps)
            nxt = norms[i + 1]
            y, h = ops.add_rms_norm(_linear(block.down_proj, _swiglu(_linear(block.gate_up_proj, y))), h, nxt.weight,
                                    eps=nxt.eps)
        return y

    def _split(self, qkv: Tensor, dim: int = -2) -> tuple[Tensor, Tensor, Tensor]:
        """(..., (H + 2 Hkv) * D) -> q (..., H, D), k, v (..., Hkv, D); with dim=1, (B, n, ...)
        -> q (B, H, n, D), k, v (B, Hkv, n, D). Views of qkv."""
        H, Hkv, D = self.n_head, self.n_kv, self.head_dim
        heads = qkv.view(*qkv.shape[:-1], H + 2 * Hkv, D)
        if dim == 1:
            heads = heads.transpose(1, 2)
        q, k, v = heads.split_with_sizes([H, Hkv, Hkv], dim)
        return q, k, v

    def _prefill(self, ids: Tensor, prompts: PackedPrompts, cache: KVCache | None) -> Tensor:
        """ids (total,) packed -> the final norm's output (total, C)."""
        packing = prompts.packing
        dropout = self.config.attention_dropout if self.training else 0.0
        cos, sin = self._rope(ids.device)
        scale = 1.0 / math.sqrt(self.head_dim)

        def attend(i: int, y: Tensor) -> Tensor:
            q, k, v = self._split(_linear(self.layers[i].qkv_proj, y))
            q, k = ops.rotary(q, k, cos, sin, prompts.positions)
            if cache is not None:
                cache.write_packed(i, k, v, prompts)
            out = ops.attention(
                q, k, v.contiguous(), causal=True, cu_seqlens_q=packing.cu_seqlens, cu_seqlens_k=packing.cu_seqlens,
                max_seqlen_q=packing.max_seqlen, max_seqlen_k=packing.max_seqlen, window=self.config.window,
                scale=scale, dropout_p=dropout,
            )
            return out.reshape(-1, self.n_head * self.head_dim)

        x = self.embed_tokens(ids)
        window_left = -1 if self.config.window is None else self.config.window
        products = fused_step.prefill_products(self, x, cache, window_left)
        step = None if products is None else fused_step.step_arguments(self, x.dtype)
        if step is not None:  # the same kernels, called from one C++ loop (llama_fused_step.py)
            weights, quants, biases, eps = step
            caches = ([], []) if cache is None else (cache.k, cache.v)
            return torch.ops.fastarch._llama_prefill_layers(
                x, weights, quants, biases, *caches, cos, sin, prompts.positions, packing.cu_seqlens, packing.seqlen, eps,
                self.n_head, self.n_kv, self.head_dim, scale, window_left, products,
            )
        return self._blocks(x, attend)

    def _decode(self, input_ids: Tensor, cache: KVCache, last_only: bool) -> Tensor:
        """The next n tokens (B, n) of every row against the filled cache -> logits."""
        B, n = input_ids.shape
        if B != cache.batch:
            raise ValueError(f"cache was made for batch {cache.batch}, input_ids has {B} rows")
        cache.check_room(n, self.max_positions)
        if input_ids.device.type == "cpu":  # on a GPU the check would make the host wait at every step
            self._check_ids(input_ids)
        cos, sin = self._rope(input_ids.device)
        offsets = cache.seqlens.long()  # the rotary kernels' index type: converted once, not per layer
        seqlens = cache.seqlens_after(n)
        scale = 1.0 / math.sqrt(self.head_dim)

        def attend(i: int, y: Tensor) -> Tensor:
            q, k, v = self._split(_linear(self.layers[i].qkv_proj, y).view(B, n, -1), dim=1)  # (B, heads, n, D)
            # the lengths fit (checked on the host above: cache.filled + n <= both bounds)
            q, k = ops.rotary(q, k, cos, sin, offsets, positions_checked=True)
            cache.append(i, k, v)
            out = ops.attention_decode(q, cache.k[i], cache.v[i], seqlens, causal=True, window=self.config.window,
                                       scale=scale, seqlens_checked=True)
            return out.transpose(1, 2).reshape(B * n, self.n_head * self.head_dim)

        # the hidden states as (B n, C) rows: the ops' own layout, so no op reshapes them
        x = self.embed_tokens(input_ids.reshape(-1))
        window_left = -1 if self.config.window is None else self.config.window
        plan = fused_step.decode_plan(self, x, cache, window_left)
        if plan is not None:  # the same kernels, called from one C++ loop (llama_fused_step.py)
            linear_kernel, (weights, quants, biases, eps) = plan
            x = torch.ops.fastarch._llama_decode_layers(
                x, weights, quants, biases, cache.k, cache.v, cos, sin, offsets, cache.seqlens, seqlens, eps, B, self.n_head,
                self.n_kv, self.head_dim, scale, window_left, linear_kernel,
            )
        else:
            x = self._blocks(x, attend)
        x = x.view(B, n, -1)
        cache.advance(n)
        return _linear(self.lm_head, x[:, -1:] if last_only else x)

    # ------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, gguf_file: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None, quantized: bool = False, activations: str = "exact",
    ) -> Llama:
        """The model of a transformers checkpoint directory (LlamaForCausalLM, LlamaModel,
        MistralForCausalLM, Qwen2ForCausalLM), or of a llama GGUF file: ``gguf_file`` names it
        inside the directory ``path`` (as transformers' gguf_file=), or ``path`` is the file.
        In eval mode. quantized (GGUF only): the projections and the head whose tensors the file
        stores in a format of fastarch.ops.quantized_linear (Q4_0 ... IQ4_XS) keep those blocks
        (fastarch.nn.QuantizedLinear, or a QuantizedLinearStack for a q/k/v or gate/up stack of
        mixed formats; the products on fastarch.ops.quantized_linear, the same values as
        dequantized); the rest is dequantized to ``dtype`` as without it. activations (with
        quantized): "int8" rounds x to int8 for those layers' products, as llama.cpp does
        (fastarch.nn.set_activations); "exact" (the default) does not."""
        check_activations(activations, quantized)
        file = gguf_path(path, gguf_file)
        if quantized and file is None:
            raise ValueError(f"{path}: quantized=True keeps a GGUF file's quantized blocks; this is not a GGUF file"
                             " (fastarch.nn.QuantizedLinear.from_linear quantizes a layer)")
        quants: dict[str, str] = {}
        if file is not None:
            from fastarch.models.gguf import read_gguf

            config, weights = read_gguf(file, dtype=dtype or torch.float32, quantized=quantized)
            quants = config.pop("quantization", {})
        else:
            config, weights = read_config(path), read_weights(path)
        cfg = LlamaConfig.from_dict(config)
        if "lm_head.weight" in quants:  # the head's own blocks (a tied one's: the embeddings' as stored)
            cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
        cfg = untie_stored_head(cfg, weights, ("model.embed_tokens.weight", "embed_tokens.weight"), path)
        with without_random_init():  # load_into fills every parameter
            model = cls(cfg)
        weights = _stack(weights, cfg, quants, dtype or torch.float32)
        stacks: dict[str, list[tuple[str, int]]] = {}  # a stack of parts in mixed formats: (quant, rows) each
        for name, quant in quants.items():  # the layers of the blocks that _stack kept
            if name in weights and weights[name].dtype == torch.uint8:
                layer = name.removeprefix("model.").removesuffix(".weight")
                if ".parts." in layer:
                    stacks.setdefault(layer.split(".parts.")[0], []).append((quant, weights[name].shape[0]))
                else:
                    _quantize_layer(model, layer, quant)
        for layer, parts in stacks.items():
            _quantize_layer(model, layer, parts)
        tied = cfg.tie_word_embeddings

        def name_of(ckpt_name: str) -> str | None:
            if ckpt_name.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved
                return None
            name = ckpt_name.removeprefix("model.")
            return None if tied and name == "lm_head.weight" else name  # a copy of embed_tokens, if saved

        model = load_into(model, weights, name_of, dtype=dtype, device=device,
                          optional=["lm_head.weight"] if tied else [])
        set_activations(model, activations)
        return model


def check_activations(activations: object, quantized: bool) -> None:
    """from_pretrained's activations: "exact", or "int8" with quantized=True."""
    from fastarch.ops.qlinear.reference import check_activations as check

    check("from_pretrained", activations)
    if activations == "int8" and not quantized:
        raise ValueError("from_pretrained: activations='int8' rounds x for a GGUF file's quantized layers; it needs"
                         " quantized=True")


def gguf_path(path: str | os.PathLike, gguf_file: str | os.PathLike | None) -> Path | None:
    """The GGUF file of from_pretrained's arguments, None for a checkpoint directory."""
    if gguf_file is not None:
        file = Path(gguf_file)
        return file if file.is_absolute() else Path(path) / file
    return Path(path) if str(path).endswith(".gguf") else None


def _quantize_layer(model: Llama, name: str, quant: str | list[tuple[str, int]]) -> None:
    """Replaces the linear layer ``name`` (e.g. "layers.0.qkv_proj", "lm_head") of model by a
    fastarch.nn.QuantizedLinear of format ``quant`` of its shape, or for ``quant`` a list of
    parts (format, out_features) in order by a QuantizedLinearStack of them (a stack in mixed
    formats), to be filled by load_into."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    bias = old.bias is not None
    if isinstance(quant, str):
        new = QuantizedLinear(old.in_features, old.out_features, quant, bias=bias)
    else:
        new = QuantizedLinearStack([QuantizedLinear(old.in_features, rows, part, bias=bias) for part, rows in quant])
    setattr(owner, child, new)


def _stack(
    weights: dict[str, Tensor], cfg: LlamaConfig, quants: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """The checkpoint's q/k/v and gate/up projections stacked into qkv_proj and gate_up_proj,
    each part's shape checked first (an error names the checkpoint's tensor). quants: the
    tensors given as quantized blocks (read_gguf(quantized=True)); the parts of a stack are kept
    as one layer's blocks when all are of one format (after _unify), as the parts
    of a QuantizedLinearStack ("layers.0.qkv_proj.parts.2.weight", their biases likewise) when
    all are blocks of mixed formats; they are renamed in place (quants then names the stacked
    layers' weights)."""
    quants = quants if quants is not None else {}
    C, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    parts = {
        "self_attn.q_proj": ("qkv_proj", 0, H * D), "self_attn.k_proj": ("qkv_proj", 1, Hkv * D),
        "self_attn.v_proj": ("qkv_proj", 2, Hkv * D), "mlp.gate_proj": ("gate_up_proj", 0, I),
        "mlp.up_proj": ("gate_up_proj", 1, I),
    }
    renamed = {"self_attn.o_proj": "o_proj", "mlp.down_proj": "down_proj"}
    out: dict[str, Tensor] = {}
    groups: dict[str, dict[int, tuple[str, Tensor]]] = {}
    for name, t in weights.items():
        base = name.removeprefix("model.")
        pieces = base.split(".")
        if pieces[0] == "layers" and len(pieces) == 5:
            layer, module, kind = pieces[1], ".".join(pieces[2:4]), pieces[4]
            if module in parts:
                target, index, rows = parts[module]
                want = (rows, C) if kind == "weight" else (rows,)
                if name in quants:
                    want = (rows, row_bytes(C, quants[name]))
                if tuple(t.shape) != want:
                    raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, but the model needs {want}"
                                          " (does config.json fit these weights?)")
                groups.setdefault(f"layers.{layer}.{target}.{kind}", {})[index] = (name, t)
                continue
            if module in renamed:
                out[f"layers.{layer}.{renamed[module]}.{kind}"] = t
                if name in quants:
                    quants[f"layers.{layer}.{renamed[module]}.{kind}"] = quants.pop(name)
                continue
        out[name] = t
    for target, got in groups.items():
        if target.endswith(".weight"):
            _unify(got, quants, dtype)
    mixed = {  # the stacks kept as parts: blocks of more than one format
        target.removesuffix(".weight") for target, got in groups.items()
        if target.endswith(".weight") and len({quants.get(name) for name, _ in got.values()}) > 1
    }
    for target, got in groups.items():
        count = 3 if ".qkv_proj." in target else 2
        if len(got) != count:
            layer = target.split(".")[1]
            names = [m for m, (tgt, i, _) in parts.items() if tgt == target.split(".")[2] and i not in got]
            raise CheckpointError(f"the checkpoint lacks tensor model.layers.{layer}.{names[0]}.{target.split('.')[-1]}")
        stack, _, kind = target.rpartition(".")
        if stack in mixed:
            for i in range(count):
                name, t = got[i]
                out[f"{stack}.parts.{i}.{kind}"] = t
                if name in quants:
                    quants[f"{stack}.parts.{i}.{kind}"] = quants.pop(name)
            continue
        out[target] = torch.cat([got[i][1] for i in range(count)], 0)
        if got[0][0] in quants:
            quants[target] = quants[got[0][0]]
            for name, _ in got.values():
                quants.pop(name)
    return out


def _unify(parts: dict[int, tuple[str, Tensor]], quants: dict[str, str], dtype: torch.dtype) -> None:
    """The weights of one q/k/v or gate/up stack (index -> (checkpoint name, tensor)) brought to
    one format where they can be (a file may mix formats within a layer), in place: blocks of
    Q4_0, Q5_0 and Q8_0 all as Q8_0 (the same values, widen_to_q8_0: a Q4_K_M file of narrow
    rows has q, k in Q5_0 and v in Q8_0); blocks with dense tensors dequantized to dtype; blocks
    of other mixed formats (Q4_K with Q6_K) are left for _stack to keep as parts."""
    kinds = {quants.get(name) for name, _ in parts.values()}
    if len(kinds) < 2:
        return
    for i, (name, t) in parts.items():
        if kinds <= {"q4_0", "q5_0", "q8_0"}:
            t, quants[name] = widen_to_q8_0(t, quants[name]), "q8_0"
        elif None in kinds and name in quants:
            t = dequantize_blocks(t, quants.pop(name)).to(dtype)
        parts[i] = (name, t)


__all__ = ["Llama", "LlamaConfig"]
