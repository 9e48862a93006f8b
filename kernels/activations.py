"""Triton kernels of the activations: bias_gelu (erf and tanh forms) and the gated ones (f(gate)
* up: swiglu with f = silu, geglu with f = gelu, erf or tanh form), forward and backward, over
(M, N) rows with contiguous columns (strided rows: gate and up may be halves of one projection);
and their launchers.

One elementwise skeleton: a program owns a BLOCK_M x BLOCK_N tile (forward) or a column block
of a range of rows (backward, which sums the bias gradient over its rows in fp32 registers and
writes one partial row; the partials are summed once at the end). Math in fp32, rounded once.

The normal CDF is evaluated as in the CPU kernels (csrc/cpu/activations/activation_rows_avx512.cpp):
Phi(h) from erfc(|h| / sqrt 2) = t Q(s) exp(-h^2/2), so that negative h keeps its relative
accuracy (1 + erf(h / sqrt 2) loses every digit there); 1 + tanh(u) as 2 sigmoid(2u).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastarch.kernels.launch import wrap_triton

# The ACT constexpr of the kernels: f, applied to x + bias, or to gate (GATED: times up).
GELU_ERF = tl.constexpr(0)
GELU_TANH = tl.constexpr(1)
SILU = tl.constexpr(2)
ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "silu": 2}
# Triton's CPU interpreter truncates fp32 -> bf16 casts; the kernels then round by hand.
ROUND_BF16_BY_HAND = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _cast(y, dtype: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
    """y (fp32) rounded to nearest even in dtype, as on the GPU."""
    if ROUND_BY_HAND and dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # NaN and inf survive
        y = bits.to(tl.float32, bitcast=True)
    return y.to(dtype)


@triton.jit
def _erfc_scaled(a):
    """erfc(a / sqrt 2) exp(a^2 / 2) for a = |h| >= 0, as t Q(s) (the CPU kernels' polynomial,
    fitted in fp64: max relative error 9.4e-9 over a in [0, 10 sqrt 2])."""
    t = 1.0 / (1.0 + a * 0.35355339059327376)  # 0.3535...: 1 / (2 sqrt 2)
    s = (t - 7.0 / 12.0) * (12.0 / 5.0)
    q = 6.589006384277334e-06
    q = q * s + 7.203381664866606e-06
    q = q * s - 6.928564257153684e-05
    q = q * s + 3.536675358016485e-06
    q = q * s + 0.0005988707892591491
    q = q * s - 0.0006188299506934053
    q = q * s - 0.006155051567403365
    q = q * s + 0.005962600693706014
    q = q * s + 0.1020298861212319
    q = q * s + 0.3262225158380577
    q = q * s + 0.5720119740348028
    return t * q


@triton.jit
def _phi(h, e):
    """Phi(h) from e = erfc(|h| / sqrt 2)."""
    return tl.where(h > 0, 1.0 - 0.5 * e, 0.5 * e)


@triton.jit
def _sigmoid(v):
    """sigmoid(v) and 1 - sigmoid(v), each without cancellation (e s where e = exp(-v) < 1;
    1 - s where s <= 1/2, where e may be inf)."""
    e = tl.exp(-v)
    s = 1.0 / (1.0 + e)
    return s, tl.where(e < 1.0, e * s, 1.0 - s)


@triton.jit
def _tanh_arg2(h):
    """2u, u = sqrt(2/pi) (h + 0.044715 h^3): 0.5 (1 + tanh u) = sigmoid(2u)."""
    return h * 1.5957691216057308 * (1.0 + 0.044715 * h * h)  # 2 sqrt(2/pi)


@triton.jit
def _value_grad(h, ACT: tl.constexpr):
    """f(h) and f'(h) from one evaluation of what they share (unused results are dropped)."""
    if ACT == SILU:
        s, oms = _sigmoid(h)
        return h * s, s * (1.0 + h * oms)  # silu' = s (1 + h (1 - s))
    elif ACT == GELU_TANH:
        # s + g (2 sqrt(2/pi)) (1 + 3 * 0.044715 h^2), g = h s (1 - s), with h^2 kept out of
        # the product: g is exactly 0 wherever h^2 would overflow (no inf * 0 for huge h)
        s, oms = _sigmoid(_tanh_arg2(h))
        g = h * s * oms
        return h * s, s + g * 1.5957691216057308 + (g * h) * (h * 0.21406444881780073)
    else:
        abs_h = tl.abs(h)
        g = tl.exp(-0.5 * abs_h * abs_h)
        phi = _phi(h, _erfc_scaled(abs_h) * g)
        return h * phi, phi + h * 0.3989422804014327 * g  # 1 / sqrt(2 pi)


