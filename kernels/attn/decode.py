"""Flash-decoding against a key/value cache (split-K partial results and a combine) and its
launcher."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastarch.kernels.attn.common import (
    _cast,
    _operand,
    _load_tile,
    INTERPRET,
    LOG2E,
    _autotuned,
    _head_dims,
    INTERPRET_TILES,
)
from fastarch.kernels.launch import wrap_triton


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
    out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)  # (0 for no key, even with NaN in v)
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



# ----------------------------------------------------------------------------- launcher

# Decode: (BLOCK_N, num_warps, num_stages) by padded head dim; the cache streams through once, so
# what counts is the bytes in flight (deeper pipelines, wider tiles) against shared memory.
_DECODE_CONFIGS = {
    64: [(64, 4, 3), (128, 4, 3), (128, 4, 4), (64, 4, 4)],
    128: [(64, 4, 2), (64, 4, 3), (128, 4, 3), (64, 4, 4), (128, 8, 3)],
    256: [(32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 8, 3)],
}
_DECODE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "BLOCK_M", "CAUSAL", "HAS_LEFT", "DIRECT", "splits_bucket"]


_decode_kernel = _autotuned(_decode_split_kernel, _DECODE_CONFIGS, tiles=("BLOCK_N",), key=_DECODE_KEY)


def _decode_splits(q: Tensor, programs: int, cache_tiles: int) -> int:
    """How many programs share one sequence's cache: on a GPU about 8 programs per SM (several
    resident at once, each streaming its share of the cache: decoding is bound by the bytes
    in flight), each with at least 4 cache tiles; in the interpreter 3 (to run the combine).
    (2 per SM measured 50-57% of copy bandwidth on an H200.)"""
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
