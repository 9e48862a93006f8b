"""Fused attention: ``attention`` (causal, grouped-query, variable lengths, sliding window,
masks, dropout) and its torch ops, ``fastarch::attention`` with a fake implementation and
autograd through ``fastarch::attention_backward``. Both ask the registry for a backend
(backends.py) and hand it q, k, v and one AttentionArgs (args.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastarch import registry
from fastarch.ops import dispatch
from fastarch.ops.attn import checks
from fastarch.ops.attn.args import AttentionArgs, AttentionProblem, empty_out
from fastarch.ops.attn.backends import no_work
from fastarch.ops.attn.reference import _M32, stats_dtype
from fastarch.ops.rows import last_dim_contiguous


# ----------------------------------------------------------------------------- the torch ops


@dispatch.custom_op("fastarch::attention", mutates_args=())
def _attention(
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
    seed: Tensor | None,
    backend: str = "",
) -> tuple[Tensor, Tensor]:
    """Kernel-level attention over 4-D views (the fields of AttentionArgs after q, k, v)."""
    args = AttentionArgs(attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                         scale, window_left, window_right, dropout_p, seed)
    if no_work(q, k):  # nothing to compute: zero queries, or no key (zeros, lse -inf)
        return empty_out(q, v).zero_(), q.new_full(q.shape[:-1], float("-inf"), dtype=stats_dtype(q.dtype))
    impl = registry.choose("attention", AttentionProblem.of(q, k, v, args), backend)
    return impl.forward(q, k, v, args)


@_attention.register_fake
def _(q, k, v, *args, **kwargs):
    return empty_out(q, v), q.new_empty(q.shape[:-1], dtype=stats_dtype(q.dtype))


@dispatch.custom_op("fastarch::attention_backward", mutates_args=())
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
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    dropout_p: float,
    seed: Tensor | None,
    backend: str = "",
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of fastarch::attention."""
    args = AttentionArgs(attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                         scale, window_left, window_right, dropout_p, seed)
    if no_work(q, k):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    impl = registry.choose("attention", AttentionProblem.of(q, k, v, args), backend)
    return impl.backward(dout, q, k, v, out, lse, args)


@_attention_backward.register_fake
def _(dout, q, k, v, out, lse, *args, **kwargs):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, *fields, backend = inputs
    args = AttentionArgs(*fields)
    ctx.save_for_backward(q, k, v, *output, *args.tensors())
    ctx.scalars, ctx.backend = args.scalars(), backend


