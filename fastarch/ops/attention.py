"""Fused multi-head attention: ``attention`` (causal, grouped-query, variable lengths,
sliding window, masks, dropout), ``scaled_dot_product_attention`` (torch's signature and
semantics), ``attention_decode`` against a key/value cache, and ``append_kv``.

``attention`` and ``attention_decode`` are torch ops in the ``fastarch`` namespace with fake
implementations (``attention`` with autograd through ``fastarch::attention_backward``); their
implementations ask the registry for a backend (see attention_backends.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastarch import registry
from fastarch.ops import attention_backends  # noqa: F401  (the reference backend)
from fastarch.ops import attention_cpu, attention_cuda, attention_triton  # noqa: F401  (the kernel backends)
from fastarch.ops.attention_backends import AttentionProblem, empty_out
from fastarch.ops.attention_reference import stats_dtype

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 512


# ----------------------------------------------------------------------------- input checks


def _tensor(t: object, name: str, op: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"fastarch.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor, packed: bool) -> None:
    """Shapes, dtypes and devices of q, k, v: (B, H, S, D) each, or (total, H, D) when packed."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(t, name, op)
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"fastarch.{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        rank = 3 if packed else 4
        if t.dim() != rank:
            layout = "(total, heads, head_dim) with cu_seqlens" if packed else "(batch, heads, seq, head_dim)"
            raise ValueError(f"fastarch.{op}: {name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"fastarch.{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"fastarch.{op}: {name} must be on q's device {q.device}, got {t.device}")
    head = -3 if not packed else -2
    seq = -2 if not packed else -3
    if not packed and not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"fastarch.{op}: q, k and v must have the same batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[head] != v.shape[head]:
        raise ValueError(f"fastarch.{op}: k and v must have the same number of heads, got {k.shape[head]} and {v.shape[head]}")
    if k.shape[seq] != v.shape[seq]:
        raise ValueError(f"fastarch.{op}: k and v must have the same sequence length, got {k.shape[seq]} and {v.shape[seq]}")
    heads, kv_heads = q.shape[head], k.shape[head]
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(
            f"fastarch.{op}: q's {heads} heads must be a multiple of k's and v's {kv_heads} heads (grouped-query attention)"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"fastarch.{op}: q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    for name, t in (("q", q), ("v", v)):
        if not 1 <= t.shape[-1] <= MAX_HEAD_DIM:
            raise ValueError(f"fastarch.{op}: {name}'s head dim must be between 1 and {MAX_HEAD_DIM}, got {t.shape[-1]}")


def _check_scale(op: str, scale: object) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"fastarch.{op}: scale must be a finite float, got {scale!r}")


def _window(op: str, window: object, causal: bool) -> tuple[int, int]:
    """window -> (left, right), -1 meaning unbounded. An int is the left window size (with
    causal, the right side is closed by causality); a pair is (left, right) as FlashAttention's
    window_size."""
    if window is None:
        return -1, -1
    if isinstance(window, int) and not isinstance(window, bool):
        if window < 0:
            raise ValueError(f"fastarch.{op}: window must be >= 0 (keys to the left of the diagonal), got {window}")
        return window, -1
    if (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)
    ):
        return int(window[0]), int(window[1])
    raise ValueError(f"fastarch.{op}: window must be an int >= 0 or a pair (left, right) of ints >= -1, got {window!r}")


