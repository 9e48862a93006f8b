"""Input checks of the attention ops. Each raises an error that names the argument (as the
caller spelled it) and what was expected: ValueError / TypeError for fastarch's own ops, or
RuntimeError where the op stands in for torch's function (scaled_dot_product_attention), whose
callers catch what torch raises.

Values that only a GPU holds (cu_seqlens offsets, cache_seqlens) are checked on the host for
CPU tensors only; reading them on a GPU would make the host wait for it at every call. There
they are asserted on the device instead (torch._assert_async: no wait; a failure surfaces as a
CUDA error) or clamped by the kernels (see attention_decode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastarch.finite import FLOAT_MAX

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Caller:
    """Who is checking: the op's name in messages, the names the caller gave q, k and v, and
    whether every error is a RuntimeError (torch's functions) or a ValueError / TypeError."""

    op: str
    q: str = "q"
    k: str = "k"
    v: str = "v"
    torch_errors: bool = False

    def value_error(self, message: str) -> Exception:
        return (RuntimeError if self.torch_errors else ValueError)(f"fastarch.{self.op}: {message}")

    def type_error(self, message: str) -> Exception:
        return (RuntimeError if self.torch_errors else TypeError)(f"fastarch.{self.op}: {message}")


def tensor(c: Caller, t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise c.type_error(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_qkv(c: Caller, q: Tensor, k: Tensor, v: Tensor, packed: bool) -> None:
    """Shapes, dtypes and devices of q, k, v: (B, H, S, D) each, or (total, H, D) when packed.
    Head dims of any size >= 1 (each backend says which it runs); zero heads or rows are fine."""
    names = {"q": c.q, "k": c.k, "v": c.v}
    for key, t in (("q", q), ("k", k), ("v", v)):
        name = names[key]
        tensor(c, t, name)
        if t.dtype not in FLOAT_DTYPES:
            raise c.type_error(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        rank = 3 if packed else 4
        if t.dim() != rank:
            layout = "(total, heads, head_dim) with cu_seqlens" if packed else "(batch, heads, seq, head_dim)"
            raise c.value_error(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    for key, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise c.type_error(f"{names[key]} must have {c.q}'s dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise c.value_error(f"{names[key]} must be on {c.q}'s device {q.device}, got {t.device}")
    head = -2 if packed else -3
    seq = -3 if packed else -2
    if not packed and not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise c.value_error(
            f"{c.q}, {c.k} and {c.v} must have the same batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}"
        )
    if k.shape[head] != v.shape[head]:
        raise c.value_error(f"{c.k} and {c.v} must have the same number of heads, got {k.shape[head]} and {v.shape[head]}")
    if k.shape[seq] != v.shape[seq]:
        raise c.value_error(f"{c.k} and {c.v} must have the same sequence length, got {k.shape[seq]} and {v.shape[seq]}")
    heads, kv_heads = q.shape[head], k.shape[head]
    if (kv_heads == 0) != (heads == 0) or (kv_heads > 0 and heads % kv_heads != 0):
        raise c.value_error(
            f"{c.q}'s {heads} heads must be a multiple of {c.k}'s and {c.v}'s {kv_heads} heads (grouped-query attention)"
        )
    if q.shape[-1] != k.shape[-1]:
        raise c.value_error(f"{c.q} and {c.k} must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    for key, t in (("q", q), ("v", v)):
        if t.shape[-1] < 1:
            raise c.value_error(f"{names[key]}'s head dim must be at least 1, got {t.shape[-1]}")


def check_scale(c: Caller, scale: object) -> None:
    """A finite float. (Compared rather than math.isfinite: torch.compile with dynamic=True
    traces floats derived from shapes as symbols, which compare but have no isfinite.)"""
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float, torch.SymFloat))
        or not -FLOAT_MAX <= scale <= FLOAT_MAX  # (an int past the float range is not one)
    ):
        raise c.value_error(f"scale must be a finite float, got {scale!r}")


def check_flag(c: Caller, name: str, value: object) -> bool:
    """A bool (or 0 / 1, numpy's bool, a traced SymBool), as a bool: a string or a tensor is
    refused rather than read by its truth ("no" would mean True)."""
    if isinstance(value, torch.SymBool):
        return value
    if isinstance(value, bool) or type(value).__name__ == "bool_" or (type(value) is int and value in (0, 1)):
        return bool(value)
    raise c.type_error(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


def check_generator(c: Caller, generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise c.type_error(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def check_dropout(c: Caller, dropout_p: object) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float, torch.SymFloat)) or not 0.0 <= dropout_p <= 1.0:
        raise c.value_error(f"dropout_p must be in [0, 1], got {dropout_p!r}")


def window(c: Caller, window: object) -> tuple[int, int]:
    """window -> (left, right), -1 meaning unbounded. An int is the left window size (with
    causal, the right side is closed by causality); a pair is (left, right) as FlashAttention's
    window_size."""
    if window is None:
        return -1, -1
    if isinstance(window, int) and not isinstance(window, bool):
        if not 0 <= window <= _INT64_MAX:
            raise c.value_error(f"window must be an int in [0, 2**63) (keys to the left of the diagonal), got {window}")
        return window, -1
    if (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and all(isinstance(w, int) and not isinstance(w, bool) and -1 <= w <= _INT64_MAX for w in window)
    ):
        return int(window[0]), int(window[1])
    raise c.value_error(f"window must be an int >= 0 or a pair (left, right) of ints >= -1 (below 2**63), got {window!r}")


def attn_mask(c: Caller, mask: Tensor | None, q: Tensor, shape: tuple[int, int, int, int]) -> Tensor | None:
    """A bool (True = attend) or float (added to the scores) mask broadcastable to
    (B, H, Sq, Sk), as an additive mask of q's dtype expanded to that shape (a view)."""
    if mask is None:
        return None
    tensor(c, mask, "attn_mask")
    if mask.dtype != torch.bool and mask.dtype != q.dtype:
        raise c.type_error(f"attn_mask must be bool or have {c.q}'s dtype {q.dtype}, got {mask.dtype}")
    if mask.device != q.device:
        raise c.value_error(f"attn_mask must be on {c.q}'s device {q.device}, got {mask.device}")
    if mask.requires_grad and torch.is_grad_enabled():
        raise c.value_error(
            "attn_mask requires grad, but fastarch's attention gives the mask no gradient (as FlashAttention);"
            " pass attn_mask.detach() to leave it untrained, or run torch's scaled_dot_product_attention for a"
            " learned bias (fastarch.sdpa_override hands such calls to it)"
        )
    m = tuple(mask.shape)
    if len(m) > 4 or any(a not in (1, b) for a, b in zip(m[::-1], shape[::-1])):
        raise c.value_error(f"attn_mask of shape {m} does not broadcast to (batch, heads, Sq, Sk) = {shape}")
    if mask.dtype == torch.bool:
        mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    return mask.reshape((1,) * (4 - len(m)) + m).expand(shape)


def key_padding_mask(c: Caller, kpm: Tensor | None, batch: int, sk: int, device) -> Tensor | None:
    if kpm is None:
        return None
    tensor(c, kpm, "key_padding_mask")
    if kpm.dtype != torch.bool or tuple(kpm.shape) != (batch, sk):
        raise c.value_error(
            f"key_padding_mask must be bool of shape (batch, Sk) = {(batch, sk)} (True = a real key),"
            f" got {kpm.dtype} of shape {tuple(kpm.shape)}"
        )
    if kpm.device != device:
        raise c.value_error(f"key_padding_mask must be on {c.q}'s device {device}, got {kpm.device}")
    return kpm.contiguous()  # (the Triton kernels index it by its batch stride alone)


def cu_seqlens(c: Caller, name: str, cu: Tensor, total: int, max_seqlen: int | None, device) -> tuple[Tensor, int]:
    """Checks packed offsets (int32 (N + 1,), rising from 0 to ``total``) and returns them
    contiguous (the kernels index them as an array) with the longest sequence: ``max_seqlen``
    when the caller gave it, else computed from the offsets on the CPU, and ``total`` (a bound
    that costs no wait) on a GPU."""
    tensor(c, cu, name)
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise c.value_error(f"{name} must be a 1-D int32 tensor of N + 1 offsets, got {cu.dtype} of shape {tuple(cu.shape)}")
    if cu.device != device:
        raise c.value_error(f"{name} must be on {c.q}'s device {device}, got {cu.device}")
    max_name = name.replace("cu_seqlens", "max_seqlen")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise c.value_error(f"{max_name} must be an int >= 0, got {max_seqlen!r}")
    cu = cu.contiguous()
    if torch.compiler.is_compiling():
        return cu, total if max_seqlen is None else max_seqlen
    why = f"{name} must rise from 0 to the packed length {total}"
    if cu.device.type == "cpu":
        offsets = cu.tolist()
        if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise c.value_error(f"{why}, got {offsets[:8]}{'...' if len(offsets) > 8 else ''}")
        longest = max(b - a for a, b in zip(offsets, offsets[1:]))
        if max_seqlen is not None and max_seqlen < longest:
            raise c.value_error(f"{max_name} is {max_seqlen}, but {name} holds a sequence of {longest}")
        return cu, longest if max_seqlen is None else max_seqlen
    lengths = cu[1:] - cu[:-1]
    ok = (cu[0] == 0) & (cu[-1] == total) & (lengths >= 0).all()
    torch._assert_async(ok, f"fastarch.{c.op}: {why}")
    if max_seqlen is None:
        return cu, total
    torch._assert_async((lengths <= max_seqlen).all(), f"fastarch.{c.op}: {name} holds a sequence longer than {max_name}")
    return cu, max_seqlen


def cache_seqlens(c: Caller, lens: Tensor, batch: int, capacity: int, device, clamped_on_gpu: bool = True,
                  new_tokens: int = 0, values_checked: bool = False) -> Tensor:
    """int32 (batch,), each in 0 .. capacity - new_tokens: checked on the host for CPU tensors;
    on a GPU clamped by the decode kernels, or (clamped_on_gpu=False, for what writes) asserted
    on the device. values_checked: the caller vouches for the values (fastarch's KVCache, which
    bounds them on the host), so they are not read. Returns them contiguous (the kernels index
    them as an array)."""
    tensor(c, lens, "cache_seqlens")
    if lens.dtype != torch.int32 or tuple(lens.shape) != (batch,):
        raise c.value_error(
            f"cache_seqlens must be int32 of shape (batch,) = ({batch},), got {lens.dtype} of shape {tuple(lens.shape)}"
        )
    if lens.device != device:
        raise c.value_error(f"cache_seqlens must be on {c.q}'s device {device}, got {lens.device}")
    lens = lens.contiguous()
    if values_checked or torch.compiler.is_compiling() or batch == 0:
        return lens
    top = capacity - new_tokens
    why = (f"cache_seqlens must be between 0 and {top}: the cache's {capacity} slots less the {new_tokens} new tokens"
           if new_tokens else f"cache_seqlens must be between 0 and the cache's {capacity} slots")
    if lens.device.type == "cpu":
        values = lens.tolist()  # one read (a min and a max would be two reductions and two reads)
        lo, hi = min(values), max(values)
        if lo < 0 or hi > top:
            raise c.value_error(f"{why}, got {lo}..{hi}")
    elif not clamped_on_gpu:
        torch._assert_async(((lens >= 0) & (lens <= top)).all(), f"fastarch.{c.op}: {why}")
    return lens

