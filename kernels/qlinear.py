"""Triton kernel of the linear layer on block-quantized weights (every GGUF block format of
fastarch/ops/qlinear/formats.py: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL in 32-value blocks, Q4_K,
Q5_K, Q6_K, IQ4_XS in 256-value super-blocks), and its launcher.

One program computes BLOCK_N output columns of BLOCK_M rows of x (all of a decode step's rows,
up to 16): it walks those BLOCK_N rows of blocks BLOCK_K values at a time, gathering each
value's bits from its block as stored (the byte of its low nibble or int8, the bits above it,
its block's or sub-block's scales), widening it to fp32 exactly as formats.py (and ggml) does,
and sums the products with each of its x rows along K in fp32; then adds the bias and rounds
once. W's blocks are read and widened once per BLOCK_M rows (on an H200 on 2026-12-04, one
program per row made 16 rows 5-13x slower than one). Each value rereads its scales: a block's
values share those bytes, which should come from the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastarch.kernels.launch import wrap_triton
from fastarch.kernels.norms import ROUND_BF16_BY_HAND, _cast

BLOCK_N = 8
BLOCK_K = 128
# BLOCK_M x BLOCK_N x BLOCK_K products at a time: at most this many (BLOCK_K shrinks as BLOCK_M grows).
PRODUCTS = 4096
MAX_BLOCK_M = 16
# The QUANT constexpr of the kernel: the format of the blocks.
Q4_0 = tl.constexpr(0)
Q4_1 = tl.constexpr(1)
Q5_0 = tl.constexpr(2)
Q5_1 = tl.constexpr(3)
Q8_0 = tl.constexpr(4)
Q4_K = tl.constexpr(5)
Q5_K = tl.constexpr(6)
Q6_K = tl.constexpr(7)
IQ4_NL = tl.constexpr(8)
IQ4_XS = tl.constexpr(9)
_FORMATS = {  # formats.py's quant name: (QUANT, values per block, bytes per block)
    "q4_0": (0, 32, 18), "q4_1": (1, 32, 20), "q5_0": (2, 32, 22), "q5_1": (3, 32, 24), "q8_0": (4, 32, 34),
    "q4_k": (5, 256, 144), "q5_k": (6, 256, 176), "q6_k": (7, 256, 210), "iq4_nl": (8, 32, 18),
    "iq4_xs": (9, 256, 136),
}


@triton.jit
def _byte(p, mask):
    """The byte at p, as int32."""
    return tl.load(p, mask=mask, other=0).to(tl.int32)


@triton.jit
def _int8_at(p, mask):
    """The int8 at p, as fp32."""
    return tl.load(p, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)


@triton.jit
def _half_at(p, mask):
    """The little-endian fp16 at bytes p, p + 1, as fp32."""
    lo = tl.load(p, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(p + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _legacy_value(block, j, mask, QUANT: tl.constexpr):
    """Value j (< 32) of the Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 blocks at block, in fp32."""
    d = _half_at(block, mask)
    if QUANT == Q8_0:  # d, 32 int8
        w = _int8_at(block + 2 + j, mask) * d
    else:  # d (, m) (, the u32 qh), 16 bytes qs: byte j % 16 holds value j % 16 low, j % 16 + 16 high
        HAS_MIN: tl.constexpr = QUANT == Q4_1 or QUANT == Q5_1
        FIVE_BIT: tl.constexpr = QUANT == Q5_0 or QUANT == Q5_1
        qh = block + (4 if HAS_MIN else 2)
        qs = qh + (4 if FIVE_BIT else 0)
        q = (_byte(qs + j % 16, mask) >> (j // 16 * 4)) & 15
        if FIVE_BIT:  # bit j of the little-endian u32 qh
            q |= ((_byte(qh + j // 8, mask) >> (j % 8)) & 1) << 4
        if HAS_MIN:
            w = q.to(tl.float32) * d + _half_at(block + 2, mask)  # (d * q is exact: one rounding)
        else:
            w = (q - (16 if FIVE_BIT else 8)).to(tl.float32) * d
    return w


@triton.jit
def _k_value(block, j, mask, QUANT: tl.constexpr):
    """Value j (< 256) of the Q4_K / Q5_K super-blocks at block, in fp32: sub-block s = j / 32's
    (d sc_s) q - (dmin m_s)."""
    s = j // 32
    # The 12 scale bytes: sub-block s < 4 takes the low 6 bits of bytes s (scale) and s + 4 (min);
    # s >= 4 the nibbles of byte s + 4 (scale low, min high) under the top 2 bits of s - 4 and s.
    a = _byte(block + 4 + s % 4, mask)
    b = _byte(block + 8 + s % 4, mask)
    c = _byte(block + 12 + s % 4, mask)
    sc = tl.where(s < 4, a & 63, (c & 15) | ((a >> 6) << 4))
    m = tl.where(s < 4, b & 63, (c >> 4) | ((b >> 6) << 4))
    # qs: bytes 32 p .. 32 p + 31 hold sub-block 2 p's values low, 2 p + 1's high.
    qs = block + (48 if QUANT == Q5_K else 16)
    q = (_byte(qs + j // 64 * 32 + j % 32, mask) >> (s % 2 * 4)) & 15
    if QUANT == Q5_K:  # bit s of qh[j % 32], the 32 bytes after the scales
        q |= ((_byte(block + 16 + j % 32, mask) >> s) & 1) << 4
    d = _half_at(block, mask) * sc.to(tl.float32)
    dmin = _half_at(block + 2, mask) * m.to(tl.float32)
    return d * q.to(tl.float32) - dmin  # both products exact: one rounding


@triton.jit
def _pick(q, bit: tl.constexpr, lo, hi):
    return tl.where(((q >> bit) & 1) != 0, hi, lo)


@triton.jit
def _iq4_level(q):
    """IQ4's level q (0..15) of formats.IQ4_LEVELS, as fp32: a tree of selects on q's bits."""
    a = _pick(q, 1, _pick(q, 0, -127.0, -104.0), _pick(q, 0, -83.0, -65.0))
    b = _pick(q, 1, _pick(q, 0, -49.0, -35.0), _pick(q, 0, -22.0, -10.0))
    c = _pick(q, 1, _pick(q, 0, 1.0, 13.0), _pick(q, 0, 25.0, 38.0))
    e = _pick(q, 1, _pick(q, 0, 53.0, 69.0), _pick(q, 0, 89.0, 113.0))
    return _pick(q, 3, _pick(q, 2, a, b), _pick(q, 2, c, e))


@triton.jit
def _iq4_value(block, j, mask, QUANT: tl.constexpr):
    """Value j of the IQ4_NL blocks (j < 32: d level[q]) or IQ4_XS super-blocks (j < 256:
    sub-block s = j / 32's (d (ls_s - 32)) level[q]) at block, in fp32 (the products exact)."""
    d = _half_at(block, mask)
    if QUANT == IQ4_XS:
        s = j // 32
        low = (_byte(block + 4 + s // 2, mask) >> (s % 2 * 4)) & 15
        high = (_byte(block + 2 + s // 4, mask) >> (s % 4 * 2)) & 3  # bits 2 s, 2 s + 1 of the u16
        d = d * ((low | (high << 4)) - 32).to(tl.float32)
        qs = block + 8 + s * 16
    else:
        qs = block + 2
    i = j % 32
    q = (_byte(qs + i % 16, mask) >> (i // 16 * 4)) & 15
    return d * _iq4_level(q)


@triton.jit
def _q6_k_value(block, j, mask):
    """Value j (< 256) of the Q6_K super-blocks at block, in fp32: (d sc_{j / 16}) (q - 32)."""
    half = j // 128
    g = j % 128 // 32
    i = j % 32
    # In each half: value 32 g + i takes ql[i + 32 (g % 2)]'s low (g < 2) or high nibble, and
    # bits 2 g, 2 g + 1 of qh[i].
    low = (_byte(block + half * 64 + g % 2 * 32 + i, mask) >> (g // 2 * 4)) & 15
    high = (_byte(block + 128 + half * 32 + i, mask) >> (g * 2)) & 3
    d = _half_at(block + 208, mask) * _int8_at(block + 192 + j // 16, mask)
    return d * ((low | (high << 4)) - 32).to(tl.float32)


@triton.jit
def _qlinear_kernel(
    X, W, BIAS, OUT, stride_xm, M, K, N, row_bytes,
    QUANT: tl.constexpr, BLOCK_VALUES: tl.constexpr, BLOCK_BYTES: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROUND_BY_HAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    rows = W + n.to(tl.int64)[:, None] * row_bytes
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        ok = n_ok[:, None] & k_ok[None, :]
        x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        block = rows + (k // BLOCK_VALUES)[None, :] * BLOCK_BYTES  # each value's block
        j = (k % BLOCK_VALUES)[None, :]
        if QUANT == IQ4_NL or QUANT == IQ4_XS:
            w = _iq4_value(block, j, ok, QUANT)
        elif QUANT == Q6_K:
            w = _q6_k_value(block, j, ok)
        elif BLOCK_VALUES == 256:
            w = _k_value(block, j, ok, QUANT)
        else:
            w = _legacy_value(block, j, ok, QUANT)
        acc += tl.sum(tl.where(ok[None, :, :], w[None, :, :] * x[:, None, :], 0.0), axis=2)
    if HAS_BIAS:
        acc += tl.load(BIAS + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + m[:, None] * N + n[None, :], _cast(acc, OUT.dtype.element_ty, ROUND_BY_HAND),
             mask=m_ok[:, None] & n_ok[None, :])


def quantized_linear_forward(x: Tensor, blocks: Tensor, quant: str, bias: Tensor | None) -> Tensor:
    """x (rows, K) with a contiguous last dim, blocks uint8 (N, K / block values * block bytes)
    contiguous, quant a formats.py format ("q4_0" | "q4_1" | "q5_0" | "q5_1" | "q8_0" | "iq4_nl":
    32-value blocks; "q4_k" | "q5_k" | "q6_k" | "iq4_xs": 256), bias (N,) or None -> (rows, N) in
    x's dtype."""
    rows, K = x.shape
    N = blocks.shape[0]
    out = torch.empty((rows, N), dtype=x.dtype, device=x.device)
    if rows == 0 or N == 0:
        return out
    code, values, nbytes = _FORMATS[quant]
    block_m = min(MAX_BLOCK_M, triton.next_power_of_2(int(rows)))
    block_k = min(BLOCK_K, PRODUCTS // (block_m * BLOCK_N), triton.next_power_of_2(max(int(K), 32)))
    wrap_triton(_qlinear_kernel)[(triton.cdiv(N, BLOCK_N), triton.cdiv(rows, block_m))](
        x, blocks, bias if bias is not None else x, out, x.stride(0), rows, K, N, blocks.shape[1],
        QUANT=code, BLOCK_VALUES=values, BLOCK_BYTES=nbytes, HAS_BIAS=bias is not None,
        ROUND_BY_HAND=ROUND_BF16_BY_HAND, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=block_k, num_warps=4,
    )
    return out
