"""The C++ attention kernels (fastarch::_attention_fwd / _bwd / _decode, implemented for the
CPU in csrc/cpu and for CUDA in csrc/cuda): fake implementations, and adapters from the
kernel-level Python interface (attention_backends.py) to the ops."""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import availability


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether fastarch._C registered ``fastarch::<op>`` for ``dispatch_key`` ("CPU", "CUDA")."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastarch::{op}", dispatch_key)
    except RuntimeError:  # the op does not exist: _C did not load
        return False


def _max_seqlen(cu: Tensor | None) -> int:
    return int((cu[1:] - cu[:-1]).max()) if cu is not None and cu.numel() > 1 else 0


def forward(q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal, scale, window_left,
            window_right, dropout_p, seed):
    return torch.ops.fastarch._attention_fwd(
        q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, _max_seqlen(cu_seqlens_q),
        _max_seqlen(cu_seqlens_k), causal, scale, window_left, window_right, dropout_p,
        int(seed) if seed is not None else 0,
    )


def backward(dout, q, k, v, out, lse, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal, scale,
             window_left, window_right, dropout_p, seed):
    return torch.ops.fastarch._attention_bwd(
        dout, q, k, v, out, lse, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, _max_seqlen(cu_seqlens_q),
        _max_seqlen(cu_seqlens_k), causal, scale, window_left, window_right, dropout_p,
        int(seed) if seed is not None else 0,
    )


def decode(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left):
    return torch.ops.fastarch._attention_decode(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left)


if availability.cpu() is None:  # _C loaded: its ops need fakes for torch.compile and opcheck

    def _out_like(q: Tensor, v: Tensor) -> Tensor:
        """The kernels' out: q's layout when the head dims agree, else contiguous (B, H, Sq, Dv)."""
        return torch.empty_like(q) if v.shape[-1] == q.shape[-1] else q.new_empty(*q.shape[:-1], v.shape[-1])

    @torch.library.register_fake("fastarch::_attention_fwd")
    def _(q, k, v, *args):
        return _out_like(q, v), q.new_empty(q.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake("fastarch::_attention_bwd")
    def _(dout, q, k, v, *args):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @torch.library.register_fake("fastarch::_attention_decode")
    def _(q, k_cache, v_cache, *args):
        return _out_like(q, v_cache), q.new_empty(q.shape[:-1], dtype=torch.float32)
