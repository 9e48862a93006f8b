"""The C++ attention kernel ops (fastarch::_attention_fwd / _bwd / _decode / _append_kv,
csrc/ops.cpp; implemented for the CPU in csrc/cpu/attn and for CUDA in csrc/cuda/attn): the
adapters from the backend interface (reference.py) and their fake implementations."""

from __future__ import annotations

import torch

from fastarch import availability
from fastarch.ops.attn.args import empty_out


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether fastarch._C registered ``fastarch::<op>`` for ``dispatch_key`` ("CPU", "CUDA")."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastarch::{op}", dispatch_key)
    except RuntimeError:  # the op does not exist: _C did not load
        return False


def forward(q, k, v, args):
    return torch.ops.fastarch._attention_fwd(q, k, v, *args.kernel_args())


def backward(dout, q, k, v, out, lse, args):
    return torch.ops.fastarch._attention_bwd(dout, q, k, v, out, lse, *args.kernel_args())


def decode(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left):
    return torch.ops.fastarch._attention_decode(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left)


def append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens):
    torch.ops.fastarch._append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens)


if availability.cpu() is None:  # _C loaded: its ops need fakes for torch.compile and opcheck

    @torch.library.register_fake("fastarch::_attention_fwd")
    def _(q, k, v, *args):
        return empty_out(q, v), q.new_empty(q.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake("fastarch::_attention_bwd")
    def _(dout, q, k, v, *args):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @torch.library.register_fake("fastarch::_attention_decode")
    def _(q, k_cache, v_cache, *args):
        return empty_out(q, v_cache), q.new_empty(q.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake("fastarch::_append_kv")
    def _(k_cache, v_cache, k_new, v_new, cache_seqlens):
        return None
