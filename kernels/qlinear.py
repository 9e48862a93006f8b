"""Triton kernel of the linear layer on block-quantized weights (GGUF's Q4_0, Q4_1, Q8_0
blocks, fastarch/ops/qlinear/reference.py), and its launcher.

One program computes BLOCK_N output columns of one row of x: it walks those BLOCK_N rows of
blocks BLOCK_K values at a time, reading each value's byte (and its block's fp16 scale and
offset) from the blocks as stored, widening it to fp32 exactly as ggml does, and sums the
products with the x row along K in fp32; then adds the bias and rounds once.
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
_FORMATS = {"q4_0": (0, 18), "q4_1": (1, 20), "q8_0": (2, 34)}  # (QUANT constexpr, bytes per block)


@triton.jit
def _half_at(p, mask):
    """The little-endian fp16 at bytes p, p + 1, as fp32."""
    lo = tl.load(p, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(p + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _qlinear_kernel(
    X, W, BIAS, OUT, stride_xm, K, N, row_bytes,
    QUANT: tl.constexpr, BLOCK_BYTES: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_BY_HAND: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    rows = W + n.to(tl.int64)[:, None] * row_bytes
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        ok = n_ok[:, None] & k_ok[None, :]
        x = tl.load(X + m * stride_xm + k, mask=k_ok, other=0.0).to(tl.float32)
        block = rows + (k // 32)[None, :] * BLOCK_BYTES  # each value's block
        j = (k % 32)[None, :]
        d = _half_at(block, ok)
        if QUANT == 2:  # Q8_0: d, 32 int8
            q = tl.load(block + 2 + j, mask=ok, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            w = q * d
        else:  # Q4_0 / Q4_1: byte j % 16 holds value j % 16 low, value j % 16 + 16 high
            head = 4 if QUANT == 1 else 2
            byte = tl.load(block + head + j % 16, mask=ok, other=0).to(tl.int32)
            q = (byte >> ((j // 16) * 4)) & 15
            if QUANT == 1:
                w = q.to(tl.float32) * d + _half_at(block + 2, ok)  # (d * q is exact: one rounding)
            else:
                w = (q - 8).to(tl.float32) * d
        acc += tl.sum(tl.where(ok, w * x[None, :], 0.0), axis=1)
    if HAS_BIAS:
        acc += tl.load(BIAS + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(OUT + m * N + n, _cast(acc, OUT.dtype.element_ty, ROUND_BY_HAND), mask=n_ok)


def quantized_linear_forward(x: Tensor, blocks: Tensor, quant: str, bias: Tensor | None) -> Tensor:
    """x (rows, K) with a contiguous last dim, blocks uint8 (N, K / 32 * block bytes)
    contiguous, quant "q4_0" | "q4_1" | "q8_0", bias (N,) or None -> (rows, N) in x's dtype."""
    rows, K = x.shape
    N = blocks.shape[0]
    out = torch.empty((rows, N), dtype=x.dtype, device=x.device)
    if rows == 0 or N == 0:
        return out
    code, nbytes = _FORMATS[quant]
    block_k = min(BLOCK_K, triton.next_power_of_2(max(int(K), 32)))
    wrap_triton(_qlinear_kernel)[(triton.cdiv(N, BLOCK_N), rows)](
        x, blocks, bias if bias is not None else x, out, x.stride(0), K, N, blocks.shape[1],
        QUANT=code, BLOCK_BYTES=nbytes, HAS_BIAS=bias is not None, ROUND_BY_HAND=ROUND_BF16_BY_HAND,
        BLOCK_N=BLOCK_N, BLOCK_K=block_k, num_warps=4,
    )
    return out
