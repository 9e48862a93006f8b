"""The triton backend of attention: its kernels (kernels/attention.py) as torch ops
(``torch.library.triton_op``, so that torch.compile sees into them on GPU), what it supports,
and its registration with attention_backends.add_backend. Kernel-level interface as in
attention_backends.py."""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import availability, registry
from fastarch.ops import attention_backends
from fastarch.ops.attention_backends import AttentionProblem, max_seqlen, seed_value

try:
    from fastarch.kernels import attention as _kernels
except ImportError:  # triton is not installed: fastarch.availability.triton() says so
    _kernels = None

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Head dims are padded to a power of two (at least 16) inside the kernels; above 256 the
# tiles no longer fit a GPU's registers and shared memory.
MAX_HEAD_DIM = 256

if _kernels is not None:

    @torch.library.triton_op("fastarch::_triton_attention_fwd", mutates_args=())
    def _triton_attention_fwd(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        cu_seqlens_q: Tensor | None,
        cu_seqlens_k: Tensor | None,
        max_seqlen_q: int,
        max_seqlen_k: int,
        causal: bool,
        scale: float,
        window_left: int,
        window_right: int,
        dropout_p: float,
        seed: int,
    ) -> tuple[Tensor, Tensor]:
        return _kernels.attention_forward(
            q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
            scale, window_left, window_right, dropout_p, seed,
        )

    @torch.library.triton_op("fastarch::_triton_attention_bwd", mutates_args=())
    def _triton_attention_bwd(
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        cu_seqlens_q: Tensor | None,
        cu_seqlens_k: Tensor | None,
        max_seqlen_q: int,
        max_seqlen_k: int,
        causal: bool,
        scale: float,
        window_left: int,
        window_right: int,
        dropout_p: float,
        seed: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _kernels.attention_backward(
            dout, q, k, v, out, lse, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            max_seqlen_k, causal, scale, window_left, window_right, dropout_p, seed,
        )

    @torch.library.triton_op("fastarch::_triton_attention_decode", mutates_args=())
    def _triton_attention_decode(
        q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, causal: bool, scale: float,
        window_left: int,
    ) -> tuple[Tensor, Tensor]:
        return _kernels.attention_decode(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left)


def forward(q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal, scale, window_left,
            window_right, dropout_p, seed):
    return torch.ops.fastarch._triton_attention_fwd(
        q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen(cu_seqlens_q),
        max_seqlen(cu_seqlens_k), causal, scale, window_left, window_right, dropout_p, seed_value(seed),
    )


def backward(dout, q, k, v, out, lse, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal, scale,
             window_left, window_right, dropout_p, seed):
    return torch.ops.fastarch._triton_attention_bwd(
        dout, q, k, v, out, lse, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen(cu_seqlens_q),
        max_seqlen(cu_seqlens_k), causal, scale, window_left, window_right, dropout_p, seed_value(seed),
    )


def decode_forward(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left):
    return torch.ops.fastarch._triton_attention_decode(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left)


def supports(p: AttentionProblem) -> str | None:
    """None when the Triton kernels run ``p``, else why not. Every feature of the interface is
    implemented (masks, padding, variable lengths, windows, dropout, grouped-query heads,
    head dims up to 256 of any size, values' head dim != keys'); fp32 runs exact fp32 dots
    (input_precision="ieee": correct, but not on tensor cores)."""
    if p.device == "cpu" and not availability.triton_interpreter():
        return "input is on cpu; Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1)"
    if p.device not in ("cpu", "cuda"):
        return f"input is on {p.device}; this backend runs CUDA tensors"
    if p.dtype not in KERNEL_DTYPES:
        return f"dtype {p.dtype} is not supported (supported: {', '.join(str(d) for d in KERNEL_DTYPES)})"
    if max(p.head_dim, p.head_dim_v) > MAX_HEAD_DIM:
        return f"head dim {max(p.head_dim, p.head_dim_v)} is above {MAX_HEAD_DIM}"
    return None


def supports_decode(p: AttentionProblem) -> str | None:
    return supports(p)


attention_backends.add_backend(
    registry.Backend("triton", availability.triton, supports, forward, backward),
    decode=registry.Backend("triton", availability.triton, supports_decode, decode_forward),
)
