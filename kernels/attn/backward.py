"""The attention backward (delta = rowsum(dO * O), then a dK/dV kernel over query blocks and a
dQ kernel over key blocks) and its launcher."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastarch.kernels.attn.common import (
    _cast,
    _operand,
    _load_tile,
    _mix32,
    _band,
    _add_mask,
    _visible,
    _sequence,
    _autotuned,
    _tiles,
    _bucket,
    _head_dims,
    _strides,
    _shared,
)
from fastarch.kernels.launch import wrap_triton


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



# ----------------------------------------------------------------------------- launcher

# (how these tables were chosen: forward.py)
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
_dkdv_kernel = _autotuned(_attn_bwd_dkdv_kernel, _DKDV_CONFIGS)
_dq_kernel = _autotuned(_attn_bwd_dq_kernel, _DQ_CONFIGS)


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, args) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention_forward: dq, dk, dv with the shapes and layouts of q, k, v (dk
    and dv summed over the query heads of each key/value head). dout: out's shape, any
    strides with a contiguous last dim; out and lse: the forward's; args: its AttentionArgs."""
    B, H, Sq, D = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    varlen = args.cu_seqlens_q is not None
    max_q = args.max_seqlen_q if varlen else Sq
    max_k = args.max_seqlen_k if varlen else k.shape[2]
    batch = args.cu_seqlens_q.numel() - 1 if varlen else B
    dims = _head_dims(q, v)
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    delta_rows = 64
    wrap_triton(_bwd_delta_kernel)[(triton.cdiv(Sq, delta_rows), H, B)](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], H, Sq,
        HEAD_DIM_V=dims["HEAD_DIM_V"], BLOCK_DV=dims["BLOCK_DV"], BLOCK_M=delta_rows,
    )
    shared = dict(
        Q=q, K=k, V=v, DOUT=dout, LSE=lse, DELTA=delta, scale=args.scale,
        **_strides("q", q, varlen), **_strides("k", k, varlen), **_strides("v", v, varlen),
        **_strides("do", dout, varlen),
        **_shared(q, k, args),
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
