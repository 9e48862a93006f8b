"""Triton kernels of the norms: LayerNorm and RMSNorm over the last dimension, optionally
fused with the pre-norm residual add, forward and backward; and their launchers.

Rows up to MAX_FUSED_COLS elements live in registers, several rows per program; longer rows
loop over column blocks, re-reading the row from L2. Statistics are fp32. The backward runs
a fixed number of programs, each owning a contiguous range of rows and accumulating its
dweight/dbias partial sums in registers; the partials are summed once at the end.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastarch.kernels.launch import wrap_triton

# Rows longer than this loop over column blocks (32 KB of fp32 per row held in registers).
MAX_FUSED_COLS = 8192
# Column block of the looped kernels.
LOOP_BLOCK_N = 2048
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
        y = bits.to(tl.float32, bitcast=True)  # exact in bf16 now: truncation is harmless
    return y.to(dtype)


@triton.jit
def _weight(W, cols, mask, offset, HAS_OFFSET: tl.constexpr):
    """The weight's values in fp32, offset added (Gemma's 1 + weight, as it computes it)."""
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        w = w + offset
    return w


@triton.jit
def _clamp_var(var):
    """max(var, 0) that keeps a NaN (a NaN or inf in the row); tl.maximum would drop it."""
    return tl.where(var < 0.0, 0.0, var)


@triton.jit
def _nan_beyond_fp32(rstd, mean, var):
    """rstd, or NaN where the row's mean square mean^2 + var overflows fp32: such a row has no
    fp32 statistics, and normalizes to NaN as in PyTorch's LayerNorm (a var of inf would give
    rstd = 0 and y = bias, silently wrong)."""
    return tl.where(mean * mean + var <= FP32_MAX, rstd, float("nan"))


@triton.jit
def _norm_fwd_kernel(
    X, R, W, B, Y, RES_OUT, MEAN, RSTD,
    stride_x, stride_r, M, N, eps, weight_offset,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
    IS_RMS: tl.constexpr,
    ROUND_BY_HAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < N)
    rows = rows.to(tl.int64)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = _cast(x + r, RES_OUT.dtype.element_ty, ROUND_BY_HAND)
        tl.store(RES_OUT + rows[:, None] * N + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)  # the statistics see what residual_out holds
    if IS_RMS:
        xc = x
        var = tl.sum(x * x, axis=1) / N
    else:
        # Corrected two-pass variance: the deviations' own mean is the fp32 mean's rounding
        # error, removed from the variance and from every deviation.
        mean = tl.sum(x, axis=1) / N
        d = tl.where(mask, x - mean[:, None], 0.0)
        correction = tl.sum(d, axis=1) / N
        var = _clamp_var(tl.sum(d * d, axis=1) / N - correction * correction)
        xc = d - correction[:, None]
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    if not IS_RMS:
        rstd = _nan_beyond_fp32(rstd, mean, var)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * _weight(W, cols, cols < N, weight_offset, HAS_OFFSET)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * N + cols[None, :], _cast(y, Y.dtype.element_ty, ROUND_BY_HAND), mask=mask)
    if not IS_RMS:
        tl.store(MEAN + rows, mean + correction, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _norm_fwd_looped_kernel(
    X, R, W, B, Y, RES_OUT, MEAN, RSTD,
    stride_x, stride_r, M, N, eps, weight_offset,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
    IS_RMS: tl.constexpr,
    ROUND_BY_HAND: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_RESIDUAL:
        src = RES_OUT + row * N
    else:
        src = X + row * stride_x
    # Pass 1: the sum (LayerNorm) or sum of squares (RMSNorm); writes residual_out.
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        m = cols < N
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + row * stride_r + cols, mask=m, other=0.0).to(tl.float32)
            s = _cast(x + r, RES_OUT.dtype.element_ty, ROUND_BY_HAND)
            tl.store(RES_OUT + row * N + cols, s, mask=m)
            x = s.to(tl.float32)
        if IS_RMS:
            acc += x * x
        else:
            acc += x
    if HAS_RESIDUAL:
        tl.debug_barrier()  # residual_out is read back below
    if IS_RMS:
        mean = 0.0
        correction = 0.0
        var = tl.sum(acc, axis=0) / N
    else:
        mean = tl.sum(acc, axis=0) / N
        # Pass 2: deviations from the mean; corrected two-pass variance (as the fused kernel).
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            m = cols < N
            d = tl.where(m, tl.load(src + cols, mask=m, other=0.0).to(tl.float32) - mean, 0.0)
            acc += d
            acc_sq += d * d
        correction = tl.sum(acc, axis=0) / N
        var = _clamp_var(tl.sum(acc_sq, axis=0) / N - correction * correction)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    if not IS_RMS:
        rstd = _nan_beyond_fp32(rstd, mean, var)
    # Pass 3: normalize.
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        m = cols < N
        y = ((tl.load(src + cols, mask=m, other=0.0).to(tl.float32) - mean) - correction) * rstd
        if HAS_WEIGHT:
            y = y * _weight(W, cols, m, weight_offset, HAS_OFFSET)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * N + cols, _cast(y, Y.dtype.element_ty, ROUND_BY_HAND), mask=m)
    if not IS_RMS:
        tl.store(MEAN + row, mean + correction)
    tl.store(RSTD + row, rstd)


@triton.jit
def _norm_bwd_kernel(
    DY, DRES, XIN, W, MEAN, RSTD, DX, DW_PART, DB_PART,
    stride_dy, stride_dres, stride_x, M, N, rows_per_program, weight_offset,
    HAS_DRES: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr, IS_RMS: tl.constexpr, WEIGHT_GRADS: tl.constexpr,
    ROUND_BY_HAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    PREFETCH: tl.constexpr = BLOCK_M * BLOCK_N <= 4096
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_WEIGHT:
        w = _weight(W, cols, col_ok, weight_offset, HAS_OFFSET)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    # PREFETCH: the next rows' x and dy are loaded while this row's are reduced, so two rows are
    # in flight (at 16 warps one program fills an SM's registers, and with one row in flight
    # the bf16 backward ran at 22% of copy bandwidth on an H200). Only for tiles of up to 4096
    # elements: larger ones spill registers with it (ptxas, sm_90).
    rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask = (rows < row_end)[:, None] & col_ok[None, :]
    x_next = tl.load(XIN + rows[:, None] * stride_x + cols[None, :], mask=mask & PREFETCH, other=0.0)
    dy_next = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask & PREFETCH, other=0.0)
    for first in range(row_start, row_end, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows = rows.to(tl.int64)
        if PREFETCH:
            x = x_next.to(tl.float32)
            dy = dy_next.to(tl.float32)
            next_mask = (rows + BLOCK_M < row_end)[:, None] & col_ok[None, :]
            x_next = tl.load(XIN + (rows + BLOCK_M)[:, None] * stride_x + cols[None, :], mask=next_mask, other=0.0)
            dy_next = tl.load(DY + (rows + BLOCK_M)[:, None] * stride_dy + cols[None, :], mask=next_mask, other=0.0)
        else:
            x = tl.load(XIN + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            xhat = (x - tl.load(MEAN + rows, mask=row_ok, other=0.0)[:, None]) * rstd[:, None]
        xhat = tl.where(mask, xhat, 0.0)
        if HAS_WEIGHT:
            g = dy * w[None, :]
        else:
            g = dy
        # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); RMSNorm drops mean(g).
        dx = g - xhat * (tl.sum(g * xhat, axis=1) / N)[:, None]
        if not IS_RMS:
            dx = dx - (tl.sum(g, axis=1) / N)[:, None]
        dx = dx * rstd[:, None]
        if HAS_DRES:
            dx += tl.load(DRES + rows[:, None] * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * N + cols[None, :], _cast(dx, DX.dtype.element_ty, ROUND_BY_HAND), mask=mask)
        if WEIGHT_GRADS:
            dw_acc += tl.sum(dy * xhat, axis=0)
            db_acc += tl.sum(dy, axis=0)
    if WEIGHT_GRADS:
        tl.store(DW_PART + pid * N + cols, dw_acc, mask=col_ok)
        tl.store(DB_PART + pid * N + cols, db_acc, mask=col_ok)


@triton.jit
def _norm_bwd_looped_kernel(
    DY, DRES, XIN, W, MEAN, RSTD, DX, DW_PART, DB_PART,
    stride_dy, stride_dres, stride_x, M, N, rows_per_program, weight_offset,
    HAS_DRES: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr, IS_RMS: tl.constexpr, WEIGHT_GRADS: tl.constexpr,
    ROUND_BY_HAND: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    part = pid.to(tl.int64) * N
    for r in range(row_start, row_end):
        row = tl.cast(r, tl.int64)  # (the interpreter iterates Python ints)
        rstd = tl.load(RSTD + row)
        if IS_RMS:
            mean = 0.0
        else:
            mean = tl.load(MEAN + row)
        # Pass 1: the row sums of g and g * xhat; this program's dweight/dbias partials.
        acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            m = cols < N
            xhat = (tl.load(XIN + row * stride_x + cols, mask=m, other=0.0).to(tl.float32) - mean) * rstd
            xhat = tl.where(m, xhat, 0.0)
            dy = tl.load(DY + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                g = dy * _weight(W, cols, m, weight_offset, HAS_OFFSET)
            else:
                g = dy
            acc_g += g
            acc_gx += g * xhat
            if WEIGHT_GRADS:
                dw = tl.load(DW_PART + part + cols, mask=m, other=0.0)
                tl.store(DW_PART + part + cols, dw + dy * xhat, mask=m)
                db = tl.load(DB_PART + part + cols, mask=m, other=0.0)
                tl.store(DB_PART + part + cols, db + dy, mask=m)
        c_gx = tl.sum(acc_gx, axis=0) / N
        if IS_RMS:
            c_g = 0.0
        else:
            c_g = tl.sum(acc_g, axis=0) / N
        # Pass 2: dx.
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            m = cols < N
            xhat = (tl.load(XIN + row * stride_x + cols, mask=m, other=0.0).to(tl.float32) - mean) * rstd
            dy = tl.load(DY + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                g = dy * _weight(W, cols, m, weight_offset, HAS_OFFSET)
            else:
                g = dy
            dx = (g - c_g - xhat * c_gx) * rstd
            if HAS_DRES:
                dx += tl.load(DRES + row * stride_dres + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(DX + row * N + cols, _cast(dx, DX.dtype.element_ty, ROUND_BY_HAND), mask=m)


def _num_warps(elements: int) -> int:
    """About 8 fp32 values per thread, between 1 and 16 warps."""
    return max(1, min(16, triton.next_power_of_2(elements // 256)))


def _programs(x: Tensor, rows: int) -> int:
    """How many programs share the rows in the backward (each keeps one partial sum)."""
    if x.is_cuda:
        return max(1, min(rows, 2 * torch.cuda.get_device_properties(x.device).multi_processor_count))
    return max(1, min(rows, 4))  # the interpreter: few programs, each with many rows


def norm_forward(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool,
    weight_offset: float = 0.0,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """x, residual: (M, N) with contiguous columns; weight, bias: (N,) contiguous; the rows
    multiplied by weight + weight_offset (in fp32). Returns y (M, N), residual_out (M, N) or None, mean (M,) fp32 or None for RMS, rstd (M,)."""
    M, N = x.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(y) if residual is not None else None
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    mean = None if rms else torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return y, residual_out, mean, rstd
    absent = rstd  # any tensor for a pointer the kernel's constexpr flags never touch
    args = (
        x, residual if residual is not None else absent, weight if weight is not None else absent,
        bias if bias is not None else absent, y, residual_out if residual_out is not None else absent,
        mean if mean is not None else absent, rstd,
        x.stride(0), residual.stride(0) if residual is not None else 0, M, N, eps, float(weight_offset),
    )
    flags = dict(
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_OFFSET=weight_offset != 0.0,
        HAS_BIAS=bias is not None, IS_RMS=rms, ROUND_BY_HAND=ROUND_BF16_BY_HAND,
    )
    block_n = triton.next_power_of_2(int(N))  # int: a compile-time tile (N specialized when traced)
    if block_n <= MAX_FUSED_COLS:
        block_m = max(1, min(16, 4096 // block_n))
        wrap_triton(_norm_fwd_kernel)[(triton.cdiv(M, block_m),)](
            *args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_num_warps(block_m * block_n)
        )
    else:
        wrap_triton(_norm_fwd_looped_kernel)[(M,)](
            *args, **flags, BLOCK_N=LOOP_BLOCK_N, num_warps=_num_warps(LOOP_BLOCK_N)
        )
    return y, residual_out, mean, rstd


def norm_backward(
    dy: Tensor,
    dresidual_out: Tensor | None,
    xin: Tensor,
    weight: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    need_dweight: bool,
    need_dbias: bool,
    weight_offset: float = 0.0,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients of norm_forward: dx (M, N); dweight, dbias (N,) or None when not wanted.
    xin is the normalization's input (x, or residual_out); RMSNorm when mean is None."""
    M, N = xin.shape
    dx = torch.empty((M, N), dtype=xin.dtype, device=xin.device)
    weight_grads = need_dweight or need_dbias
    programs = _programs(xin, M)
    parts = torch.zeros((2, programs, N) if weight_grads else (2, 1, 1), dtype=torch.float32, device=xin.device)
    if M > 0:
        args = (
            dy, dresidual_out if dresidual_out is not None else dy, xin, weight if weight is not None else rstd,
            mean if mean is not None else rstd, rstd, dx, parts[0], parts[1],
            dy.stride(0), dresidual_out.stride(0) if dresidual_out is not None else 0, xin.stride(0),
            M, N, triton.cdiv(M, programs), float(weight_offset),
        )
        flags = dict(
            HAS_DRES=dresidual_out is not None, HAS_WEIGHT=weight is not None, HAS_OFFSET=weight_offset != 0.0,
            IS_RMS=mean is None,
            WEIGHT_GRADS=weight_grads, ROUND_BY_HAND=ROUND_BF16_BY_HAND,
        )
        block_n = triton.next_power_of_2(int(N))  # int: a compile-time tile (N specialized when traced)
        if block_n <= MAX_FUSED_COLS:
            block_m = max(1, min(16, 2048 // block_n))
            wrap_triton(_norm_bwd_kernel)[(programs,)](
                *args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_num_warps(block_m * block_n)
            )
        else:
            wrap_triton(_norm_bwd_looped_kernel)[(programs,)](
                *args, **flags, BLOCK_N=LOOP_BLOCK_N, num_warps=_num_warps(LOOP_BLOCK_N)
            )
    dweight = parts[0].sum(0).to(xin.dtype) if need_dweight else None
    dbias = parts[1].sum(0).to(xin.dtype) if need_dbias else None
    return dx, dweight, dbias
