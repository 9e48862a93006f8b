"""The attention's Triton kernels (kernels/attn/) as torch ops
(``torch.library.triton_op``, so that torch.compile sees into them on GPU), and the adapters
from the backend interface (reference.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import availability
from fastarch.ops.attn.args import AttentionArgs

try:
    from fastarch.kernels.attn import append_kv as _append_kv, backward as _backward, decode as _decode
    from fastarch.kernels.attn import forward as _forward
except ImportError:  # triton is not installed: fastarch.availability.triton() says so
    _forward = None

if _forward is not None and availability.TRITON_OPS:  # (registered where they can run)

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
        args = AttentionArgs(attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             causal, scale, window_left, window_right, dropout_p, seed)
        return _forward.attention_forward(q, k, v, args)

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
        args = AttentionArgs(attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             causal, scale, window_left, window_right, dropout_p, seed)
        return _backward.attention_backward(dout, q, k, v, out, lse, args)

    @torch.library.triton_op("fastarch::_triton_attention_decode", mutates_args=())
    def _triton_attention_decode(
        q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, causal: bool, scale: float,
        window_left: int,
    ) -> tuple[Tensor, Tensor]:
        return _decode.attention_decode(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left)


    @torch.library.triton_op("fastarch::_triton_append_kv", mutates_args=("k_cache", "v_cache"))
    def _triton_append_kv(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, cache_seqlens: Tensor) -> None:
        _append_kv.append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens)


def forward(q, k, v, args):
    return torch.ops.fastarch._triton_attention_fwd(q, k, v, *args.kernel_args())


def backward(dout, q, k, v, out, lse, args):
    return torch.ops.fastarch._triton_attention_bwd(dout, q, k, v, out, lse, *args.kernel_args())


def decode(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left):
    return torch.ops.fastarch._triton_attention_decode(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left)


def append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens):
    torch.ops.fastarch._triton_append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens)
