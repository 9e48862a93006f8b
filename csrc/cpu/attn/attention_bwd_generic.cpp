// Portable kernel of the CPU attention backward: the three passes of attention_bwd.h with every
// operand in fp32 (fp32, fp16 and bf16 inputs), for CPUs without AVX-512 and for
// fastarch._C._set_cpu_isa("generic"). The products are attention_generic.h's GEMM.
//
// Workspace as attention_bwd.h lays it out, in fp32: q_t / do_t hold Q^T and dO^T of each query
// block (D or Dv rows of rows16 columns), q_n / do_n hold Q and dO (rows16 rows of d16 or dv16
// columns, zero padded), each in column panels of kNR for the products (attention_generic.h's
// gemm_panels); delta; lse (+inf for queries that see no key and for padding, so that P = 0
// there); dq_t per chunk.
//
// NaN (the attention NaN contract): a dense product spreads a NaN operand through every
// sum it enters, also where the other factor is a 0 for a query-key pair that is masked out,
// which would give NaN gradients to keys or queries that never met the NaN. So the copies that
// enter a product only through such pairs have NaN replaced by 0: Q in dK += dS^T Q, dO in
// dV += P^T dO, K^T in dQ^T += K^T dS^T. Nothing is lost: a NaN in q_i or k_j makes the score
// (i, j) NaN wherever it is visible, hence P and dS there, which carry it to dq_i, dk_j and
// dv_j; a NaN in dO_i reaches dq_i and the dk_j through dP = dO V^T, and the dv_j of the keys
// i sees are set NaN in those columns afterwards (fix_dv_nan).
#include <cmath>
#include <cstdint>

#include "attention_bwd.h"
#include "attention_generic.h"
#include "cpu/portable.h"

FASTARCH_PORTABLE_BEGIN