def _attention_grad(ctx, dout, dlse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    args = AttentionArgs.from_parts(tensors, ctx.scalars)
    dq, dk, dv = _attention_backward(last_dim_contiguous(dout), q, k, v, out, lse, *args.fields(), ctx.backend)
    return (dq, dk, dv) + (None,) * (len(args.fields()) + 1)


_attention.register_autograd(_attention_grad, setup_context=_attention_setup)


def draw_seed(generator: torch.Generator | None) -> Tensor:
    """An int64 scalar seed on the CPU for the dropout hash: the same generator state gives
    the same seed. From ``generator`` (default: torch's default CPU generator, which
    torch.manual_seed seeds). A CUDA generator's state (seed, offset) is held on the host: it
    is read and advanced there, so drawing never waits for the GPU."""
    if generator is not None and generator.device.type != "cpu":
        offset = generator.get_offset()
        generator.set_offset(offset + 4)
        initial = generator.initial_seed()
        value = ((initial ^ (initial >> 32)) ^ (offset * 0x9E3779B9)) & _M32
        return torch.tensor(value, dtype=torch.int64)
    return torch.randint(0, 2**32, (), generator=generator, dtype=torch.int64)


# ----------------------------------------------------------------------------- the public op

# who checks the arguments, in the errors' words (one object for every call)
_CALLER = checks.Caller("attention")


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
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
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
    (total_k, Hkv, D), cu_seqlens_q / cu_seqlens_k int32 (N + 1,) offsets, and
    max_seqlen_q / max_seqlen_k the longest sequences. Give them for CUDA tensors: computing
    them would make the host wait for the GPU, so without them the kernels size their grids by
    the packed lengths (correct, with idle programs). On the CPU they are computed.

    - causal: query i sees keys j <= i + Sk - Sq, aligned bottom-right (the last query sees
      every key, as in KV-cache decoding and FlashAttention; torch's is_causal is top-left).
    - window: sliding-window attention: an int w lets query i see keys down to
      i + Sk - Sq - w; a pair (left, right) bounds both sides (-1: unbounded).
    - attn_mask: bool (True = attend) or float added to the scores, of q's dtype,
      broadcastable to (B, H, Sq, Sk); it gets no gradient (one that requires grad is refused
      in grad mode). key_padding_mask: bool (B, Sk), True = a real key.
    - dropout_p: dropout on the attention probabilities, the mask drawn from ``generator``
      (the same generator state gives the same mask; the backward reuses it). dropout_p = 1
      drops everything: zeros.
    - scale: default 1 / sqrt(D). A query that sees no key gets zeros (and no gradient).

    Returns out (B, H, Sq, Dv) in q's layout (packed: (total_q, H, Dv)), and with return_lse
    also lse (B, H, Sq) (packed: (H, total_q)), fp32: the log-sum-exp of the scaled scores.
    backend: force "cuda", "cpu", "triton" or "reference" (see fastarch.backend).
    """
    c = _CALLER
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    checks.check_qkv(c, q, k, v, packed)
    max_q = max_k = 0
    if packed:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise c.value_error("packed sequences need both cu_seqlens_q and cu_seqlens_k")
        cu_seqlens_q, max_q = checks.cu_seqlens(c, "cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q.device)
        cu_seqlens_k, max_k = checks.cu_seqlens(c, "cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q.device)
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise c.value_error(
                f"cu_seqlens_q and cu_seqlens_k must hold the same number of sequences, got"
                f" {cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}"
            )
        if attn_mask is not None or key_padding_mask is not None:
            raise c.value_error("attn_mask and key_padding_mask are not supported with packed sequences")
        q4, k4, v4 = (t.permute(1, 0, 2).unsqueeze(0) for t in (q, k, v))
    else:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise c.value_error(
                "max_seqlen_q and max_seqlen_k go with packed sequences (cu_seqlens_q, cu_seqlens_k), got"
                f" max_seqlen_q={max_seqlen_q!r}, max_seqlen_k={max_seqlen_k!r} without them"
            )
        q4, k4, v4 = q, k, v
    q4, k4, v4 = (last_dim_contiguous(t) for t in (q4, k4, v4))
    B, H, Sq, D = q4.shape
    Sk = k4.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    checks.check_scale(c, scale)
    if not isinstance(scale, torch.SymFloat):
        scale = float(scale)
    window_left, window_right = checks.window(c, window)
    checks.check_dropout(c, dropout_p)
    checks.check_generator(c, generator)
    causal = checks.check_flag(c, "causal", causal)
    drop_all = dropout_p == 1
    if drop_all:
        dropout_p = 0.0  # every probability dropped: the output is 0 x the undropped one (NaN stays NaN)
    if not isinstance(dropout_p, torch.SymFloat):
        dropout_p = float(dropout_p)
    args = AttentionArgs(
        attn_mask=checks.attn_mask(c, attn_mask, q, (B, H, Sq, Sk)),
        key_padding_mask=checks.key_padding_mask(c, key_padding_mask, B, Sk, q.device),
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        causal=causal,
        scale=scale,
        window_left=window_left,
        window_right=window_right,
        dropout_p=dropout_p,
        seed=draw_seed(generator) if dropout_p > 0 else None,
    )
    out, lse = _attention(q4, k4, v4, *args.fields(), registry.requested_backend(backend))
    if drop_all:
        out = out * 0
    if packed:
        out, lse = out[0].permute(1, 0, 2), lse[0]
    return (out, lse) if return_lse else out
