"""The attention forward (FlashAttention-2: online softmax over key blocks) and its launcher."""

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
    # (selected, not scaled: a NaN in v times the p = 0 of a key the query does not see stays out)
    out = tl.where(seen[:, None], acc * (drop_scale / tl.where(seen, l_i, 1.0))[:, None], 0.0)
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_ptrs = OUT + n64 * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_os + offs_dv[None, :]
    o_mask = row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    tl.store(o_ptrs, _cast(out, OUT.dtype.element_ty, INTERPRET), mask=o_mask)
    b = n
    if VARLEN:
        b = 0
    tl.store(LSE + (b * H + h).to(tl.int64) * seqlen_q_4d + rows, lse, mask=row_ok)



# ----------------------------------------------------------------------------- launcher

# GPU tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim, for the autotuner to
# choose from (keyed on the head dims, the features, the dtypes and a sequence-length bucket).
# Hopper-sized entries (128 x 128 forward tiles, 3-4 stage pipelines) beside the Triton
# tutorial's and FlashAttention-2's sizes; every entry of these and the backward's tables
# compiles without register spills at sm_90 (bench/triton_resources.py), but one dK/dV entry
# of D 128 (32, 128, 8, 2: 152 bytes), kept because it measured fastest on an H200.
_FWD_CONFIGS = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (128, 64, 4, 4)],
    128: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 4)],
    256: [(128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
}
_fwd_kernel = _autotuned(_attn_fwd_kernel, _FWD_CONFIGS)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, args) -> tuple[Tensor, Tensor]:
    """q: (B, H, Sq, D), k: (B, Hkv, Sk, D), v: (B, Hkv, Sk, Dv), any strides with contiguous
    last dims (packed sequences: B == 1). args: an AttentionArgs (fastarch/ops/attn/args.py:
    the masks, packed offsets and their longest sequences, causal, scale, window, dropout).
    Returns out (B, H, Sq, Dv), in q's layout when Dv == D, and lse (B, H, Sq) fp32 (-inf for
    a query that sees no key; its out is 0)."""
    B, H, Sq, D = q.shape
    out = torch.empty_like(q) if v.shape[-1] == D else q.new_empty(B, H, Sq, v.shape[-1])
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    varlen = args.cu_seqlens_q is not None
    max_q = args.max_seqlen_q if varlen else Sq
    batch = args.cu_seqlens_q.numel() - 1 if varlen else B
    wrap_triton(_fwd_kernel)[lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), H, batch)](
        Q=q, K=k, V=v, OUT=out, LSE=lse,
        **_strides("q", q, varlen), **_strides("k", k, varlen), **_strides("v", v, varlen),
        **_strides("o", out, varlen),
        **_shared(q, k, args),
        seqlen_bucket=_bucket(max_q), **_head_dims(q, v), **_tiles("fwd"),
    )
    return out, lse