def _attn_mask(op: str, attn_mask: Tensor | None, q: Tensor, shape: tuple[int, int, int, int]) -> Tensor | None:
    """A bool (True = attend) or float (added to the scores) mask broadcastable to
    (B, H, Sq, Sk), as an additive mask of q's dtype expanded to that shape (a view)."""
    if attn_mask is None:
        return None
    _tensor(attn_mask, "attn_mask", op)
    if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        raise TypeError(f"fastarch.{op}: attn_mask must be bool or have q's dtype {q.dtype}, got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"fastarch.{op}: attn_mask must be on q's device {q.device}, got {attn_mask.device}")
    m = tuple(attn_mask.shape)
    if len(m) > 4 or any(a not in (1, b) for a, b in zip(m[::-1], shape[::-1])):
        raise ValueError(
            f"fastarch.{op}: attn_mask of shape {m} does not broadcast to (batch, heads, Sq, Sk) = {shape}"
        )
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
    return attn_mask.reshape((1,) * (4 - len(m)) + m).expand(shape)


def _key_padding_mask(op: str, kpm: Tensor | None, batch: int, sk: int, device) -> Tensor | None:
    if kpm is None:
        return None
    _tensor(kpm, "key_padding_mask", op)
    if kpm.dtype != torch.bool or tuple(kpm.shape) != (batch, sk):
        raise ValueError(
            f"fastarch.{op}: key_padding_mask must be bool of shape (batch, Sk) = {(batch, sk)} (True = a real key),"
            f" got {kpm.dtype} of shape {tuple(kpm.shape)}"
        )
    if kpm.device != device:
        raise ValueError(f"fastarch.{op}: key_padding_mask must be on q's device {device}, got {kpm.device}")
    return kpm


def _cu_seqlens(op: str, name: str, cu: Tensor, total: int, device) -> None:
    _tensor(cu, name, op)
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"fastarch.{op}: {name} must be a 1-D int32 tensor of N + 1 offsets, got {cu.dtype} of shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"fastarch.{op}: {name} must be on q's device {device}, got {cu.device}")
    if not torch.compiler.is_compiling():
        offsets = cu.tolist()
        if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(
                f"fastarch.{op}: {name} must rise from 0 to the packed length {total}, got {offsets[:8]}{'...' if len(offsets) > 8 else ''}"
            )


# ----------------------------------------------------------------------------- the ops


def _problem(q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, window_left, window_right, dropout_p):
    return AttentionProblem.of(q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, dropout_p, window_left, window_right)


@torch.library.custom_op("fastarch::attention", mutates_args=())
def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    dropout_p: float,
    seed: Tensor | None,
    backend: str = "",
) -> tuple[Tensor, Tensor]:
    """Kernel-level attention (4-D views, additive mask; see attention_backends.py)."""
    problem = _problem(q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, window_left, window_right, dropout_p)
    impl = registry.choose("attention", problem, backend)
    return impl.forward(
        q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal, scale, window_left, window_right,
        dropout_p, seed,
    )


@_attention.register_fake
def _(q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal, scale, window_left, window_right,
      dropout_p, seed, backend=""):
    return empty_out(q, v), q.new_empty(q.shape[:-1], dtype=stats_dtype(q.dtype))


