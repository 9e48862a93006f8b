"""Triton kernel of append_kv: the new tokens' key and value rows copied into the caches at
each sequence's end, one program per (token, kv head, sequence), both caches in one launch.
A slot outside the cache is not written (the op asserts the lengths on the device)."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from fastarch.kernels.launch import wrap_triton


@triton.jit
def _copy_row(dst, src, ok, COLS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for start in range(0, COLS, BLOCK):
        cols = start + offs
        keep = (cols < COLS) & ok
        tl.store(dst + cols, tl.load(src + cols, mask=keep), mask=keep)


@triton.jit
def _append_kv_kernel(
    K_CACHE, V_CACHE, K_NEW, V_NEW, LENS,
    stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs,
    stride_knb, stride_knh, stride_kns, stride_vnb, stride_vnh, stride_vns,
    cache_len,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    slot = tl.load(LENS + b).to(tl.int64) + t
    ok = (slot >= 0) & (slot < cache_len)
    slot = tl.where(ok, slot, 0)  # (no address is formed outside the cache, even masked)
    _copy_row(K_CACHE + b * stride_kcb + h * stride_kch + slot * stride_kcs,
              K_NEW + b * stride_knb + h * stride_knh + t * stride_kns, ok, HEAD_DIM, BLOCK_D)
    _copy_row(V_CACHE + b * stride_vcb + h * stride_vch + slot * stride_vcs,
              V_NEW + b * stride_vnb + h * stride_vnh + t * stride_vns, ok, HEAD_DIM_V, BLOCK_DV)


def append_kv(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, cache_seqlens: Tensor) -> None:
    """k_cache (B, Hkv, S_max, D), v_cache (B, Hkv, S_max, Dv), k_new / v_new (B, Hkv, S_new, .),
    last dims contiguous; cache_seqlens int32 (B,). Writes the caches in place."""
    batch, kv_heads, new, d = k_new.shape
    dv = v_new.shape[-1]
    if batch * kv_heads * new == 0:
        return
    wrap_triton(_append_kv_kernel)[(new, kv_heads, batch)](
        k_cache, v_cache, k_new, v_new, cache_seqlens,
        *k_cache.stride()[:3], *v_cache.stride()[:3], *k_new.stride()[:3], *v_new.stride()[:3],
        k_cache.shape[2],
        HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=min(triton.next_power_of_2(d), 1024),
        BLOCK_DV=min(triton.next_power_of_2(dv), 1024),
    )