@triton.jit
def _act_fwd_kernel(
    A, B, BIAS, Y, stride_a, stride_b, M, N,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_BY_HAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    r64 = rows.to(tl.int64)[:, None]
    a = tl.load(A + r64 * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        a += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y, _ = _value_grad(a, ACT)
    if GATED:
        y = y * tl.load(B + r64 * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + r64 * N + cols[None, :], _cast(y, Y.dtype.element_ty, ROUND_BY_HAND), mask=mask)


@triton.jit
def _act_bwd_kernel(
    DY, A, B, BIAS, DA, DB, PARTS, stride_dy, stride_a, stride_b, stride_da, stride_db, M, N, rows_per_program,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_DBIAS: tl.constexpr,
    ROUND_BY_HAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = tl.program_id(0) * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < last) & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A + r64 * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if GATED:  # y = f(g) u: dy/dg = u f'(g), dy/du = f(g)
            b = tl.load(B + r64 * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            value, grad = _value_grad(a, ACT)
            da = dy * b * grad
            tl.store(DB + r64 * stride_db + cols[None, :], _cast(dy * value, DB.dtype.element_ty, ROUND_BY_HAND), mask=mask)
        else:
            _, grad = _value_grad(a + bias[None, :], ACT)
            da = dy * grad
            if NEED_DBIAS:
                acc += tl.sum(tl.where(mask, da, 0.0), axis=0)
        tl.store(DA + r64 * stride_da + cols[None, :], _cast(da, DA.dtype.element_ty, ROUND_BY_HAND), mask=mask)
    if NEED_DBIAS:
        tl.store(PARTS + tl.program_id(0) * N + cols, acc, mask=col_ok)


def _tile(N: int, elements: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of about ``elements`` values: the whole row up to 1024 columns."""
    block_n = min(1024, triton.next_power_of_2(int(N)))
    return max(1, elements // block_n), block_n


def _programs(x: Tensor, rows: int) -> int:
    """Row groups of the backward (each writes one partial row of the bias gradient)."""
    if x.is_cuda:
        return max(1, min(triton.cdiv(rows, 16), 2 * torch.cuda.get_device_properties(x.device).multi_processor_count))
    return max(1, min(rows, 4))  # the interpreter: few programs, each with many rows


def activation_forward(a: Tensor, b: Tensor | None, bias: Tensor | None, act: str) -> Tensor:
    """y = f(a + bias) (bias_gelu), or f(a) * b when b is given (the gated activations); f:
    act, "gelu", "gelu_tanh" or "silu". a, b: (M, N) with contiguous columns; bias: (N,)
    contiguous. Returns y (M, N)."""
    M, N = a.shape
    y = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0:
        return y
    block_m, block_n = _tile(N, 4096)
    wrap_triton(_act_fwd_kernel)[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        a, b if b is not None else a, bias if bias is not None else a, y,
        a.stride(0), b.stride(0) if b is not None else 0, M, N,
        ACT=ACTIVATIONS[act], GATED=b is not None, HAS_BIAS=bias is not None, ROUND_BY_HAND=ROUND_BF16_BY_HAND,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )
    return y


def activation_backward(
    dy: Tensor, a: Tensor, b: Tensor | None, bias: Tensor | None, act: str, need_dbias: bool,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients of activation_forward: da (M, N); db (M, N) when gated, else None; dbias (N,)
    (the column sums of da in fp32, rounded once) or None when not wanted. out: a (M, 2N)
    tensor (gated only) whose halves [db | da] are written instead of new tensors."""
    M, N = a.shape
    if out is not None:
        db, da = out[:, :N], out[:, N:]
    else:
        da = torch.empty((M, N), dtype=a.dtype, device=a.device)
        db = torch.empty_like(da) if b is not None else None
    programs = _programs(a, M)
    parts = torch.zeros((programs, N) if need_dbias else (1, 1), dtype=torch.float32, device=a.device)
    if M > 0:
        block_m, block_n = _tile(N, 2048)
        wrap_triton(_act_bwd_kernel)[(programs, triton.cdiv(N, block_n))](
            dy, a, b if b is not None else a, bias if bias is not None else a, da, db if db is not None else da, parts,
            dy.stride(0), a.stride(0), b.stride(0) if b is not None else 0, da.stride(0),
            db.stride(0) if db is not None else 0, M, N, triton.cdiv(M, programs),
            ACT=ACTIVATIONS[act], GATED=b is not None, HAS_BIAS=bias is not None, NEED_DBIAS=need_dbias,
            ROUND_BY_HAND=ROUND_BF16_BY_HAND,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        )
    return da, db, parts.sum(0).to(a.dtype) if need_dbias else None
