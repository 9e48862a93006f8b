"""Triton kernels of group_norm, forward and backward, and their launchers.

x is (N, C, S) (NCHW memory, CHANNELS_LAST false) or (N, S, C) (channels-last memory); group g
of sample n is the Cg = C / G channels g*Cg ... and all S positions. Every kernel views a group
as a (Cg, S) tile grid addressed through CHANNELS_LAST, so that the contiguous axis of either
layout is the tile's contiguous axis (s for NCHW, c for channels-last).

A group's reduction is split over SPLIT programs, each owning the positions
[k * s_per, (k + 1) * s_per) of every channel of the group: at N = 1, G = 32 a GPU needs
hundreds of programs, and one program per group would use 32 SMs. Two kernels per direction:
- forward: partial statistics (count is implied, mean and M2 of the program's slice, combined
  over its tiles by Chan's formula, robust where mean >> std), then combine + apply: every
  program combines its group's SPLIT partials (a few values, in a fixed order) and normalizes
  its own slice, with weight/bias, scale/shift and SiLU folded into one multiply-add per element;
- backward: partial sums (per channel: dshift, dscale, dbias, dweight; per group: the two
  sums dx needs), then dx. dweight/dbias/dscale/dshift are the partials summed on the host by
  torch in a fixed order: deterministic, no atomics.
Statistics and accumulation are fp32.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastarch.kernels.launch import wrap_triton

# Elements per tile (fp32 registers of one program; larger tiles also mean fewer interpreted
# iterations under TRITON_INTERPRET=1).
TILE = 2048
# Splitting a group: aim for this many programs per SM, each with at least MIN_SLICE elements
# (below that the combine and launch overheads dominate).
PROGRAMS_PER_SM = 4
MIN_SLICE = 2048
# The interpreter: few programs, but split even small groups so that tests cover the combine.
INTERPRETER_PROGRAMS = 64
INTERPRETER_MIN_SLICE = 16
# Triton's CPU interpreter truncates fp32 -> bf16 casts; the kernels then round by hand.
ROUND_BF16_BY_HAND = os.environ.get("TRITON_INTERPRET") == "1"
# Constants the kernels read (globals a kernel uses must be constexpr).
FP32_MAX = tl.constexpr(3.4028234663852886e38)  # the largest finite fp32


@triton.jit
def _cast(y, dtype: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
    """y (fp32) rounded to nearest even in dtype, as on the GPU."""
    if ROUND_BY_HAND and dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # NaN and inf survive
        y = bits.to(tl.float32, bitcast=True)
    return y.to(dtype)


@triton.jit
def _sigmoid(v):
    """sigmoid(v) and 1 - sigmoid(v), each without cancellation."""
    e = tl.exp(-v)
    s = 1.0 / (1.0 + e)
    return s, tl.where(e < 1.0, e * s, 1.0 - s)


@triton.jit
def _group_start(n, g, C, S, Cg, CHANNELS_LAST: tl.constexpr):
    """Offset of element (channel g*Cg, position 0) of sample n."""
    start = n.to(tl.int64) * C * S
    if CHANNELS_LAST:
        return start + g * Cg
    return start + (g * Cg).to(tl.int64) * S


@triton.jit
def _tile_offsets(c, s, C, S, CHANNELS_LAST: tl.constexpr):
    """Offsets of the (c, s) tile (c: (BLOCK_C, 1) channels in the group, s: (1, BLOCK_S))."""
    if CHANNELS_LAST:
        return s.to(tl.int64) * C + c
    return c.to(tl.int64) * S + s


@triton.jit
def _channel_params(W, B, SCALE, SHIFT, n, ch, cmask, C,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                    HAS_SHIFT: tl.constexpr):
    """weight, bias, 1 + scale, shift of channels ch (fp32 vectors; 1, 0, 1, 0 when absent)."""
    w = tl.full(ch.shape, 1.0, tl.float32)
    b = tl.zeros(ch.shape, tl.float32)
    a = tl.full(ch.shape, 1.0, tl.float32)
    t = tl.zeros(ch.shape, tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B + ch, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        a = 1.0 + tl.load(SCALE + n.to(tl.int64) * C + ch, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        t = tl.load(SHIFT + n.to(tl.int64) * C + ch, mask=cmask, other=0.0).to(tl.float32)
    return w, b, a, t


@triton.jit
def _combine_statistics(PART, ng, S, Cg, s_per, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr):
    """The group's mean and M2 from its SPLIT partials (mean, M2 of slices of known sizes)."""
    ks = tl.arange(0, SPLIT_P2)
    kmask = ks < SPLIT
    pmean = tl.load(PART + (ng * SPLIT + ks) * 2, mask=kmask, other=0.0)
    pm2 = tl.load(PART + (ng * SPLIT + ks) * 2 + 1, mask=kmask, other=0.0)
    count = tl.where(kmask, (tl.minimum(S, (ks + 1) * s_per) - ks * s_per) * (Cg * 1.0), 0.0)
    total = (Cg * 1.0) * S
    mean = tl.sum(tl.where(kmask, count * pmean, 0.0), axis=0) / total
    d = pmean - mean
    m2 = tl.sum(tl.where(kmask, pm2 + count * d * d, 0.0), axis=0)
    return mean, m2, total


