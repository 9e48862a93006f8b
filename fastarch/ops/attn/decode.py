"""Decoding against a preallocated key/value cache: ``append_kv`` writes the new tokens' keys
and values into the caches, ``attention_decode`` attends the new queries to the filled part.
Both are torch ops (``fastarch::append_kv`` mutates the caches) that ask the registry for a
backend (backends.py)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastarch import registry
from fastarch.ops import dispatch
from fastarch.ops.attn import checks
from fastarch.ops.attn.args import AttentionArgs, AttentionProblem, empty_out
from fastarch.ops.attn.reference import stats_dtype
from fastarch.ops.rows import last_dim_contiguous

# who checks the arguments, in the errors' words (one object for every call)
_DECODE_CALLER = checks.Caller("attention_decode", k="k_cache", v="v_cache")
_APPEND_CALLER = checks.Caller("append_kv", q="k_cache")


@dispatch.custom_op("fastarch::attention_decode", mutates_args=())
def _attention_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, causal: bool, scale: float, window_left: int,
    backend: str = "",
) -> tuple[Tensor, Tensor]:
    if q.numel() == 0 or k_cache.shape[2] == 0:
        return empty_out(q, v_cache).zero_(), q.new_full(q.shape[:-1], float("-inf"), dtype=stats_dtype(q.dtype))
    problem = AttentionProblem.of(q, k_cache, v_cache, AttentionArgs(window_left=window_left), decode=True)
    impl = registry.choose("attention_decode", problem, backend)
    return impl.forward(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left)


@_attention_decode.register_fake
def _(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left, backend=""):
    return empty_out(q, v_cache), q.new_empty(q.shape[:-1], dtype=stats_dtype(q.dtype))


def attention_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    seqlens_checked: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of one (or a few) new query tokens against a preallocated key/value cache.

    q: (B, H, Sq_new, D); k_cache: (B, Hkv, S_max, D); v_cache: (B, Hkv, S_max, Dv);
    cache_seqlens: int32 (B,), how many cache slots of each sequence are filled (the new
    tokens' keys included: append them first with append_kv). Checked to lie in 0 .. S_max for
    CPU tensors; on a GPU the kernels clamp them to it (checking would make the host wait for
    the GPU at every step). With causal (the default), new token i of Sq_new sees the cache up
    to its own position; window: keys at most that far to its left. Returns out
    (B, H, Sq_new, Dv) (and lse (B, H, Sq_new) with return_lse). seqlens_checked: the caller
    vouches that cache_seqlens lie in range (KVCache keeps them so, bounded on the host), so
    they are not read on the host for CPU tensors (the kernels clamp them either way).
    """
    c = _DECODE_CALLER
    checks.check_qkv(c, q, k_cache, v_cache, packed=False)
    cache_seqlens = checks.cache_seqlens(c, cache_seqlens, q.shape[0], k_cache.shape[2], q.device,
                                         values_checked=seqlens_checked)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    checks.check_scale(c, scale)
    window_left, window_right = checks.window(c, window)
    if window_right != -1:
        raise c.value_error(f"window must be an int (keys to the left of each new token), got {window!r}")
    causal = checks.check_flag(c, "causal", causal)
    q, k_cache, v_cache = (last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    out, lse = _attention_decode(
        q, k_cache, v_cache, cache_seqlens, causal, scale, window_left, registry.requested_backend(backend)
    )
    return (out, lse) if return_lse else out


@dispatch.custom_op("fastarch::append_kv", mutates_args=("k_cache", "v_cache"))
def _append_kv(
    k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, cache_seqlens: Tensor, backend: str = ""
) -> None:
    if k_new.numel() == 0 and v_new.numel() == 0:
        return
    problem = AttentionProblem.of(k_new, k_cache, v_cache, decode=True)
    registry.choose("append_kv", problem, backend).forward(k_cache, v_cache, k_new, v_new, cache_seqlens)


@_append_kv.register_fake
def _(k_cache, v_cache, k_new, v_new, cache_seqlens, backend=""):
    return None


def append_kv(
    k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, cache_seqlens: Tensor, *, backend: str | None = None,
    seqlens_checked: bool = False,
) -> None:
    """Writes k_new (B, Hkv, S_new, D) and v_new (B, Hkv, S_new, Dv) into the caches
    (B, Hkv, S_max, D / Dv) in place, at slots cache_seqlens[b] .. cache_seqlens[b] + S_new of
    each sequence. The caller then adds S_new to cache_seqlens. Slots outside the cache are an
    error: a ValueError for CPU tensors, a device-side assert on a GPU (checked there without
    waiting for the GPU). seqlens_checked: the caller vouches that the slots fit (KVCache
    bounds its lengths on the host), so the lengths are neither read nor asserted here (a
    broken promise is the caller's bug; the C++ CPU kernel still refuses such slots and the GPU
    kernels skip them)."""
    c = _APPEND_CALLER
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        checks.tensor(c, t, name)
        if t.dim() != 4:
            raise c.value_error(f"{name} must be 4-D (batch, kv_heads, seq, head_dim), got {tuple(t.shape)}")
    for new, cache, name in ((k_new, k_cache, "k"), (v_new, v_cache, "v")):
        if new.dtype != cache.dtype:
            raise c.type_error(f"{name}_new must have {name}_cache's dtype {cache.dtype}, got {new.dtype}")
        if new.device != cache.device:
            raise c.value_error(f"{name}_new must be on {name}_cache's device {cache.device}, got {new.device}")
        if new.shape[:2] != cache.shape[:2] or new.shape[3] != cache.shape[3]:
            raise c.value_error(
                f"{name}_new {tuple(new.shape)} must match {name}_cache {tuple(cache.shape)} in batch, heads and head dim"
            )
    if v_cache.dtype != k_cache.dtype:
        raise c.type_error(f"v_cache must have k_cache's dtype {k_cache.dtype}, got {v_cache.dtype}")
    if k_cache.shape[:3] != v_cache.shape[:3] or k_cache.device != v_cache.device:
        raise c.value_error(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have the same batch, heads and"
            " slots, on one device"
        )
    if k_new.shape[2] != v_new.shape[2]:
        raise c.value_error(f"k_new and v_new must have the same length, got {k_new.shape[2]} and {v_new.shape[2]}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.shape[3] > 1 and cache.stride(3) != 1:
            raise c.value_error(f"{name} must have a contiguous last dim (it is written in place), got strides {cache.stride()}")
        if any(stride == 0 and size > 1 for stride, size in zip(cache.stride(), cache.shape)):
            raise c.value_error(
                f"{name} must not hold elements that share memory (an expanded tensor?): it is written in place,"
                f" got shape {tuple(cache.shape)} and strides {cache.stride()}"
            )
        if cache.requires_grad and cache.is_leaf and torch.is_grad_enabled():
            raise c.value_error(
                f"{name} is a leaf tensor that requires grad, which append_kv cannot write in place (as torch's"
                " in-place ops refuse); give a cache without requires_grad, or call it under torch.no_grad()"
            )
    k_new, v_new = last_dim_contiguous(k_new), last_dim_contiguous(v_new)
    if k_new.shape[2] > k_cache.shape[2]:
        raise c.value_error(f"k_new's {k_new.shape[2]} tokens do not fit the cache's {k_cache.shape[2]} slots")
    cache_seqlens = checks.cache_seqlens(c, cache_seqlens, k_cache.shape[0], k_cache.shape[2], k_cache.device,
                                         clamped_on_gpu=False, new_tokens=k_new.shape[2],
                                         values_checked=seqlens_checked)
    _append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens, registry.requested_backend(backend))
