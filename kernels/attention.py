"""Triton kernels of fused attention, and their launchers: the forward (FlashAttention-2: online
softmax over key blocks), the backward (delta = rowsum(dO * O), then a dK/dV kernel over query
blocks and a dQ kernel over key blocks) and flash-decoding against a key/value cache (split-K
partial results and a combine). The semantics are those of fastarch/ops/attention_reference.py.

Shared structure:
- One program owns a tile of rows (queries; keys in the dK/dV kernel) of one head of one
  sequence and loops over the tiles of the other side. Only the tiles that intersect the
  visible band (causal, sliding window, sequence length) are visited, and only those that the
  band cuts (the diagonal ones, the sequence's last one) pay for the element-wise mask:
  _band splits the loop into masked / unmasked / masked ranges.
- Grids are (row tiles, heads, batch); with packed variable lengths the batch axis is the
  sequence n of cu_seqlens and the batch strides are 0 (the 4-D view has B == 1).
- Scores are kept in log2 units: exp2 with log2(e) folded into the scale (and into the additive
  mask); lse is stored in natural units for the interface.
- Grouped-query attention indexes key/value head h // GROUP; the dK/dV kernel loops over the
  GROUP query heads of its key/value head, so dk and dv need no atomics and no partials.
- Dropout recomputes the reference's hash: a query row's first round once per program, the
  key's round per tile (uint32 arithmetic, exactly attention_reference.dropout_hash).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
_M32 = 0xFFFFFFFF
# Triton's CPU interpreter (TRITON_INTERPRET=1, for tests without a GPU) holds bf16 as uint16:
# its tl.dot multiplies bf16 operands as integers, and its fp32 -> bf16 casts truncate. The
# kernels then feed tl.dot fp32 operands holding the values the GPU would see (rounded to the
# inputs' dtype by hand), which makes the interpreter compute what the GPU computes.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- shared helpers


@triton.jit
def _round_bf16(x):
    """x (fp32) rounded to nearest even bf16, still held in fp32 (the interpreter's casts truncate)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # NaN and inf survive
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x (fp32) rounded to dtype for a store, as on the GPU."""
    if INTERPRET and dtype == tl.bfloat16:
        x = _round_bf16(x)  # exact in bf16 now: the interpreter's truncation is harmless
    return x.to(dtype)


@triton.jit
def _operand(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x (fp32) rounded to the inputs' dtype for tl.dot; in the interpreter kept in fp32."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            return _round_bf16(x)
        return x.to(dtype).to(tl.float32)
    return x.to(dtype)


@triton.jit
def _load_tile(ptr, offs_r, stride_r, offs_c, row_ok, CHECK_ROWS: tl.constexpr, COLS: tl.constexpr,
               BLOCK_C: tl.constexpr, INTERPRET: tl.constexpr):
    """A (rows, BLOCK_C) tile of a row-major matrix, zero outside the rows row_ok and the COLS
    real columns (BLOCK_C is COLS padded to a power of two)."""
    ptrs = ptr + offs_r[:, None] * stride_r + offs_c[None, :]
    if CHECK_ROWS:
        if COLS == BLOCK_C:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & (offs_c[None, :] < COLS), other=0.0)
    else:
        if COLS == BLOCK_C:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_c[None, :] < COLS, other=0.0)
    if INTERPRET:
        x = x.to(tl.float32)
    return x


@triton.jit
def _mix32(h):
    """attention_reference._mix32 on uint32 (the products wrap modulo 2**32)."""
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x4C7D19F3
    return h ^ (h >> 16)


@triton.jit
def _band(first, last, size, diag, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
          BLOCK: tl.constexpr):
    """Which columns the rows first..last of a tile see, where row i sees column j < size when
    i + diag - left <= j (if HAS_LEFT) and j <= i + diag + right (if HAS_RIGHT).

    Returns 0 <= lo <= full_lo <= full_hi <= hi <= size: [lo, hi) holds every column some row
    sees; the BLOCK-aligned [full_lo, full_hi) only column blocks that every row sees whole (no
    mask); [lo, full_lo) and [full_hi, hi) are the blocks the band cuts. lo is BLOCK-aligned
    too. A tile that sees no column (wholly left of the band: Sq > Sk under causal, a window's
    right side) gets lo == full_lo == full_hi == hi: every loop is empty, none runs over
    negative columns. Rows are those of a sequence of size - diag rows (first < size - diag).
    (Every operand of // is >= 0: the interpreter floors where the GPU truncates.)"""
    lo = 0
    hi = size
    full_lo = 0
    full_hi = size // BLOCK * BLOCK
    if HAS_RIGHT:
        hi = tl.minimum(tl.maximum(last + diag + right + 1, 0), size)
        full_hi = tl.minimum(tl.maximum(first + diag + right + 1, 0), size) // BLOCK * BLOCK
    if HAS_LEFT:
        lo = tl.maximum(first + diag - left, 0) // BLOCK * BLOCK  # <= hi: first < size - diag
        full_lo = tl.minimum(tl.maximum((tl.maximum(last + diag - left, 0) + BLOCK - 1) // BLOCK * BLOCK, lo), hi)
    if HAS_LEFT or HAS_RIGHT:
        full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _add_mask(s, bias):
    """Scores s (log2 units) plus the additive attn_mask entries bias (natural units). A -inf
    entry masks: the score is -inf even where s is NaN (NaN + -inf is NaN, and a NaN q or k must
    not reach a query through a key its mask hides); that compare and select is all the NaN
    contract adds to a step, and only with an attn_mask."""
    bias = bias.to(tl.float32)
    return tl.where(bias == float("-inf"), float("-inf"), s + bias * 1.4426950408889634)  # log2(e)


@triton.jit
def _visible(i, j, seqlen_q, seqlen_k, diag, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """bool tile: query i sees key j (i, j broadcast against each other)."""
    ok = (i < seqlen_q) & (j < seqlen_k)
    if HAS_RIGHT:
        ok = ok & (j <= i + diag + right)
    if HAS_LEFT:
        ok = ok & (j >= i + diag - left)
    return ok


@triton.jit
def _sequence(CU_Q, CU_K, n, seqlen_q_4d, seqlen_k_4d, VARLEN: tl.constexpr):
    """(first query row, query count, first key row, key count) of sequence n (batch entry n,
    or packed sequence n of cu_seqlens)."""
    if VARLEN:
        q_start = tl.load(CU_Q + n)
        seqlen_q = tl.load(CU_Q + n + 1) - q_start
        k_start = tl.load(CU_K + n)
        seqlen_k = tl.load(CU_K + n + 1) - k_start
    else:
        q_start = 0
        seqlen_q = seqlen_q_4d
        k_start = 0
        seqlen_k = seqlen_k_4d
    return q_start, seqlen_q, k_start, seqlen_k


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q, row_hash, K_seq, V_seq, MASK_rows, KPM_seq,
    stride_ks, stride_vs, stride_mk,
    offs_m, row_ok, lo, hi, seqlen_q, seqlen_k, k_start, diag, left, right, qk_scale, drop_threshold,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """The online softmax over the key blocks [lo, hi) (element-wise masks only if MASKED)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        start = tl.cast(start_n, tl.int64)  # (the interpreter iterates Python ints)
        cols = start_n + offs_n
        col_ok = cols < seqlen_k
        k = _load_tile(K_seq + start * stride_ks, offs_n, stride_ks, offs_d, col_ok, MASKED, HEAD_DIM, BLOCK_D,
                       INTERPRET)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_MASK:
            bias = tl.load(MASK_rows[:, None] + (start * stride_mk + offs_n * stride_mk)[None, :],
                           mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            s = _add_mask(s, bias)
        if HAS_KPM:
            real = tl.load(KPM_seq + cols, mask=col_ok, other=0)
            s = tl.where(real[None, :] != 0, s, float("-inf"))
        if MASKED:
            s = tl.where(_visible(offs_m[:, None], cols[None, :], seqlen_q, seqlen_k, diag, left, right, HAS_LEFT,
                                  HAS_RIGHT), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = m_new
        if MASKED or HAS_MASK or HAS_KPM:
            # a row that has seen nothing yet takes 0 as its reference (no -inf - -inf = NaN), but
            # keeps m_i = -inf: a stand-in m_i = 0 would be the reference of its later keys too,
            # against which the exp2 of scores far below 0 underflow
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _mix32(row_hash[:, None] ^ (k_start + cols).to(tl.uint32)[None, :]) >= drop_threshold
            p = tl.where(keep, p, 0.0)
        v = _load_tile(V_seq + start * stride_vs, offs_n, stride_vs, offs_dv, col_ok, MASKED, HEAD_DIM_V, BLOCK_DV,
                       INTERPRET)
        acc = tl.dot(_operand(p, V_seq.dtype.element_ty, INTERPRET), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _attn_fwd_kernel(
    Q, K, V, MASK, KPM, CU_Q, CU_K, OUT, LSE,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os, stride_mb, stride_mh, stride_mq, stride_mk, stride_kpm,
    H, GROUP, seqlen_q_4d, seqlen_k_4d, qk_scale, left, right, seed, drop_threshold, drop_scale, seqlen_bucket,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # seqlen_bucket only keys the autotuner
    pid_m = tl.program_id(0)
    if HAS_RIGHT:  # causal-like: the last query tiles have the most keys, so they start first
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    n = tl.program_id(2)
    q_start, seqlen_q, k_start, seqlen_k = _sequence(CU_Q, CU_K, n, seqlen_q_4d, seqlen_k_4d, VARLEN)
    first = pid_m * BLOCK_M
    if first >= seqlen_q:
        return
    last = tl.minimum(first + BLOCK_M, seqlen_q) - 1
    diag = seqlen_k - seqlen_q
    hkv = h // GROUP
    n64 = n.to(tl.int64)
    offs_m = first + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seqlen_q
    rows = (q_start + offs_m).to(tl.int64)  # in the 4-D view
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = _load_tile(Q + n64 * stride_qb + h.to(tl.int64) * stride_qh, rows, stride_qs, offs_d, row_ok, True, HEAD_DIM,
                   BLOCK_D, INTERPRET)
    K_seq = K + n64 * stride_kb + hkv.to(tl.int64) * stride_kh + tl.cast(k_start, tl.int64) * stride_ks
    V_seq = V + n64 * stride_vb + hkv.to(tl.int64) * stride_vh + tl.cast(k_start, tl.int64) * stride_vs
    MASK_rows = MASK + n64 * stride_mb + h.to(tl.int64) * stride_mh + rows * stride_mq + tl.cast(k_start, tl.int64) * stride_mk
    KPM_seq = KPM + n64 * stride_kpm + k_start
    row_hash = offs_m.to(tl.uint32)
    if DROPOUT:  # the first round of the hash depends on the row only
        b = n
        if VARLEN:
            b = 0
        row_hash = _mix32(((b * H + h).to(tl.int64) * seqlen_q_4d + rows + seed).to(tl.uint32))

    lo, full_lo, full_hi, hi = _band(first, last, seqlen_k, diag, left, right, HAS_LEFT, HAS_RIGHT, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    args = (K_seq, V_seq, MASK_rows, KPM_seq, stride_ks, stride_vs, stride_mk, offs_m, row_ok)
    band = (seqlen_q, seqlen_k, k_start, diag, left, right, qk_scale, drop_threshold)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, row_hash, *args, lo, full_lo, *band, True, HAS_LEFT, HAS_RIGHT,
                                HAS_MASK, HAS_KPM, DROPOUT, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, PRECISION,
                                INTERPRET)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, row_hash, *args, full_lo, full_hi, *band, False, HAS_LEFT,
                                HAS_RIGHT, HAS_MASK, HAS_KPM, DROPOUT, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                                BLOCK_N, PRECISION, INTERPRET)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, row_hash, *args, full_hi, hi, *band, True, HAS_LEFT, HAS_RIGHT,
                                HAS_MASK, HAS_KPM, DROPOUT, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, PRECISION,
                                INTERPRET)

    # l_i is 0 for a query that sees no key, >= 1 for one that does, and NaN for one with a NaN
    # score, whose out and lse must be NaN (with dropout its acc may have dropped the NaN)
    seen = l_i != 0.0
    out = acc * (drop_scale / tl.where(seen, l_i, 1.0))[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_ptrs = OUT + n64 * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_os + offs_dv[None, :]
    o_mask = row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    tl.store(o_ptrs, _cast(out, OUT.dtype.element_ty, INTERPRET), mask=o_mask)
    b = n
    if VARLEN:
        b = 0
    tl.store(LSE + (b * H + h).to(tl.int64) * seqlen_q_4d + rows, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_delta_kernel(
    OUT, DOUT, DELTA, stride_ob, stride_oh, stride_os, stride_db, stride_dh, stride_ds, H, seqlen_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32: the softmax backward's rowsum(P * dP), dropout included
    (O = (P * Z / (1 - p)) V, so rowsum(dO * O) = rowsum(P * Z / (1 - p) * dO V^T))."""
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_DV)
    mask = row_ok[:, None] & (cols[None, :] < HEAD_DIM_V)
    o = tl.load(OUT + b * stride_ob + h * stride_oh + rows64[:, None] * stride_os + cols[None, :], mask=mask, other=0.0)
    do = tl.load(DOUT + b * stride_db + h * stride_dh + rows64[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + (b * H + h) * seqlen_q + rows64, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_blocks(
    dk, dv, k, v, kpm_real, Q_head, DO_head, LSE_head, DELTA_head, MASK_cols, row_base,
    stride_qs, stride_dos, stride_mq,
    offs_n, lo, hi, seqlen_q, seqlen_k, k_start, diag, left, right, qk_scale, seed, drop_threshold, drop_scale,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """dk, dv of one key tile from the query blocks [lo, hi) of one query head, transposed
    (keys along rows): sT = k q^T, pT = exp2(sT - lse), dv += pT dO, dsT = pT (v dO^T - delta),
    dk += dsT q."""
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    dtype = Q_head.dtype.element_ty
    for start_m in range(lo, hi, BLOCK_M):
        start = tl.cast(start_m, tl.int64)
        offs_m = start_m + offs_m0
        row_ok = offs_m < seqlen_q
        q = _load_tile(Q_head + start * stride_qs, offs_m0, stride_qs, offs_d, row_ok, MASKED, HEAD_DIM, BLOCK_D,
                       INTERPRET)
        do = _load_tile(DO_head + start * stride_dos, offs_m0, stride_dos, offs_dv, row_ok, MASKED, HEAD_DIM_V,
                        BLOCK_DV, INTERPRET)
        if MASKED:
            lse = tl.load(LSE_head + offs_m, mask=row_ok, other=float("-inf"))
            delta = tl.load(DELTA_head + offs_m, mask=row_ok, other=0.0)
        else:
            lse = tl.load(LSE_head + offs_m)
            delta = tl.load(DELTA_head + offs_m)
        # a query that sees no key has lse = -inf: +inf makes its probabilities 0, not NaN
        lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        if HAS_MASK:
            bias = tl.load(MASK_cols[:, None] + (start * stride_mq + offs_m0 * stride_mq)[None, :],
                           mask=(offs_n < seqlen_k)[:, None] & row_ok[None, :], other=0.0)
            sT = _add_mask(sT, bias)
        if HAS_KPM:
            sT = tl.where(kpm_real[:, None], sT, float("-inf"))
        if MASKED:
            sT = tl.where(_visible(offs_m[None, :], offs_n[:, None], seqlen_q, seqlen_k, diag, left, right, HAS_LEFT,
                                   HAS_RIGHT), sT, float("-inf"))
        pT = tl.math.exp2(sT - lse[None, :])
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if DROPOUT:
            row_hash = _mix32((row_base + start + offs_m0 + seed).to(tl.uint32))
            keep = _mix32(row_hash[None, :] ^ (k_start + offs_n).to(tl.uint32)[:, None]) >= drop_threshold
            pT_used = tl.where(keep, pT * drop_scale, 0.0)
            dpT = tl.where(keep, dpT * drop_scale, 0.0)
        else:
            pT_used = pT
        dv = tl.dot(_operand(pT_used, dtype, INTERPRET), do, dv, input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(_operand(dsT, dtype, INTERPRET), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOUT, LSE, DELTA, MASK, KPM, CU_Q, CU_K, DK, DV,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
    stride_mb, stride_mh, stride_mq, stride_mk, stride_kpm,
    H, GROUP, seqlen_q_4d, seqlen_k_4d, qk_scale, scale, left, right, seed, drop_threshold, drop_scale, seqlen_bucket,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One tile of BLOCK_N keys of one key/value head: dk, dv summed over the GROUP query heads
    that read it and over the query blocks that see it."""
    pid_n = tl.program_id(0)
    if HAS_LEFT:  # the first key tiles are seen by the most queries (causal ones: the last)
        pid_n = tl.num_programs(0) - 1 - pid_n
    hkv = tl.program_id(1)
    n = tl.program_id(2)
    q_start, seqlen_q, k_start, seqlen_k = _sequence(CU_Q, CU_K, n, seqlen_q_4d, seqlen_k_4d, VARLEN)
    first = pid_n * BLOCK_N
    if first >= seqlen_k:
        return
    last = tl.minimum(first + BLOCK_N, seqlen_k) - 1
    diag = seqlen_k - seqlen_q
    n64 = n.to(tl.int64)
    offs_n = first + tl.arange(0, BLOCK_N)
    col_ok = offs_n < seqlen_k
    keys = (k_start + offs_n).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(K + n64 * stride_kb + hkv.to(tl.int64) * stride_kh, keys, stride_ks, offs_d, col_ok, True, HEAD_DIM,
                   BLOCK_D, INTERPRET)
    v = _load_tile(V + n64 * stride_vb + hkv.to(tl.int64) * stride_vh, keys, stride_vs, offs_dv, col_ok, True,
                   HEAD_DIM_V, BLOCK_DV, INTERPRET)
    kpm_real = col_ok
    if HAS_KPM:
        kpm_real = tl.load(KPM + n64 * stride_kpm + keys, mask=col_ok, other=0) != 0
    b = n
    if VARLEN:
        b = 0
    # query i sees key j when j - diag - right <= i <= j - diag + left: the band seen from the keys
    lo, full_lo, full_hi, hi = _band(first, last, seqlen_q, -diag, right, left, HAS_RIGHT, HAS_LEFT, BLOCK_M)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    q_first = tl.cast(q_start, tl.int64)
    for g in range(GROUP):
        h = (hkv * GROUP + g).to(tl.int64)
        Q_head = Q + n64 * stride_qb + h * stride_qh + q_first * stride_qs
        DO_head = DOUT + n64 * stride_dob + h * stride_doh + q_first * stride_dos
        stats = (b * H + h) * seqlen_q_4d + q_first
        MASK_cols = MASK + n64 * stride_mb + h * stride_mh + q_first * stride_mq + keys * stride_mk
        args = (k, v, kpm_real, Q_head, DO_head, LSE + stats, DELTA + stats, MASK_cols, stats,
                stride_qs, stride_dos, stride_mq, offs_n)
        band = (seqlen_q, seqlen_k, k_start, diag, left, right, qk_scale, seed, drop_threshold, drop_scale)
        dk, dv = _bwd_dkdv_blocks(dk, dv, *args, lo, full_lo, *band, True, HAS_LEFT, HAS_RIGHT, HAS_MASK, HAS_KPM,
                                  DROPOUT, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, PRECISION, INTERPRET)
        dk, dv = _bwd_dkdv_blocks(dk, dv, *args, full_lo, full_hi, *band, False, HAS_LEFT, HAS_RIGHT, HAS_MASK,
                                  HAS_KPM, DROPOUT, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, PRECISION, INTERPRET)
        dk, dv = _bwd_dkdv_blocks(dk, dv, *args, full_hi, hi, *band, True, HAS_LEFT, HAS_RIGHT, HAS_MASK, HAS_KPM,
                                  DROPOUT, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, PRECISION, INTERPRET)
    dk = dk * scale
    dk_ptrs = DK + n64 * stride_dkb + hkv.to(tl.int64) * stride_dkh + keys[:, None] * stride_dks + offs_d[None, :]
    tl.store(dk_ptrs, _cast(dk, DK.dtype.element_ty, INTERPRET), mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    dv_ptrs = DV + n64 * stride_dvb + hkv.to(tl.int64) * stride_dvh + keys[:, None] * stride_dvs + offs_dv[None, :]
    tl.store(dv_ptrs, _cast(dv, DV.dtype.element_ty, INTERPRET), mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _bwd_dq_blocks(
    dq, q, do, lse, delta, row_hash, K_seq, V_seq, MASK_rows, KPM_seq,
    stride_ks, stride_vs, stride_mk,
    offs_m, row_ok, lo, hi, seqlen_q, seqlen_k, k_start, diag, left, right, qk_scale, drop_threshold, drop_scale,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """dq of one query tile from the key blocks [lo, hi): ds = p (dO v^T - delta), dq += ds k."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        start = tl.cast(start_n, tl.int64)
        cols = start_n + offs_n
        col_ok = cols < seqlen_k
        k = _load_tile(K_seq + start * stride_ks, offs_n, stride_ks, offs_d, col_ok, MASKED, HEAD_DIM, BLOCK_D,
                       INTERPRET)
        v = _load_tile(V_seq + start * stride_vs, offs_n, stride_vs, offs_dv, col_ok, MASKED, HEAD_DIM_V, BLOCK_DV,
                       INTERPRET)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_MASK:
            bias = tl.load(MASK_rows[:, None] + (start * stride_mk + offs_n * stride_mk)[None, :],
                           mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            s = _add_mask(s, bias)
        if HAS_KPM:
            real = tl.load(KPM_seq + cols, mask=col_ok, other=0)
            s = tl.where(real[None, :] != 0, s, float("-inf"))
        if MASKED:
            s = tl.where(_visible(offs_m[:, None], cols[None, :], seqlen_q, seqlen_k, diag, left, right, HAS_LEFT,
                                  HAS_RIGHT), s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _mix32(row_hash[:, None] ^ (k_start + cols).to(tl.uint32)[None, :]) >= drop_threshold
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(_operand(ds, K_seq.dtype.element_ty, INTERPRET), k, dq, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _attn_bwd_dq_kernel(
    Q, K, V, DOUT, LSE, DELTA, MASK, KPM, CU_Q, CU_K, DQ,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos, stride_dqb, stride_dqh, stride_dqs,
    stride_mb, stride_mh, stride_mq, stride_mk, stride_kpm,
    H, GROUP, seqlen_q_4d, seqlen_k_4d, qk_scale, scale, left, right, seed, drop_threshold, drop_scale, seqlen_bucket,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq of one tile of BLOCK_M queries of one head (the forward's loop, recomputing p)."""
    pid_m = tl.program_id(0)
    if HAS_RIGHT:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    n = tl.program_id(2)
    q_start, seqlen_q, k_start, seqlen_k = _sequence(CU_Q, CU_K, n, seqlen_q_4d, seqlen_k_4d, VARLEN)
    first = pid_m * BLOCK_M
    if first >= seqlen_q:
        return
    last = tl.minimum(first + BLOCK_M, seqlen_q) - 1
    diag = seqlen_k - seqlen_q
    hkv = h // GROUP
    n64 = n.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = first + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seqlen_q
    rows = (q_start + offs_m).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + n64 * stride_qb + h64 * stride_qh, rows, stride_qs, offs_d, row_ok, True, HEAD_DIM, BLOCK_D,
                   INTERPRET)
    do = _load_tile(DOUT + n64 * stride_dob + h64 * stride_doh, rows, stride_dos, offs_dv, row_ok, True, HEAD_DIM_V,
                    BLOCK_DV, INTERPRET)
    b = n
    if VARLEN:
        b = 0
    stats = (b * H + h).to(tl.int64) * seqlen_q_4d + rows
    lse = tl.load(LSE + stats, mask=row_ok, other=float("-inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + stats, mask=row_ok, other=0.0)
    row_hash = offs_m.to(tl.uint32)
    if DROPOUT:
        row_hash = _mix32((stats + seed).to(tl.uint32))
    K_seq = K + n64 * stride_kb + hkv.to(tl.int64) * stride_kh + tl.cast(k_start, tl.int64) * stride_ks
    V_seq = V + n64 * stride_vb + hkv.to(tl.int64) * stride_vh + tl.cast(k_start, tl.int64) * stride_vs
    MASK_rows = MASK + n64 * stride_mb + h64 * stride_mh + rows * stride_mq + tl.cast(k_start, tl.int64) * stride_mk
    KPM_seq = KPM + n64 * stride_kpm + k_start

    lo, full_lo, full_hi, hi = _band(first, last, seqlen_k, diag, left, right, HAS_LEFT, HAS_RIGHT, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    args = (q, do, lse, delta, row_hash, K_seq, V_seq, MASK_rows, KPM_seq, stride_ks, stride_vs, stride_mk, offs_m,
            row_ok)
    band = (seqlen_q, seqlen_k, k_start, diag, left, right, qk_scale, drop_threshold, drop_scale)
    dq = _bwd_dq_blocks(dq, *args, lo, full_lo, *band, True, HAS_LEFT, HAS_RIGHT, HAS_MASK, HAS_KPM, DROPOUT,
                        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, PRECISION, INTERPRET)
    dq = _bwd_dq_blocks(dq, *args, full_lo, full_hi, *band, False, HAS_LEFT, HAS_RIGHT, HAS_MASK, HAS_KPM, DROPOUT,
                        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, PRECISION, INTERPRET)
    dq = _bwd_dq_blocks(dq, *args, full_hi, hi, *band, True, HAS_LEFT, HAS_RIGHT, HAS_MASK, HAS_KPM, DROPOUT,
                        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, PRECISION, INTERPRET)
    dq = dq * scale
    dq_ptrs = DQ + n64 * stride_dqb + h64 * stride_dqh + rows[:, None] * stride_dqs + offs_d[None, :]
    tl.store(dq_ptrs, _cast(dq, DQ.dtype.element_ty, INTERPRET), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------- decode


@triton.jit
def _decode_split_kernel(
    Q, K, V, SEQLENS, OUT, LSE, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    H, GROUP, seqlen_q, cache_len, qk_scale, left, num_splits, splits_bucket,
    CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, DIRECT: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One split of the cache of one sequence, for the GROUP * seqlen_q query rows (all the
    query heads of one key/value head, every new token) of a row tile: each cache block is
    read once for the whole group. Writes the split's normalized output and lse (log2 units),
    or with DIRECT (a single split) the final out and lse. (splits_bucket only keys the
    autotuner: a power of two, so that a new batch size does not always tune anew.)"""
    split = tl.program_id(0)  # row_tile * num_splits + split
    hkv = tl.program_id(1)
    b = tl.program_id(2)
    rows_total = GROUP * seqlen_q
    row_tile = split // num_splits
    split = split % num_splits
    r = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < rows_total
    h = hkv * GROUP + r // seqlen_q  # (BLOCK_M,) query head of each row
    i = r % seqlen_q  # and its new token
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    i64 = i.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    q_ptrs = Q + b64 * stride_qb + h64[:, None] * stride_qh + i64[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if INTERPRET:
        q = q.to(tl.float32)

    seqlen_k = tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), cache_len)  # unchecked on a GPU: clamped
    diag = seqlen_k - seqlen_q
    lo = 0
    if HAS_LEFT:
        lo = tl.maximum(diag - left, 0)  # token 0's window: the leftmost of any row
    span = tl.maximum(seqlen_k - lo, 0)
    chunk = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    start_k = lo + split * chunk
    end_k = tl.minimum(start_k + chunk, seqlen_k)

    K_head = K + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
    V_head = V + b64 * stride_vb + hkv.to(tl.int64) * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start_n in range(start_k, end_k, BLOCK_N):
        start = tl.cast(start_n, tl.int64)
        cols = start_n + offs_n
        col_ok = cols < end_k
        k = _load_tile(K_head + start * stride_ks, offs_n, stride_ks, offs_d, col_ok, True, HEAD_DIM, BLOCK_D, INTERPRET)
        v = _load_tile(V_head + start * stride_vs, offs_n, stride_vs, offs_dv, col_ok, True, HEAD_DIM_V, BLOCK_DV,
                       INTERPRET)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        ok = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            ok = ok & (cols[None, :] <= i[:, None] + diag)
        if HAS_LEFT:
            ok = ok & (cols[None, :] >= i[:, None] + diag - left)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # m_i stays -inf: as in _fwd_blocks
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(_operand(p, V.dtype.element_ty, INTERPRET), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    seen = l_i != 0.0  # NaN for a query with a NaN score: out and lse NaN (as the forward)
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    stats = (b64 * H + h64) * seqlen_q + i64  # row of (B, H, Sq)
    if DIRECT:
        o_ptrs = OUT + b64 * stride_ob + h64[:, None] * stride_oh + i64[:, None] * stride_os + offs_dv[None, :]
        tl.store(o_ptrs, _cast(out, OUT.dtype.element_ty, INTERPRET),
                 mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
        tl.store(LSE + stats, lse2 * 0.6931471805599453, mask=row_ok)
    else:
        part = stats * num_splits + split
        tl.store(O_PART + part[:, None] * BLOCK_DV + offs_dv[None, :], out, mask=row_ok[:, None])
        tl.store(LSE_PART + part, lse2, mask=row_ok)


@triton.jit
def _decode_combine_kernel(
    O_PART, LSE_PART, OUT, LSE, stride_ob, stride_oh, stride_os, H, seqlen_q, num_splits,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr, INTERPRET: tl.constexpr,
):
    """out, lse of one query row from its splits: weights exp2(lse_s - max), all -inf -> 0, -inf."""
    row = tl.program_id(0).to(tl.int64)  # (b * H + h) * seqlen_q + i
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < num_splits
    offs_dv = tl.arange(0, BLOCK_DV)
    lse_s = tl.load(LSE_PART + row * num_splits + splits, mask=split_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse_s - m_use)
    total = tl.sum(w, 0)
    o = tl.load(O_PART + (row * num_splits + splits)[:, None] * BLOCK_DV + offs_dv[None, :], mask=split_ok[:, None],
                other=0.0)
    seen = total != 0.0  # a split's lse is NaN for a query with a NaN score: out and lse NaN
    out = tl.sum(o * w[:, None], 0) / tl.where(seen, total, 1.0)
    lse = tl.where(seen, (m_use + tl.math.log2(tl.where(seen, total, 1.0))) * 0.6931471805599453, float("-inf"))
    i = row % seqlen_q
    bh = row // seqlen_q
    o_ptrs = OUT + (bh // H) * stride_ob + (bh % H) * stride_oh + i * stride_os + offs_dv
    tl.store(o_ptrs, _cast(out, OUT.dtype.element_ty, INTERPRET), mask=offs_dv < HEAD_DIM_V)
    tl.store(LSE + row, lse)


# ----------------------------------------------------------------------------- launchers

# GPU tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim, for the autotuner to
# choose from (keyed on the head dims, the features, the dtypes and a sequence-length bucket).
# First guesses after the Triton tutorial and FlashAttention-2's tables, then: the H200 run of
# 2026-11-26 (forward 383-467 TFLOP/s; causal backward at S 2048 slower than non-causal) added
# 128 x 128 forward tiles and deeper pipelines; and compiling every entry for sm_90 without a
# GPU (bench/triton_resources.py --attention) showed that every dK/dV entry then in the table
# spilled 40 to 1900 bytes of registers per thread, so the tables below hold entries that do
# not spill there (causal, bf16, no masks or dropout), but for one measured dK/dV entry of D 128
# (32, 128, 8, 2: 152 bytes).
_FWD_CONFIGS = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (128, 64, 4, 4)],
    128: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 4)],
    256: [(128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
}
_DKDV_CONFIGS = {  # BLOCK_M queries per step, BLOCK_N keys per program
    64: [(32, 128, 8, 3), (32, 128, 8, 2), (32, 64, 8, 3), (16, 128, 8, 3), (16, 64, 8, 3)],
    128: [(16, 128, 8, 3), (16, 128, 8, 2), (16, 64, 8, 3), (32, 128, 8, 2)],
    256: [(16, 32, 8, 2)],
}
_DQ_CONFIGS = {  # BLOCK_M queries per program, BLOCK_N keys per step
    64: [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3)],
    128: [(128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3)],
    256: [(64, 32, 8, 2), (32, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 3)],
}
_TUNING_KEY = ["HEAD_DIM", "HEAD_DIM_V", "VARLEN", "HAS_LEFT", "HAS_RIGHT", "HAS_MASK", "HAS_KPM", "DROPOUT",
               "seqlen_bucket"]
# The interpreter's tiles (BLOCK_M, BLOCK_N): its time goes per tile operation, so bigger tiles
# run faster; M != N, and dK/dV's transposed to the others', as on the GPU.
INTERPRET_TILES = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32), "decode_n": 32}


# FASTARCH_TRITON_AUTOTUNE=0: every kernel runs the first entry of its table for the head dim,
# with no tuning runs (deterministic tiles, no first-call delay). FORCED_TILES[kernel name]
# (an entry of its table) overrides both, for tests that run every entry; a kernel's
# autotuner caches its choice per key, so clear its ``cache`` after changing it.
AUTOTUNE = os.environ.get("FASTARCH_TRITON_AUTOTUNE", "1") != "0"
FORCED_TILES: dict[str, tuple[int, ...]] = {}


def _autotuned(kernel, table: dict[int, list[tuple[int, ...]]], tiles=("BLOCK_M", "BLOCK_N"), key=None):
    """kernel behind an autotuner over table's entries for its head dim (in the interpreter:
    kernel itself, its tiles given at launch). An entry is the values of ``tiles``, then
    num_warps and num_stages."""
    if INTERPRET:
        return kernel
    configs = {t: triton.Config(dict(zip(tiles, t)), num_warps=t[-2], num_stages=t[-1])
               for entries in table.values() for t in entries}
    name = kernel.__name__

    def for_head_dim(_configs, named_args, **kwargs):
        if name in FORCED_TILES:
            return [configs[FORCED_TILES[name]]]
        args = {**named_args, **kwargs}
        d = max(args["BLOCK_D"], args["BLOCK_DV"])
        entries = table[64 if d <= 64 else 128 if d <= 128 else 256]
        return [configs[t] for t in (entries if AUTOTUNE else entries[:1])]

    return triton.autotune(list(configs.values()), key=key or _TUNING_KEY,
                           prune_configs_by={"early_config_prune": for_head_dim})(kernel)


# Decode: (BLOCK_N, num_warps, num_stages) by padded head dim; the cache streams through once, so
# what counts is the bytes in flight (deeper pipelines, wider tiles) against shared memory.
_DECODE_CONFIGS = {
    64: [(64, 4, 3), (128, 4, 3), (128, 4, 4), (64, 4, 4)],
    128: [(64, 4, 2), (64, 4, 3), (128, 4, 3), (64, 4, 4), (128, 8, 3)],
    256: [(32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 8, 3)],
}
_DECODE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "BLOCK_M", "CAUSAL", "HAS_LEFT", "DIRECT", "splits_bucket"]


_fwd_kernel = _autotuned(_attn_fwd_kernel, _FWD_CONFIGS)
_decode_kernel = _autotuned(_decode_split_kernel, _DECODE_CONFIGS, tiles=("BLOCK_N",), key=_DECODE_KEY)
_dkdv_kernel = _autotuned(_attn_bwd_dkdv_kernel, _DKDV_CONFIGS)
_dq_kernel = _autotuned(_attn_bwd_dq_kernel, _DQ_CONFIGS)


def _tiles(kernel: str) -> dict[str, int]:
    if not INTERPRET:
        return {}  # the autotuner's
    block_m, block_n = INTERPRET_TILES[kernel]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n)


def _bucket(seqlen: int) -> int:
    return min(triton.next_power_of_2(max(seqlen, 1)), 1 << 14)


def _head_dims(q: Tensor, v: Tensor) -> dict:
    """Head dims and their tiles: padded to a power of two, at least 16 (tl.dot's minimum)."""
    d, dv = int(q.shape[-1]), int(v.shape[-1])  # int: compile-time tiles (specialized when traced)
    return dict(
        HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INTERPRET=INTERPRET,
    )


def _strides(name: str, t: Tensor, varlen: bool) -> dict[str, int]:
    """stride_<name>b/h/s of a 4-D view; the batch stride 0 for packed sequences (the grid's
    batch axis is then the sequence, and B == 1)."""
    return {f"stride_{name}b": 0 if varlen else t.stride(0), f"stride_{name}h": t.stride(1),
            f"stride_{name}s": t.stride(2)}


def _shared(q, k, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal, scale, window_left,
            window_right, dropout_p, seed) -> dict:
    """The launch arguments the forward, dK/dV and dQ kernels share: masks, sequence offsets,
    the band, dropout, and the compile-time flags."""
    B, H, Sq, _ = q.shape
    varlen = cu_seqlens_q is not None
    rights = ([0] if causal else []) + ([window_right] if window_right >= 0 else [])
    absent = q  # any tensor, for a pointer whose flag is off
    args = dict(
        CU_Q=cu_seqlens_q if varlen else absent, CU_K=cu_seqlens_k if varlen else absent,
        MASK=absent, stride_mb=0, stride_mh=0, stride_mq=0, stride_mk=0, KPM=absent, stride_kpm=0,
        H=H, GROUP=H // k.shape[1], seqlen_q_4d=Sq, seqlen_k_4d=k.shape[2], qk_scale=scale * LOG2E,
        left=max(window_left, 0), right=min(rights) if rights else 0,
        seed=int(seed) & _M32, drop_threshold=min(int(dropout_p * 2**32), _M32), drop_scale=1.0 / (1.0 - dropout_p),
        VARLEN=varlen, HAS_LEFT=window_left >= 0, HAS_RIGHT=bool(rights), HAS_MASK=attn_mask is not None,
        HAS_KPM=key_padding_mask is not None, DROPOUT=dropout_p > 0,
    )
    if attn_mask is not None:  # (B, H, Sq, Sk), broadcast dims with stride 0
        sb, sh, sq, sk = attn_mask.stride()
        args.update(MASK=attn_mask, stride_mb=0 if varlen else sb, stride_mh=sh, stride_mq=sq, stride_mk=sk)
    if key_padding_mask is not None:
        args.update(KPM=key_padding_mask.view(torch.uint8), stride_kpm=0 if varlen else key_padding_mask.stride(0))
    return args


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
    cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
    scale: float, window_left: int, window_right: int, dropout_p: float, seed: int,
) -> tuple[Tensor, Tensor]:
    """q: (B, H, Sq, D), k: (B, Hkv, Sk, D), v: (B, Hkv, Sk, Dv), any strides with contiguous
    last dims (packed sequences: B == 1, cu_seqlens int32 (N + 1,), max_seqlen_q/_k their
    longest). attn_mask: additive (B, H, Sq, Sk) of q's dtype, any strides; key_padding_mask:
    bool (B, Sk); seed: the dropout hash's. Returns out (B, H, Sq, Dv), in q's layout when
    Dv == D, and lse (B, H, Sq) fp32 (-inf for a query that sees no key; its out is 0)."""
    B, H, Sq, D = q.shape
    out = torch.empty_like(q) if v.shape[-1] == D else q.new_empty(B, H, Sq, v.shape[-1])
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    varlen = cu_seqlens_q is not None
    max_q = max_seqlen_q if varlen else Sq
    batch = cu_seqlens_q.numel() - 1 if varlen else B
    wrap_triton(_fwd_kernel)[lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), H, batch)](
        Q=q, K=k, V=v, OUT=out, LSE=lse,
        **_strides("q", q, varlen), **_strides("k", k, varlen), **_strides("v", v, varlen),
        **_strides("o", out, varlen),
        **_shared(q, k, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal, scale, window_left,
                  window_right, dropout_p, seed),
        seqlen_bucket=_bucket(max_q), **_head_dims(q, v), **_tiles("fwd"),
    )
    return out, lse


def attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, attn_mask: Tensor | None,
    key_padding_mask: Tensor | None, cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, max_seqlen_q: int,
    max_seqlen_k: int, causal: bool, scale: float, window_left: int, window_right: int, dropout_p: float, seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention_forward: dq, dk, dv with the shapes and layouts of q, k, v (dk
    and dv summed over the query heads of each key/value head). dout: out's shape, any
    strides with a contiguous last dim; out and lse: the forward's."""
    B, H, Sq, D = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    varlen = cu_seqlens_q is not None
    max_q = max_seqlen_q if varlen else Sq
    max_k = max_seqlen_k if varlen else k.shape[2]
    batch = cu_seqlens_q.numel() - 1 if varlen else B
    dims = _head_dims(q, v)
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    delta_rows = 64
    wrap_triton(_bwd_delta_kernel)[(triton.cdiv(Sq, delta_rows), H, B)](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], H, Sq,
        HEAD_DIM_V=dims["HEAD_DIM_V"], BLOCK_DV=dims["BLOCK_DV"], BLOCK_M=delta_rows,
    )
    shared = dict(
        Q=q, K=k, V=v, DOUT=dout, LSE=lse, DELTA=delta, scale=scale,
        **_strides("q", q, varlen), **_strides("k", k, varlen), **_strides("v", v, varlen),
        **_strides("do", dout, varlen),
        **_shared(q, k, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal, scale, window_left,
                  window_right, dropout_p, seed),
        **dims,
    )
    # dk, dv: a program per key tile of a key/value head, looping over its query heads
    wrap_triton(_dkdv_kernel)[lambda meta: (triton.cdiv(max_k, meta["BLOCK_N"]), k.shape[1], batch)](
        DK=dk, DV=dv, **_strides("dk", dk, varlen), **_strides("dv", dv, varlen), **shared,
        seqlen_bucket=_bucket(max_k), **_tiles("dkdv"),
    )
    # dq: a program per query tile of a query head
    wrap_triton(_dq_kernel)[lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), H, batch)](
        DQ=dq, **_strides("dq", dq, varlen), **shared, seqlen_bucket=_bucket(max_q), **_tiles("dq"),
    )
    return dq, dk, dv


def _decode_splits(q: Tensor, programs: int, cache_tiles: int) -> int:
    """How many programs share one sequence's cache: on a GPU about 8 programs per SM (several
    resident at once, each streaming its share of the cache: decoding is bound by the bytes
    in flight), each with at least 4 cache tiles; in the interpreter 3 (to run the combine).
    (On an H200, 2 per SM left the GPU at 50-57% of copy bandwidth with 9-33 splits' worth of
    work per sequence in 2-9 programs.)"""
    if not q.is_cuda:
        return max(1, min(3, cache_tiles))
    target = 8 * torch.cuda.get_device_properties(q.device).multi_processor_count
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(cache_tiles, 4), 64))


def attention_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, causal: bool, scale: float,
    window_left: int, num_splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Flash-decoding: q (B, H, Sq_new, D) against k_cache (B, Hkv, S_max, D) and v_cache
    (B, Hkv, S_max, Dv) of which the first cache_seqlens[b] (int32 (B,)) slots of sequence b
    are valid. num_splits programs per (row tile, kv head, sequence) each reduce a share of the
    sequence's cache; a combine kernel merges the shares (none for a single split). Returns
    out (B, H, Sq_new, Dv), in q's layout when Dv == D, and lse (B, H, Sq_new) fp32."""
    B, H, Sq, D = q.shape
    Hkv, S_max = k_cache.shape[1], k_cache.shape[2]
    group = H // Hkv
    out = torch.empty_like(q) if v_cache.shape[-1] == D else q.new_empty(B, H, Sq, v_cache.shape[-1])
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    dims = _head_dims(q, v_cache)
    # a tile's rows are the group's query heads x the new tokens: each cache tile is read once
    # per key/value head (tl.dot needs at least 16 rows)
    block_m = max(16, min(64, triton.next_power_of_2(group * Sq)))
    block_n = INTERPRET_TILES["decode_n"] if INTERPRET else (64 if dims["BLOCK_D"] <= 128 else 32)
    row_tiles = triton.cdiv(group * Sq, block_m)
    if num_splits is None:
        num_splits = _decode_splits(q, B * Hkv * row_tiles, triton.cdiv(S_max, block_n))
    direct = num_splits == 1
    if direct:
        o_part = lse_part = lse  # unused
    else:
        o_part = torch.empty((B * H * Sq * num_splits, dims["BLOCK_DV"]), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B * H * Sq * num_splits,), dtype=torch.float32, device=q.device)
    tiles = dict(BLOCK_N=block_n, num_warps=4, num_stages=2) if INTERPRET else {}  # else the autotuner's
    wrap_triton(_decode_kernel)[(row_tiles * num_splits, Hkv, B)](
        q, k_cache, v_cache, cache_seqlens, out, lse, o_part, lse_part,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:3],
        H, group, Sq, S_max, scale * LOG2E, max(window_left, 0), num_splits, triton.next_power_of_2(num_splits),
        CAUSAL=causal, HAS_LEFT=window_left >= 0, DIRECT=direct, **dims, BLOCK_M=block_m, **tiles,
    )
    if not direct:
        wrap_triton(_decode_combine_kernel)[(B * H * Sq,)](
            o_part, lse_part, out, lse, *out.stride()[:3], H, Sq, num_splits,
            HEAD_DIM_V=dims["HEAD_DIM_V"], BLOCK_DV=dims["BLOCK_DV"], BLOCK_S=triton.next_power_of_2(num_splits),
            INTERPRET=INTERPRET, num_warps=4 if triton.next_power_of_2(num_splits) * dims["BLOCK_DV"] <= 4096 else 8,
        )
    return out, lse