@triton.jit
def _gn_fwd_stats_kernel(
    X, PART, C, S, G, Cg, s_per,
    SPLIT: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    ng = tl.program_id(0)
    k = tl.program_id(1)
    n = ng // G
    g = ng % G
    xg = X + _group_start(n, g, C, S, Cg, CHANNELS_LAST)
    s_start = k * s_per
    s_end = tl.minimum(s_start + s_per, S)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c0 in range(0, Cg, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)[:, None]
        for s0 in range(s_start, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)[None, :]
            mask = (c < Cg) & (s < s_end)
            x = tl.load(xg + _tile_offsets(c, s, C, S, CHANNELS_LAST), mask=mask, other=0.0).to(tl.float32)
            # The tile's own mean and M2 (two passes over registers), merged by Chan's formula.
            nb = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
            mb = tl.sum(tl.sum(x, axis=1), axis=0) / nb
            d = tl.where(mask, x - mb, 0.0)
            m2b = tl.sum(tl.sum(d * d, axis=1), axis=0)
            total = count + nb
            delta = mb - mean
            mean = mean + delta * (nb / total)
            m2 = m2 + m2b + delta * delta * (count * (nb / total))
            count = total
    tl.store(PART + (ng * SPLIT + k) * 2, mean)
    tl.store(PART + (ng * SPLIT + k) * 2 + 1, m2)


@triton.jit
def _gn_fwd_apply_kernel(
    X, W, B, SCALE, SHIFT, Y, PART, MEAN, RSTD, C, S, G, Cg, s_per, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    ROUND_BY_HAND: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    ng = tl.program_id(0)
    k = tl.program_id(1)
    n = ng // G
    g = ng % G
    mean, m2, total = _combine_statistics(PART, ng, S, Cg, s_per, SPLIT, SPLIT_P2)
    var = m2 / total
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    # A group whose mean square overflows fp32 has no statistics: NaN (var = inf would give
    # rstd = 0 and y = bias, silently wrong), as in the reference.
    rstd = tl.where(mean * mean + var <= FP32_MAX, rstd, float("nan"))
    tl.store(MEAN + ng, mean, mask=k == 0)
    tl.store(RSTD + ng, rstd, mask=k == 0)
    start = _group_start(n, g, C, S, Cg, CHANNELS_LAST)
    s_start = k * s_per
    s_end = tl.minimum(s_start + s_per, S)
    for c0 in range(0, Cg, BLOCK_C):
        cl = c0 + tl.arange(0, BLOCK_C)
        cmask = cl < Cg
        w, b, a, t = _channel_params(W, B, SCALE, SHIFT, n, g * Cg + cl, cmask, C,
                                     HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
        # z = ((x - mean) rstd w + b)(1 + scale) + shift = (x - mean) * mul + add
        mul = (rstd * w * a)[:, None]
        add = (b * a + t)[:, None]
        c = cl[:, None]
        for s0 in range(s_start, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)[None, :]
            mask = (c < Cg) & (s < s_end)
            offs = start + _tile_offsets(c, s, C, S, CHANNELS_LAST)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            z = (x - mean) * mul + add
            if SILU:
                sg, _ = _sigmoid(z)
                z = z * sg
            tl.store(Y + offs, _cast(z, Y.dtype.element_ty, ROUND_BY_HAND), mask=mask)


@triton.jit
def _dz(x, dy, mean, rstd, w, b, a, t, SILU: tl.constexpr):
    """xhat, u = xhat w + b, and dz = dy silu'(z) (or dy) at z = u (1 + scale) + shift."""
    xhat = (x - mean) * rstd
    u = xhat * w[:, None] + b[:, None]
    dz = dy
    if SILU:
        z = u * a[:, None] + t[:, None]
        sg, one_minus = _sigmoid(z)
        dz = dy * (sg + z * sg * one_minus)
    return xhat, u, dz


@triton.jit
def _gn_bwd_partials_kernel(
    DY, X, W, B, SCALE, SHIFT, MEAN, RSTD, GPART, CPART, N, C, S, G, Cg, s_per,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr, NEED_DWEIGHT: tl.constexpr, NEED_DSCALE: tl.constexpr, SPLIT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    ng = tl.program_id(0)
    k = tl.program_id(1)
    n = ng // G
    g = ng % G
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    start = _group_start(n, g, C, S, Cg, CHANNELS_LAST)
    s_start = k * s_per
    s_end = tl.minimum(s_start + s_per, S)
    # CPART: (4, N, SPLIT, C) per-channel partials: dshift, dscale, dbias, dweight.
    plane = N.to(tl.int64) * SPLIT * C
    part = (n.to(tl.int64) * SPLIT + k) * C
    sum_dxhat = 0.0
    sum_dxhat_xhat = 0.0
    for c0 in range(0, Cg, BLOCK_C):
        cl = c0 + tl.arange(0, BLOCK_C)
        cmask = cl < Cg
        ch = g * Cg + cl
        w, b, a, t = _channel_params(W, B, SCALE, SHIFT, n, ch, cmask, C,
                                     HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
        c = cl[:, None]
        acc_dz = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
        acc_dz_u = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
        acc_du = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
        acc_du_xhat = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
        for s0 in range(s_start, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)[None, :]
            mask = (c < Cg) & (s < s_end)
            offs = start + _tile_offsets(c, s, C, S, CHANNELS_LAST)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            xhat, u, dz = _dz(x, dy, mean, rstd, w, b, a, t, SILU)
            dz = tl.where(mask, dz, 0.0)
            if NEED_DSCALE:
                acc_dz += dz
                acc_dz_u += tl.where(mask, dz * u, 0.0)
            du = dz * a[:, None]
            acc_du += du
            acc_du_xhat += tl.where(mask, du * xhat, 0.0)
        du_c = tl.sum(acc_du, axis=1)
        du_xhat_c = tl.sum(acc_du_xhat, axis=1)
        # dxhat = du w: the group's sums of dxhat and dxhat xhat are the channels' sums times w.
        sum_dxhat += tl.sum(tl.where(cmask, du_c * w, 0.0), axis=0)
        sum_dxhat_xhat += tl.sum(tl.where(cmask, du_xhat_c * w, 0.0), axis=0)
        if NEED_DSCALE:
            tl.store(CPART + part + ch, tl.sum(acc_dz, axis=1), mask=cmask)
            tl.store(CPART + plane + part + ch, tl.sum(acc_dz_u, axis=1), mask=cmask)
        if NEED_DWEIGHT:
            tl.store(CPART + 2 * plane + part + ch, du_c, mask=cmask)
            tl.store(CPART + 3 * plane + part + ch, du_xhat_c, mask=cmask)
    tl.store(GPART + (ng * SPLIT + k) * 2, sum_dxhat)
    tl.store(GPART + (ng * SPLIT + k) * 2 + 1, sum_dxhat_xhat)


@triton.jit
def _gn_bwd_dx_kernel(
    DY, X, W, B, SCALE, SHIFT, MEAN, RSTD, GPART, DX, C, S, G, Cg, s_per,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    ROUND_BY_HAND: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    ng = tl.program_id(0)
    k = tl.program_id(1)
    n = ng // G
    g = ng % G
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    ks = tl.arange(0, SPLIT_P2)
    kmask = ks < SPLIT
    total = (Cg * 1.0) * S
    mean_dxhat = tl.sum(tl.load(GPART + (ng * SPLIT + ks) * 2, mask=kmask, other=0.0), axis=0) / total
    mean_dxhat_xhat = tl.sum(tl.load(GPART + (ng * SPLIT + ks) * 2 + 1, mask=kmask, other=0.0), axis=0) / total
    start = _group_start(n, g, C, S, Cg, CHANNELS_LAST)
    s_start = k * s_per
    s_end = tl.minimum(s_start + s_per, S)
    for c0 in range(0, Cg, BLOCK_C):
        cl = c0 + tl.arange(0, BLOCK_C)
        cmask = cl < Cg
        w, b, a, t = _channel_params(W, B, SCALE, SHIFT, n, g * Cg + cl, cmask, C,
                                     HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
        c = cl[:, None]
        for s0 in range(s_start, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)[None, :]
            mask = (c < Cg) & (s < s_end)
            offs = start + _tile_offsets(c, s, C, S, CHANNELS_LAST)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            xhat, u, dz = _dz(x, dy, mean, rstd, w, b, a, t, SILU)
            dxhat = (dz * a[:, None]) * w[:, None]  # as the partials' du w: a lone element's dx is 0
            dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
            tl.store(DX + offs, _cast(dx, DX.dtype.element_ty, ROUND_BY_HAND), mask=mask)


class _Plan:
    """How a (N, C, S) problem is cut: SPLIT programs per group, each owning s_per positions,
    and the (BLOCK_C, BLOCK_S) tile."""

    def __init__(self, x: Tensor, N: int, C: int, S: int, num_groups: int, channels_last: bool):
        self.cg = C // num_groups
        groups = N * num_groups
        if x.is_cuda:
            target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(x.device).multi_processor_count
            min_slice = MIN_SLICE
        else:
            target, min_slice = INTERPRETER_PROGRAMS, INTERPRETER_MIN_SLICE
        split = max(1, min(triton.cdiv(target, groups), triton.cdiv(self.cg * S, min_slice), S))
        self.s_per = triton.cdiv(S, split)
        self.split = triton.cdiv(S, self.s_per)  # no empty slice
        self.split_p2 = triton.next_power_of_2(self.split)
        cg_p2, s_p2 = triton.next_power_of_2(self.cg), triton.next_power_of_2(self.s_per)
        if channels_last:  # contiguous channels: the tile's long side
            self.block_c = min(cg_p2, TILE)
            self.block_s = max(1, min(s_p2, TILE // self.block_c))
        else:
            self.block_s = min(s_p2, TILE)
            self.block_c = max(1, min(cg_p2, TILE // self.block_s))
        self.grid = (groups, self.split)
        self.num_warps = max(1, min(8, self.block_c * self.block_s // 256))


def _shape(x: Tensor, channels_last: bool) -> tuple[int, int, int]:
    N, a, b = (int(d) for d in x.shape)  # ints: compile-time tiles (sizes specialized when traced)
    return (N, b, a) if channels_last else (N, a, b)


def group_norm_forward(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, scale: Tensor | None,
    shift: Tensor | None, eps: float, silu: bool, channels_last: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """x: (N, C, S), or (N, S, C) when channels_last, contiguous; weight, bias: (C,); scale,
    shift: (N, C). Returns y (x's shape), mean and rstd (N, num_groups) fp32."""
    N, C, S = _shape(x, channels_last)
    y = torch.empty_like(x)
    mean = torch.empty((N, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if N == 0:
        return y, mean, rstd
    if C == 0 or S == 0:  # a group of no elements has no statistics
        return y, mean.fill_(math.nan), rstd.fill_(math.nan)
    plan = _Plan(x, N, C, S, num_groups, channels_last)
    part = torch.empty((N * num_groups, plan.split, 2), dtype=torch.float32, device=x.device)
    wrap_triton(_gn_fwd_stats_kernel)[plan.grid](
        x, part, C, S, num_groups, plan.cg, plan.s_per,
        SPLIT=plan.split, CHANNELS_LAST=channels_last, BLOCK_C=plan.block_c, BLOCK_S=plan.block_s,
        num_warps=plan.num_warps,
    )
    absent = part  # any tensor for a pointer the kernel's constexpr flags never touch
    wrap_triton(_gn_fwd_apply_kernel)[plan.grid](
        x, weight if weight is not None else absent, bias if bias is not None else absent,
        scale if scale is not None else absent, shift if shift is not None else absent,
        y, part, mean, rstd, C, S, num_groups, plan.cg, plan.s_per, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None, SILU=silu, SPLIT=plan.split, SPLIT_P2=plan.split_p2,
        CHANNELS_LAST=channels_last, ROUND_BY_HAND=ROUND_BF16_BY_HAND,
        BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps,
    )
    return y, mean, rstd


def group_norm_backward(
    dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, num_groups: int, weight: Tensor | None,
    bias: Tensor | None, scale: Tensor | None, shift: Tensor | None, silu: bool, channels_last: bool,
    need_dweight: bool, need_dscale: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of group_norm_forward: dx (x's shape); dweight, dbias (C,) when need_dweight
    and weight / bias given; dscale, dshift (N, C) when need_dscale and scale / shift given
    (None otherwise), in x's dtype, each summed in fp32 and rounded once."""
    N, C, S = _shape(x, channels_last)
    dx = torch.empty_like(x)
    want_dweight = need_dweight and weight is not None
    want_dbias = need_dweight and bias is not None
    want_dscale = need_dscale and scale is not None
    want_dshift = need_dscale and shift is not None
    weight_grads, scale_grads = want_dweight or want_dbias, want_dscale or want_dshift
    if N == 0 or C == 0 or S == 0:
        split = 1
        cpart = torch.zeros((4, N, 1, C), dtype=torch.float32, device=x.device)
    else:
        plan = _Plan(x, N, C, S, num_groups, channels_last)
        split = plan.split
        cpart = torch.empty((4, N, split, C) if weight_grads or scale_grads else (4, 1, 1, 1),
                            dtype=torch.float32, device=x.device)
        gpart = torch.empty((N * num_groups, split, 2), dtype=torch.float32, device=x.device)
        absent = gpart
        params = (
            weight if weight is not None else absent, bias if bias is not None else absent,
            scale if scale is not None else absent, shift if shift is not None else absent,
        )
        flags = dict(
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
            HAS_SHIFT=shift is not None, SILU=silu, SPLIT=split, CHANNELS_LAST=channels_last,
            BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps,
        )
        wrap_triton(_gn_bwd_partials_kernel)[plan.grid](
            dy, x, *params, mean, rstd, gpart, cpart, N, C, S, num_groups, plan.cg, plan.s_per,
            NEED_DWEIGHT=weight_grads, NEED_DSCALE=scale_grads, **flags,
        )
        wrap_triton(_gn_bwd_dx_kernel)[plan.grid](
            dy, x, *params, mean, rstd, gpart, dx, C, S, num_groups, plan.cg, plan.s_per,
            SPLIT_P2=plan.split_p2, ROUND_BY_HAND=ROUND_BF16_BY_HAND, **flags,
        )
    # cpart (4, N, SPLIT, C): dshift, dscale, dbias, dweight partials; summed in a fixed order.
    dshift = cpart[0].sum(1).to(x.dtype) if want_dshift else None
    dscale = cpart[1].sum(1).to(x.dtype) if want_dscale else None
    dbias = cpart[2].sum((0, 1)).to(x.dtype) if want_dbias else None
    dweight = cpart[3].sum((0, 1)).to(x.dtype) if want_dweight else None
    return dx, dweight, dbias, dscale, dshift
