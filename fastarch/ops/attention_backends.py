"""The backends of the attention ops, in priority order, each with what it supports.

Kernel-level interface (the semantics are defined in attention_reference.py):

    forward(q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
            causal, scale, window_left, window_right, dropout_p, seed) -> (out, lse)
    backward(dout, q, k, v, out, lse, attn_mask, key_padding_mask, cu_seqlens_q,
             cu_seqlens_k, causal, scale, window_left, window_right, dropout_p, seed)
        -> (dq, dk, dv)
    decode(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left) -> (out, lse)

q/k/v are 4-D (B, H, S, D) views with contiguous last dims (packed variable-length input is
the view (1, H, total, D)); attn_mask, if any, has q's dtype and broadcasts to
(B, H, Sq, Sk); key_padding_mask is bool (B, Sk); seed is an int64 scalar tensor on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastarch import availability, registry
from fastarch.ops.attention_reference import (
    attention_backward_ref,
    attention_decode_ref,
    attention_forward_ref,
)

ATTENTION_OPS = ("attention", "attention_decode")


@dataclass(frozen=True)
class AttentionProblem:
    """What a backend needs to know to say whether it can run an attention call."""

    device: str
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    heads: int
    kv_heads: int
    attn_mask: bool
    key_padding_mask: bool
    varlen: bool
    dropout: bool
    window: bool
    decode: bool = False

    @classmethod
    def of(cls, q: Tensor, k: Tensor, v: Tensor, attn_mask=None, key_padding_mask=None, cu_seqlens_q=None,
           dropout_p: float = 0.0, window_left: int = -1, window_right: int = -1, decode: bool = False):
        return cls(
            q.device.type, q.dtype, q.shape[-1], v.shape[-1], q.shape[1], k.shape[1], attn_mask is not None,
            key_padding_mask is not None, cu_seqlens_q is not None, dropout_p > 0,
            window_left >= 0 or window_right >= 0, decode,
        )

    def __str__(self) -> str:
        features = [name for name in ("attn_mask", "key_padding_mask", "varlen", "dropout", "window") if getattr(self, name)]
        return (
            f"{self.dtype} on {self.device}, head dim {self.head_dim}"
            + (f" (values {self.head_dim_v})" if self.head_dim_v != self.head_dim else "")
            + f", {self.heads} heads / {self.kv_heads} kv heads"
            + (f", with {', '.join(features)}" if features else "")
        )


def max_seqlen(cu_seqlens: Tensor | None) -> int:
    """The longest packed sequence (0 when not packed): the kernels size their grids by it (one
    host sync, as FlashAttention's callers)."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens is not None and cu_seqlens.numel() > 1 else 0


def seed_value(seed: Tensor | None) -> int:
    """The dropout hash's seed as the kernels take it (0 without dropout)."""
    return int(seed) if seed is not None else 0


def empty_out(q: Tensor, v: Tensor) -> Tensor:
    """The attention output for q and values v: q's layout when the head dims agree, else
    contiguous (B, H, Sq, Dv)."""
    return torch.empty_like(q) if v.shape[-1] == q.shape[-1] else q.new_empty(*q.shape[:-1], v.shape[-1])


def _dtype_reason(p: AttentionProblem, allowed: tuple[torch.dtype, ...]) -> str | None:
    if p.dtype in allowed:
        return None
    return f"dtype {p.dtype} is not supported (supported: {', '.join(str(d) for d in allowed)})"


def _reference_supports(p: AttentionProblem) -> str | None:
    return None


_BACKENDS: list[registry.Backend] = [
    registry.Backend(
        "reference", availability.reference, _reference_supports, attention_forward_ref, attention_backward_ref
    ),
]
_DECODE: list[registry.Backend] = [
    registry.Backend("reference", availability.reference, _reference_supports, attention_decode_ref),
]


# The attention ops' priority: Triton before our CUDA C++ kernels. Measured on an H200
# (bench/results/gpu-h200-attention-2026-11-26.json, -decode-): Triton's forward ran 1.13-1.50x
# SDPA's flash kernel where the CUDA (mma.sync) one ran 0.78-0.89x, its forward+backward
# 0.55-1.24x against 0.47-0.55x, its decode 2-3.5x faster than the CUDA one. cpu first: it never
# takes a CUDA tensor, and a CPU tensor reaches Triton only in its (slow) interpreter.
ORDER = ("cpu", "triton", "cuda", "reference")


def add_backend(backend: registry.Backend, decode: registry.Backend | None = None) -> None:
    """Puts a kernel backend in front of the ones registered so far, in the order of ORDER
    (the modules of the kernel backends call this when they load)."""
    for table, entry in ((_BACKENDS, backend), (_DECODE, decode)):
        if entry is not None:
            table.append(entry)
            table.sort(key=lambda b: ORDER.index(b.name))
    registry.register("attention", _BACKENDS)
    registry.register("attention_decode", _DECODE)


registry.register("attention", _BACKENDS)
registry.register("attention_decode", _DECODE)