namespace fastarch::cpu::attention {
namespace {

using namespace generic;

constexpr float kInf = __builtin_inff();
constexpr int64_t kMaxDim = 512;  // head dims (attention_glue.h's kMaxHeadDim)

inline float scrub(float x) { return keep_if(x == x, x); }  // NaN -> 0

// Per-thread scratch of bwd_key_chunk, carved from the workspace (fp32 words, 16-word pieces).
struct Scratch {
  float* k;     // block_k x D: the key block's rows
  float* v;     // block_k x Dv
  float* kt;    // D x block_k: K^T, NaN scrubbed
  float* s_t;   // block_k x block_q: S^T, then P^T after dropout
  float* dp_t;  // block_k x block_q: dP^T, then dS^T
  float* dk;    // block_k x d16
  float* dv;    // block_k x dv16
  float* row;   // max(D, Dv): one converted row
  uint32_t* row_keys;  // block_q
};

int64_t piece(int64_t floats) { return round_up(floats, 16); }

Scratch carve(const BackwardParams& p, float* w) {
  const int64_t bk = p.block_k, bq = p.block_q;
  Scratch s;
  s.k = w, w += piece(bk * p.a.D);
  s.v = w, w += piece(bk * p.a.Dv);
  s.kt = w, w += piece(p.a.D * bk);
  s.s_t = w, w += piece(bk * bq);
  s.dp_t = w, w += piece(bk * bq);
  s.dk = w, w += piece(bk * bwd_d16(p));
  s.dv = w, w += piece(bk * bwd_dv16(p));
  s.row = w, w += piece(max64(p.a.D, p.a.Dv));
  s.row_keys = reinterpret_cast<uint32_t*>(w), w += piece(bq);
  return s;
}

struct QueryBlock {
  int64_t i0, rows, rows16;  // first query (within the sequence), count, count rounded to 16
  int64_t r;                 // padded row of the block in the per-head workspace
};

inline QueryBlock query_block(const BackwardParams& p, const SeqSpan& s, int64_t n, int64_t t) {
  QueryBlock q;
  q.i0 = t * p.block_q;
  q.rows = min64(p.block_q, s.sq - q.i0);
  q.rows16 = round_up(q.rows, 16);
  q.r = p.seq_rows[n] + q.i0;
  return q;
}

// The queries [lo, hi) of a block that see key j (within the sequence) by the windows.
inline KeyRange queries_seeing(const AttentionParams& a, const SeqSpan& s, const QueryBlock& qb, int64_t j) {
  const int64_t d0 = s.sk - s.sq;
  int64_t lo = 0, hi = qb.rows;
  if (a.window_right >= 0) lo = max64(lo, j - d0 - a.window_right - qb.i0);
  if (a.window_left >= 0) hi = min64(hi, j - d0 + a.window_left + 1 - qb.i0);
  return {lo, hi > lo ? hi : lo};
}

inline bool key_is_padding(const AttentionParams& a, const SeqSpan& s, int64_t j) {
  return a.key_padding_mask && !a.key_padding_mask[s.b * a.kpm_stride[0] + (s.k0 + j) * a.kpm_stride[1]];
}

// ----------------------------------------------------------------------------- pass 1

template <Dtype T>
void prepare_block(const BackwardParams& p, int64_t h, int64_t n, int64_t t) {
  const AttentionParams& a = p.a;
  const SeqSpan s = seq_span(a, n);
  const QueryBlock qb = query_block(p, s, n, t);
  const int64_t es = elem_size(T), D = a.D, Dv = a.Dv, ld = qb.rows16;
  const int64_t d16 = bwd_d16(p), dv16 = bwd_dv16(p);
  const int64_t head_rows = h * p.rows_total + qb.r;
  float* q_t = static_cast<float*>(p.q_t) + head_rows * bwd_d_even(p);
  float* q_n = static_cast<float*>(p.q_n) + head_rows * d16;
  float* do_t = static_cast<float*>(p.do_t) + head_rows * bwd_dv_even(p);
  float* do_n = static_cast<float*>(p.do_n) + head_rows * dv16;
  float* delta = p.delta + head_rows;
  float* lse = p.lse + head_rows;
  const float* lse_in = a.lse + (s.b * a.H + h) * a.Sq + s.q0 + qb.i0;
  // Q^T, dO^T (K = D or Dv rows, ld query columns) and Q, dO (K = ld query rows, d16 or dv16
  // columns) are B operands of tile's products: packed in column panels (gemm_panels)
  const int64_t qt_panel = D * kNR, dot_panel = Dv * kNR, n_panel = ld * kNR;
  float row[kMaxDim], out_row[kMaxDim];
  for (int64_t m = 0; m < ld; ++m) {
    if (m >= qb.rows) {  // padding queries: P = 0
      for (int64_t d = 0; d < D; ++d) q_t[panel_index(d, m, qt_panel)] = 0.0f;
      for (int64_t d = 0; d < Dv; ++d) do_t[panel_index(d, m, dot_panel)] = 0.0f;
      for (int64_t d = 0; d < d16; ++d) q_n[panel_index(m, d, n_panel)] = 0.0f;
      for (int64_t d = 0; d < dv16; ++d) do_n[panel_index(m, d, n_panel)] = 0.0f;
      delta[m] = 0.0f;
      lse[m] = kInf;
      continue;
    }
    const int64_t i = s.q0 + qb.i0 + m;
    to_f32<T>(row_ptr(a.q, a.q_stride, es, s.b, h, i), D, row);
    for (int64_t d = 0; d < D; ++d) q_t[panel_index(d, m, qt_panel)] = row[d];
    for (int64_t d = 0; d < d16; ++d) q_n[panel_index(m, d, n_panel)] = d < D ? scrub(row[d]) : 0.0f;

    to_f32<T>(row_ptr(p.dout, p.dout_stride, es, s.b, h, i), Dv, row);
    to_f32<T>(row_ptr(a.out, a.out_stride, es, s.b, h, i), Dv, out_row);
    float lane[kLanes] = {};  // delta = rowsum(dO * O) in kLanes partial sums
    int64_t d = 0;
    for (; d + kLanes <= Dv; d += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) lane[l] += row[d + l] * out_row[d + l];
    for (; d < Dv; ++d) lane[d % kLanes] += row[d] * out_row[d];
    float sum = 0.0f;
    for (int64_t l = 0; l < kLanes; ++l) sum += lane[l];
    delta[m] = sum;
    for (int64_t c = 0; c < Dv; ++c) do_t[panel_index(c, m, dot_panel)] = row[c];
    for (int64_t c = 0; c < dv16; ++c) do_n[panel_index(m, c, n_panel)] = c < Dv ? scrub(row[c]) : 0.0f;
    lse[m] = lse_in[m] == -kInf ? kInf : lse_in[m];  // a query that sees no key: P = 0, no gradient
  }
}

// ----------------------------------------------------------------------------- pass 2

// dv_acc rows of the keys j0 .. j0 + nk that query block qb of head h sees: NaN in the columns
// where dO of such a query is NaN (the product dV += P^T dO ran on dO with NaN scrubbed). Only
// queries whose delta is NaN can have a NaN in dO.
template <Dtype T>
void fix_dv_nan(const BackwardParams& p, const Scratch& w, const SeqSpan& s, int64_t h, int64_t j0, int64_t nk,
                const QueryBlock& qb, const float* delta) {
  const AttentionParams& a = p.a;
  const int64_t es = elem_size(T), dv16 = bwd_dv16(p);
  for (int64_t m = 0; m < qb.rows; ++m) {
    if (delta[m] == delta[m]) continue;
    to_f32<T>(row_ptr(p.dout, p.dout_stride, es, s.b, h, s.q0 + qb.i0 + m), a.Dv, w.row);
    for (int64_t r = 0; r < nk; ++r) {
      const KeyRange seen = queries_seeing(a, s, qb, j0 + r);
      if (m < seen.lo || m >= seen.hi || key_is_padding(a, s, j0 + r)) continue;
      for (int64_t c = 0; c < a.Dv; ++c)
        if (w.row[c] != w.row[c]) w.dv[r * dv16 + c] = w.row[c];
    }
  }
}

// The elementwise part of key row j of a tile, over its ld query columns: P^T = exp(S^T + mask
// - lse) (s_row holds the scaled, masked scores) and after dropout into s_row, dS^T = P^T *
// (dP^T - delta) into dp_row; 0 outside the queries [seen.lo, seen.hi) that see the key.
template <bool kDropout>
void softmax_grad_row(const AttentionParams& a, float* __restrict s_row, float* __restrict dp_row, const float* lse,
                      const float* delta, const uint32_t* row_keys, uint32_t col, KeyRange seen, int64_t ld) {
  const float dscale = a.dropout_scale;
  const uint32_t threshold = a.dropout_threshold;
  const int32_t lo = static_cast<int32_t>(seen.lo), hi = static_cast<int32_t>(seen.hi);
  // (32-bit lane indices: with 64-bit ones GCC 12 does not vectorize the loop's fp32 lanes)
  for (int32_t c = 0; c < static_cast<int32_t>(ld); ++c) {
    const float e = exp_f32(s_row[c] - lse[c]);
    float dp = dp_row[c], pd = e;
    if constexpr (kDropout) {
      const bool keep = mix32(row_keys[c] ^ col) >= threshold;
      pd = keep_if(keep, e * dscale);
      dp = keep_if(keep, dp * dscale);
    }
    const float ds = e * (dp - delta[c]);
    // selected, not multiplied by 0: the pairs the windows mask out pass no NaN on
    const bool visible = (c >= lo) & (c < hi);
    s_row[c] = keep_if(visible, pd);
    dp_row[c] = keep_if(visible, ds);
  }
}

// One (query head, query block) x key block tile: S^T and dP^T, the elementwise part, then
// dV += P^T dO, dK += dS^T Q, dQ^T += K^T dS^T.
template <Dtype T>
void tile(const BackwardParams& p, const Scratch& w, const SeqSpan& s, int64_t n, int64_t h, int64_t chunk, int64_t j0,
          int64_t nk, int64_t t) {
  const AttentionParams& a = p.a;
  const QueryBlock qb = query_block(p, s, n, t);
  const int64_t D = a.D, Dv = a.Dv, d16 = bwd_d16(p), dv16 = bwd_dv16(p), ld = qb.rows16;
  const int64_t head_rows = h * p.rows_total + qb.r;
  const float* q_t = static_cast<const float*>(p.q_t) + head_rows * bwd_d_even(p);
  const float* q_n = static_cast<const float*>(p.q_n) + head_rows * d16;
  const float* do_t = static_cast<const float*>(p.do_t) + head_rows * bwd_dv_even(p);
  const float* do_n = static_cast<const float*>(p.do_n) + head_rows * dv16;
  const float* lse = p.lse + head_rows;
  const float* delta = p.delta + head_rows;
  float* dq_t = p.dq_t + ((chunk * a.H + h) * p.rows_total + qb.r) * D;

  gemm_panels<false>(nk, ld, D, w.k, D, q_t, D * kNR, w.s_t, ld);
  gemm_panels<false>(nk, ld, Dv, w.v, Dv, do_t, Dv * kNR, w.dp_t, ld);

  if (a.dropout) {
    for (int64_t c = 0; c < ld; ++c) w.row_keys[c] = dropout_row_key(a.seed, dropout_row(a, s.b, h, s.q0 + qb.i0 + c));
  }
  const int64_t es = elem_size(T);
  for (int64_t r = 0; r < nk; ++r) {
    const int64_t j = j0 + r;
    const KeyRange seen = queries_seeing(a, s, qb, j);
    float* s_row = w.s_t + r * ld;  // -> P^T after dropout
    float* dp_row = w.dp_t + r * ld;  // -> dS^T
    if (seen.lo >= seen.hi || key_is_padding(a, s, j)) {
      for (int64_t c = 0; c < ld; ++c) s_row[c] = dp_row[c] = 0.0f;
      continue;
    }
    for (int64_t c = 0; c < ld; ++c) s_row[c] *= a.scale;
    if (a.attn_mask) {
      const char* m = static_cast<const char*>(a.attn_mask) +
                      (s.b * a.mask_stride[0] + h * a.mask_stride[1] + (s.q0 + qb.i0) * a.mask_stride[2] +
                       (s.k0 + j) * a.mask_stride[3]) * es;
      for (int64_t c = seen.lo; c < seen.hi; ++c) {
        const float mv = value_f32<T>(m, c * a.mask_stride[2]);
        s_row[c] = mv == -kInf ? -kInf : s_row[c] + mv;  // a -inf entry hides the key, even from a NaN score
      }
    }
    if (a.dropout) {
      softmax_grad_row<true>(a, s_row, dp_row, lse, delta, w.row_keys, static_cast<uint32_t>(s.k0 + j), seen, ld);
    } else {
      softmax_grad_row<false>(a, s_row, dp_row, lse, delta, w.row_keys, 0, seen, ld);
    }
  }

  gemm_panels<true>(nk, dv16, qb.rows, w.s_t, ld, do_n, ld * kNR, w.dv, dv16);
  gemm_panels<true>(nk, d16, qb.rows, w.dp_t, ld, q_n, ld * kNR, w.dk, d16);
  gemm_acc(D, ld, nk, w.kt, p.block_k, w.dp_t, ld, dq_t, ld);
  fix_dv_nan<T>(p, w, s, h, j0, nk, qb, delta);
}

template <Dtype T>
void key_chunk(const BackwardParams& p, int64_t n, int64_t hk, int64_t chunk, float* workspace) {
  const AttentionParams& a = p.a;
  const SeqSpan s = seq_span(a, n);
  const Scratch w = carve(p, workspace);
  const int64_t es = elem_size(T), D = a.D, Dv = a.Dv, bk = p.block_k;
  const int64_t d16 = bwd_d16(p), dv16 = bwd_dv16(p), group = a.H / a.Hkv, d0 = s.sk - s.sq;
  const int64_t blocks = (s.sk + bk - 1) / bk, per_chunk = (blocks + p.chunks - 1) / p.chunks;

  for (int64_t kb = chunk * per_chunk; kb < min64(blocks, (chunk + 1) * per_chunk); ++kb) {
    const int64_t j0 = kb * bk, nk = min64(bk, s.sk - j0);
    for (int64_t r = 0; r < nk; ++r) {
      float* krow = w.k + r * D;
      to_f32<T>(row_ptr(a.k, a.k_stride, es, s.b, hk, s.k0 + j0 + r), D, krow);
      for (int64_t d = 0; d < D; ++d) w.kt[d * bk + r] = scrub(krow[d]);
      to_f32<T>(row_ptr(a.v, a.v_stride, es, s.b, hk, s.k0 + j0 + r), Dv, w.v + r * Dv);
    }
    for (int64_t i = 0; i < nk * d16; ++i) w.dk[i] = 0.0f;
    for (int64_t i = 0; i < nk * dv16; ++i) w.dv[i] = 0.0f;

    // the queries that see some key of [j0, j0 + nk)
    const int64_t i_begin = a.window_right >= 0 ? max64(0, j0 - d0 - a.window_right) : 0;
    const int64_t i_end = a.window_left >= 0 ? min64(s.sq, j0 + nk - d0 + a.window_left) : s.sq;
    for (int64_t g = 0; g < group && i_begin < i_end; ++g) {
      for (int64_t t = i_begin / p.block_q; t * p.block_q < i_end; ++t) tile<T>(p, w, s, n, hk * group + g, chunk, j0, nk, t);
    }

    for (int64_t r = 0; r < nk; ++r) {
      float* dk = w.dk + r * d16;
      for (int64_t d = 0; d < D; ++d) dk[d] *= a.scale;
      from_f32<T>(dk, D, row_ptr(p.dk, p.dk_stride, es, s.b, hk, s.k0 + j0 + r));
      from_f32<T>(w.dv + r * dv16, Dv, row_ptr(p.dv, p.dv_stride, es, s.b, hk, s.k0 + j0 + r));
    }
  }
}

// ----------------------------------------------------------------------------- pass 3

template <Dtype T>
void finish_block(const BackwardParams& p, int64_t h, int64_t n, int64_t t) {
  const AttentionParams& a = p.a;
  const SeqSpan s = seq_span(a, n);
  const QueryBlock qb = query_block(p, s, n, t);
  const int64_t es = elem_size(T), D = a.D, ld = qb.rows16;
  const int64_t chunk_stride = a.H * p.rows_total * D;
  const float* dq_t = p.dq_t + (h * p.rows_total + qb.r) * D;
  float row[kMaxDim];
  for (int64_t m = 0; m < qb.rows; ++m) {
    for (int64_t d = 0; d < D; ++d) row[d] = 0.0f;
    for (int64_t c = 0; c < p.chunks; ++c)  // fixed order: the same sums on any thread count
      for (int64_t d = 0; d < D; ++d) row[d] += dq_t[c * chunk_stride + d * ld + m];
    for (int64_t d = 0; d < D; ++d) row[d] *= a.scale;
    from_f32<T>(row, D, row_ptr(p.dq, p.dq_stride, es, s.b, h, s.q0 + qb.i0 + m));
  }
}

}  // namespace

template <>
int64_t bwd_workspace_floats_generic<kPortableBuild>(const BackwardParams& p) {
  const int64_t bk = p.block_k, bq = p.block_q;
  return piece(bk * p.a.D) + piece(bk * p.a.Dv) + piece(p.a.D * bk) + 2 * piece(bk * bq) + piece(bk * bwd_d16(p)) +
         piece(bk * bwd_dv16(p)) + piece(max64(p.a.D, p.a.Dv)) + piece(bq);
}

template <>
void bwd_prepare_block_generic<kPortableBuild>(const BackwardParams& p, int64_t h, int64_t n, int64_t t) {
  FASTARCH_DTYPE_DISPATCH(p.a.dtype, prepare_block, p, h, n, t)
}
template <>
void bwd_key_chunk_generic<kPortableBuild>(const BackwardParams& p, int64_t n, int64_t hk, int64_t chunk, float* workspace) {
  FASTARCH_DTYPE_DISPATCH(p.a.dtype, key_chunk, p, n, hk, chunk, workspace)
}
template <>
void bwd_finish_block_generic<kPortableBuild>(const BackwardParams& p, int64_t h, int64_t n, int64_t t) {
  FASTARCH_DTYPE_DISPATCH(p.a.dtype, finish_block, p, h, n, t)
}

}  // namespace fastarch::cpu::attention

FASTARCH_PORTABLE_END
