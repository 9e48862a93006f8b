"""Triton kernel of the rotary position embedding, and its launcher.

One program turns one head of one token: it reads the token's position, that position's
cos/sin row (rot_dim / 2 fp32 values, shared by every head, so they stay in cache), and
rotates the head's pairs in fp32, rounding once; channels past rot_dim are copied.
Memory-bound: every input element is read once and every output element written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastarch.kernels.launch import wrap_triton
from fastarch.kernels.norms import ROUND_BF16_BY_HAND, _cast

# Channels copied per step past the rotary dim.
BLOCK_PASS = 64


@triton.jit
def _rotary_kernel(
    X, OUT, COS, SIN, POS,
    stride_xb, stride_xh, stride_xs, stride_ob, stride_oh, stride_os, stride_pb, stride_ps,
    S, MAX_POS, HALF, D,
    HAS_POS: tl.constexpr, ADD_S: tl.constexpr, INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
    ROUND_BY_HAND: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    b = token // S
    s = token % S
    p = s * 0
    if HAS_POS:
        p = tl.load(POS + b * stride_pb + s * stride_ps).to(tl.int64)
    if ADD_S:
        p = p + s
    # The op checks positions before launching (asserted on the GPU, asynchronously); a
    # position past the table still never reads outside it, and gives NaN.
    inside = (p >= 0) & (p < MAX_POS)
    p = tl.where(inside, p, 0)

    i = tl.arange(0, BLOCK_HALF)
    m = i < HALF
    cos = tl.load(COS + p * HALF + i, mask=m, other=0.0)
    sin = tl.load(SIN + p * HALF + i, mask=m, other=0.0)
    cos = tl.where(inside, cos, float("nan"))
    if INVERSE:
        sin = -sin
    if INTERLEAVED:
        i1 = 2 * i
        i2 = 2 * i + 1
    else:
        i1 = i
        i2 = i + HALF
    x_row = X + b * stride_xb + head * stride_xh + s * stride_xs
    o_row = OUT + b * stride_ob + head * stride_oh + s * stride_os
    x1 = tl.load(x_row + i1, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + i2, mask=m, other=0.0).to(tl.float32)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    dtype = OUT.dtype.element_ty
    tl.store(o_row + i1, _cast(y1, dtype, ROUND_BY_HAND), mask=m)
    tl.store(o_row + i2, _cast(y2, dtype, ROUND_BY_HAND), mask=m)
    for start in range(2 * HALF, D, BLOCK_PASS):
        j = start + tl.arange(0, BLOCK_PASS)
        mj = j < D
        tl.store(o_row + j, tl.load(x_row + j, mask=mj), mask=mj)


def _bhs_strides(t: Tensor) -> tuple[int, int, int]:
    """(batch, head, token) strides of 4-D (B, H, S, D) or packed (total, H, D) t."""
    if t.dim() == 4:
        return t.stride(0), t.stride(1), t.stride(2)
    return 0, t.stride(1), t.stride(0)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None, interleaved: bool, inverse: bool) -> Tensor:
    out = torch.empty_like(x)
    if x.dim() == 4:
        batch, heads, seqlen = x.shape[0], x.shape[1], x.shape[2]
    else:
        batch, heads, seqlen = 1, x.shape[1], x.shape[0]
    if batch * seqlen * heads == 0:
        return out
    half = cos.shape[1]
    if positions is None:
        pos, pos_strides, add_s = cos, (0, 0), True  # cos: any tensor for a pointer never read
    elif x.dim() == 4 and positions.dim() == 1:  # offsets
        pos, pos_strides, add_s = positions, (positions.stride(0), 0), True
    elif x.dim() == 4:
        pos, pos_strides, add_s = positions, (positions.stride(0), positions.stride(1)), False
    else:
        pos, pos_strides, add_s = positions, (0, positions.stride(0)), False
    wrap_triton(_rotary_kernel)[(batch * seqlen, heads)](
        x, out, cos, sin, pos, *_bhs_strides(x), *_bhs_strides(out), *pos_strides,
        seqlen, cos.shape[0], half, x.shape[-1],
        HAS_POS=positions is not None, ADD_S=add_s, INTERLEAVED=interleaved, INVERSE=inverse,
        ROUND_BY_HAND=ROUND_BF16_BY_HAND, BLOCK_HALF=triton.next_power_of_2(int(half)), BLOCK_PASS=BLOCK_PASS,
        num_warps=1 if half <= 64 else 2,
    )
    return out


def rotary_forward(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None, interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor]:
    """q: (B, Hq, S, D) or packed (total, Hq, D); k likewise with Hk heads; cos, sin:
    (max_pos, rot_dim / 2) fp32 contiguous; positions: None, (B,) offsets, (B, S) or (total,)
    int64 (fastarch/ops/rope/reference.py has the semantics). Returns (q_out, k_out)."""
    return (
        _rotate(q, cos, sin, positions, interleaved, inverse),
        _rotate(k, cos, sin, positions, interleaved, inverse),
    )
