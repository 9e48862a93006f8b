"""Triton kernel of the small-batch linear layer (y = x W^T + b for a few rows of x), and its
launcher.

One program computes BLOCK_N output columns of one row of x: it streams those BLOCK_N rows of W
in BLOCK_K-wide steps, multiplies each by the x row in fp32 and sums along K, then adds the bias
and rounds once. Memory-bound: W is the traffic; the programs of the other x rows find their W
rows in L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastarch.kernels.launch import wrap_triton
from fastarch.kernels.norms import ROUND_BF16_BY_HAND, _cast

BLOCK_N = 8
BLOCK_K = 256


@triton.jit
def _linear_kernel(
    X, W, BIAS, OUT, stride_xm, K, N,
    HAS_BIAS: tl.constexpr, ROUND_BY_HAND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(X + m * stride_xm + k, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(W + n.to(tl.int64)[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(BIAS + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(OUT + m * N + n, _cast(acc, OUT.dtype.element_ty, ROUND_BY_HAND), mask=n_ok)


def linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (rows, K) with a contiguous last dim, weight (N, K) contiguous, bias (N,) or None ->
    (rows, N) in x's dtype."""
    rows, K = x.shape
    N = weight.shape[0]
    out = torch.empty((rows, N), dtype=x.dtype, device=x.device)
    if rows == 0 or N == 0:
        return out
    block_k = min(BLOCK_K, triton.next_power_of_2(max(int(K), 1)))
    wrap_triton(_linear_kernel)[(triton.cdiv(N, BLOCK_N), rows)](
        x, weight, bias if bias is not None else x, out, x.stride(0), K, N,
        HAS_BIAS=bias is not None, ROUND_BY_HAND=ROUND_BF16_BY_HAND, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
        num_warps=4,
    )
    return out