@torch.library.custom_op("fastarch::attention_backward", mutates_args=())
def _attention_backward(
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
    causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    dropout_p: float,
    seed: Tensor | None,
    backend: str = "",
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of fastarch::attention."""
    problem = _problem(q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, window_left, window_right, dropout_p)
    impl = registry.choose("attention", problem, backend)
    return impl.backward(
        dout, q, k, v, out, lse, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal, scale, window_left,
        window_right, dropout_p, seed,
    )


@_attention_backward.register_fake
def _(dout, q, k, v, out, lse, *args, **kwargs):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, attn_mask, kpm, cu_q, cu_k, causal, scale, wl, wr, dropout_p, seed, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, kpm, cu_q, cu_k, seed)
    ctx.options = (causal, scale, wl, wr, dropout_p)
    ctx.backend = backend


def _attention_grad(ctx, dout, dlse):
    q, k, v, out, lse, attn_mask, kpm, cu_q, cu_k, seed = ctx.saved_tensors
    causal, scale, wl, wr, dropout_p = ctx.options
    dq, dk, dv = _attention_backward(
        dout.contiguous() if dout.stride(-1) != 1 else dout, q, k, v, out, lse, attn_mask, kpm, cu_q, cu_k, causal,
        scale, wl, wr, dropout_p, seed, ctx.backend,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


_attention.register_autograd(_attention_grad, setup_context=_attention_setup)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _draw_seed(generator: torch.Generator | None, device) -> Tensor:
    """An int64 scalar seed on the CPU for the dropout hash, drawn from ``generator`` (or the
    default CPU generator): the same generator state gives the same dropout mask."""
    where = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**32, (), generator=generator, dtype=torch.int64, device=where).cpu()


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    window: int | tuple[int, int] | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention, never materializing the Sq x Sk scores in a kernel.

    q: (B, H, Sq, D); k: (B, Hkv, Sk, D); v: (B, Hkv, Sk, Dv), H a multiple of Hkv (grouped- or
    multi-query attention reads each k/v head for its H // Hkv query heads, without copies).
    Packed variable lengths (FlashAttention's varlen layout): q (total_q, H, D), k and v
    (total_k, Hkv, D), cu_seqlens_q / cu_seqlens_k int32 (N + 1,) offsets.

    - causal: query i sees keys j <= i + Sk - Sq, aligned bottom-right (the last query sees
      every key, as in KV-cache decoding and FlashAttention; torch's is_causal is top-left).
    - window: sliding-window attention: an int w lets query i see keys down to
      i + Sk - Sq - w; a pair (left, right) bounds both sides (-1: unbounded).
    - attn_mask: bool (True = attend) or float added to the scores, of q's dtype,
      broadcastable to (B, H, Sq, Sk). key_padding_mask: bool (B, Sk), True = a real key.
    - dropout_p: dropout on the attention probabilities, the mask drawn from ``generator``
      (the same generator state gives the same mask; the backward reuses it).
    - scale: default 1 / sqrt(D). A query that sees no key gets zeros (and no gradient).

    Returns out (B, H, Sq, Dv) in q's layout (packed: (total_q, H, Dv)), and with return_lse
    also lse (B, H, Sq) (packed: (H, total_q)), fp32: the log-sum-exp of the scaled scores.
    backend: force "cuda", "cpu", "triton" or "reference" (see fastarch.backend).
    """
    op = "attention"
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    _check_qkv(op, q, k, v, packed)
    if packed:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError(f"fastarch.{op}: packed sequences need both cu_seqlens_q and cu_seqlens_k")
        _cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
        _cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(
                f"fastarch.{op}: cu_seqlens_q and cu_seqlens_k must hold the same number of sequences, got"
                f" {cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}"
            )
        if attn_mask is not None or key_padding_mask is not None:
            raise ValueError(f"fastarch.{op}: attn_mask and key_padding_mask are not supported with packed sequences")
        q4, k4, v4 = (t.permute(1, 0, 2).unsqueeze(0) for t in (q, k, v))
    else:
        q4, k4, v4 = q, k, v
    q4, k4, v4 = (_last_dim_contiguous(t) for t in (q4, k4, v4))
    B, H, Sq, D = q4.shape
    Sk = k4.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    _check_scale(op, scale)
    window_left, window_right = _window(op, window, causal)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fastarch.{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    mask = _attn_mask(op, attn_mask, q, (B, H, Sq, Sk))
    kpm = _key_padding_mask(op, key_padding_mask, B, Sk, q.device)
    seed = _draw_seed(generator, q.device) if dropout_p > 0 else None
    out, lse = _attention(
        q4, k4, v4, mask, kpm, cu_seqlens_q, cu_seqlens_k, bool(causal), float(scale), window_left, window_right,
        float(dropout_p), seed, registry.requested_backend(backend),
    )
    if packed:
        out, lse = out[0].permute(1, 0, 2), lse[0]
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- torch's SDPA


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, on fastarch's kernels.

    Same signature and semantics: query (..., L, E), key (..., S, E), value (..., S, Ev), any
    number of leading dims (heads at dim -3 for enable_gqa); is_causal is top-left aligned;
    a bool attn_mask is True where attention is allowed. Dropout draws its mask from torch's
    default generator (the mask differs from torch's; the distribution is the same).
    """
    op = "scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        _tensor(t, name, op)
        if t.dim() < 2:
            raise ValueError(f"fastarch.{op}: {name} must have at least 2 dims (..., seq, dim), got {tuple(t.shape)}")
    if is_causal and attn_mask is not None:
        raise ValueError(f"fastarch.{op}: attn_mask must be None when is_causal=True (as in torch)")
    lead = query.shape[:-2]
    L, S = query.shape[-2], key.shape[-2]

    def four_d(t: Tensor) -> Tensor:
        if t.dim() == 4:
            return t
        if t.dim() < 4:
            return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
        return t.reshape(-1, *t.shape[-3:])

    q, k, v = four_d(query), four_d(key), four_d(value)
    if q.shape[1] != k.shape[1] and not enable_gqa:
        raise ValueError(
            f"fastarch.{op}: query has {q.shape[1]} heads and key {k.shape[1]}; pass enable_gqa=True for grouped-query attention"
        )
    if attn_mask is not None and attn_mask.dim() > 4:
        attn_mask = attn_mask.reshape(-1, *attn_mask.shape[-3:])
    if not is_causal or L <= S:
        # top-left causal over S >= L keys is bottom-right causal over the first L keys
        k_used, v_used = (k[:, :, :L], v[:, :, :L]) if is_causal and L < S else (k, v)
        out = attention(
            q, k_used, v_used, causal=is_causal, scale=scale, attn_mask=attn_mask, dropout_p=dropout_p
        )
    else:
        # L > S: the first S queries are causal (a square), the rest see every key
        head = attention(q[:, :, :S], k, v, causal=True, scale=scale, dropout_p=dropout_p)
        tail = attention(q[:, :, S:], k, v, causal=False, scale=scale, dropout_p=dropout_p)
        out = torch.cat([head, tail], dim=2)
    return out.reshape(*lead, L, value.shape[-1])


# ----------------------------------------------------------------------------- decoding


@torch.library.custom_op("fastarch::attention_decode", mutates_args=())
def _attention_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, causal: bool, scale: float, window_left: int,
    backend: str = "",
) -> tuple[Tensor, Tensor]:
    problem = AttentionProblem.of(q, k_cache, v_cache, window_left=window_left, decode=True)
    impl = registry.choose("attention_decode", problem, backend)
    return impl.forward(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left)


@_attention_decode.register_fake
def _(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left, backend=""):
    return empty_out(q, v_cache), q.new_empty(q.shape[:-1], dtype=stats_dtype(q.dtype))


def _check_cache_seqlens(
    op: str, cache_seqlens: Tensor, batch: int, capacity: int, device, clamped_on_gpu: bool = True
) -> None:
    _tensor(cache_seqlens, "cache_seqlens", op)
    if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(
            f"fastarch.{op}: cache_seqlens must be int32 of shape (batch,) = ({batch},), got"
            f" {cache_seqlens.dtype} of shape {tuple(cache_seqlens.shape)}"
        )
    if cache_seqlens.device != device:
        raise ValueError(f"fastarch.{op}: cache_seqlens must be on q's device {device}, got {cache_seqlens.device}")
    # The values are checked on the host where that is free: reading a GPU tensor's values
    # would make the host wait for the GPU at every decoding step. There the decode kernels
    # clamp them to the cache (0 .. S_max) instead, so a wrong length cannot read outside it;
    # what would write outside it (append_kv) asserts on the device, as PyTorch's indexing does.
    if torch.compiler.is_compiling():
        return
    why = f"fastarch.{op}: cache_seqlens must be between 0 and the cache's {capacity} slots"
    if cache_seqlens.device.type == "cpu":
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0 or hi > capacity:
            raise ValueError(f"{why}, got {lo}..{hi}")
    elif not clamped_on_gpu:
        torch._assert_async(((cache_seqlens >= 0) & (cache_seqlens <= capacity)).all(), why)


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
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of one (or a few) new query tokens against a preallocated key/value cache.

    q: (B, H, Sq_new, D); k_cache: (B, Hkv, S_max, D); v_cache: (B, Hkv, S_max, Dv);
    cache_seqlens: int32 (B,), how many cache slots of each sequence are filled (the new
    tokens' keys included: append them first with append_kv); checked to lie in 0 .. S_max on
    the CPU, clamped to it by the GPU kernels (checking there would synchronize every step). With causal (the default),
    new token i of Sq_new sees the cache up to its own position; window: keys at most that far
    to its left. Returns out (B, H, Sq_new, Dv) (and lse (B, H, Sq_new) with return_lse).
    """
    op = "attention_decode"
    _check_qkv(op, q, k_cache, v_cache, packed=False)
    _check_cache_seqlens(op, cache_seqlens, q.shape[0], k_cache.shape[2], q.device)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    _check_scale(op, scale)
    window_left, _ = _window(op, window, causal)
    q, k_cache, v_cache = (_last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    out, lse = _attention_decode(
        q, k_cache, v_cache, cache_seqlens, bool(causal), float(scale), window_left, registry.requested_backend(backend)
    )
    return (out, lse) if return_lse else out


@torch.library.custom_op("fastarch::append_kv", mutates_args=("k_cache", "v_cache"))
def _append_kv(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, cache_seqlens: Tensor) -> None:
    batch, _, new, _ = k_new.shape
    positions = cache_seqlens.long()[:, None] + torch.arange(new, device=k_new.device)  # (B, new)
    rows = torch.arange(batch, device=k_new.device)[:, None].expand(batch, new)
    # advanced indexing on dims 0 and 2 puts the indexed dims first: (B, new, Hkv, D)
    k_cache[rows, :, positions] = k_new.transpose(1, 2)
    v_cache[rows, :, positions] = v_new.transpose(1, 2)


@_append_kv.register_fake
def _(k_cache, v_cache, k_new, v_new, cache_seqlens):
    return None


def append_kv(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, cache_seqlens: Tensor) -> None:
    """Writes k_new, v_new (B, Hkv, S_new, D) into the caches (B, Hkv, S_max, D) in place, at
    slots cache_seqlens[b] .. cache_seqlens[b] + S_new of each sequence. The caller then adds
    S_new to cache_seqlens. Slots outside the cache are an error: a ValueError for CPU tensors,
    a device-side assert on a GPU (checked there without waiting for the GPU)."""
    op = "append_kv"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        _tensor(t, name, op)
        if t.dim() != 4:
            raise ValueError(f"fastarch.{op}: {name} must be 4-D (batch, kv_heads, seq, head_dim), got {tuple(t.shape)}")
    for new, cache, name in ((k_new, k_cache, "k"), (v_new, v_cache, "v")):
        if new.dtype != cache.dtype or new.device != cache.device:
            raise TypeError(f"fastarch.{op}: {name}_new must have {name}_cache's dtype and device")
        if new.shape[:2] != cache.shape[:2] or new.shape[3] != cache.shape[3]:
            raise ValueError(
                f"fastarch.{op}: {name}_new {tuple(new.shape)} must match {name}_cache {tuple(cache.shape)} in batch, heads and head dim"
            )
    if k_new.shape[2] != v_new.shape[2]:
        raise ValueError(f"fastarch.{op}: k_new and v_new must have the same length, got {k_new.shape[2]} and {v_new.shape[2]}")
    capacity = k_cache.shape[2] - k_new.shape[2]
    _check_cache_seqlens(op, cache_seqlens, k_cache.shape[0], capacity, k_cache.device, clamped_on_gpu=False)
    _append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens)
