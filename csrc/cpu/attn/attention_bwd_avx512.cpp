// AVX-512 kernel of the CPU attention backward: the three passes of attention_bwd.h.
//
// Compute types: bf16 inputs multiply in bf16 on vdpbf16ps (products exact, fp32 sums) with
// P and dS rounded to bf16 once, like the forward (the products on our register tiles, or
// through oneDNN's brgemm when BackwardParams::brgemm: brgemm.h); fp32 and fp16 inputs
// multiply in fp32 (this CPU has no fp16 dot product, and fp16 -> bf16 would lose 3 bits). exp: fp32 inputs use the
// accurate exp (the tests hold fp32 to fp32 accuracy), bf16/fp16 the cheaper exp2.
//
// Everything here compiles for AVX-512 + BF16 and runs only after cpu_has_avx512_bf16(); no
// standard library templates (see attention_common.h). The target list must be the header's
// exactly: GCC does not inline a function into one with fewer target features, and the
// header's vector helpers (exp, conversions) then become calls in the innermost loops.
#define FASTARCH_ATTENTION_AVX512
#include "attention_bwd.h"
#include "brgemm.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

namespace fastarch::cpu::attention {
namespace {

using namespace avx512;

constexpr float kLog2e = 1.44269504088896341f;

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// The element type the tiles multiply in.
template <Dtype T>
struct Compute {
  static constexpr bool kBf16 = T == Dtype::bf16;
  using type = float;
};
template <>
struct Compute<Dtype::bf16> {
  static constexpr bool kBf16 = true;
  using type = uint16_t;
};

// p = exp(x) for fp32 inputs, 2^x with x pre-multiplied by log2 e for bf16/fp16.
template <Dtype T>
constexpr float exp_base() {
  return T == Dtype::f32 ? 1.0f : kLog2e;
}
// v in the exponent's units, a finite v saturating at +-FLT_MAX as the forward's masks do
// (attention_common.h's add_mask), so that a row it saw at -FLT_MAX gets back its P.
template <Dtype T>
inline float in_exp_units(float v) {
  const float r = v * exp_base<T>();
  return __builtin_isinf(r) && !__builtin_isinf(v) ? __builtin_copysignf(3.40282347e38f, r) : r;
}
template <Dtype T>
inline __m512 softmax_exp(__m512 x) {
  if constexpr (T == Dtype::f32) {
    return exp_accurate(x);
  } else {
    return exp2_fast(x);
  }
}

// Dropout keep mask of 16 queries (lanes; row_keys = dropout_row_key of each) at key col.
// (attention_common.h's dropout_keep16 has the columns in the lanes; the backward's tiles are
// transposed.)
inline __mmask16 dropout_keep_rows16(__m512i row_keys, uint32_t col, uint32_t threshold) {
  return dropout_keep_lanes(_mm512_xor_si512(row_keys, _mm512_set1_epi32(static_cast<int>(col))), threshold);
}

// 16 fp32 lanes -> compute type at out (masked lanes untouched).
template <typename CT>
inline void store_compute(CT* out, __m512 v, __mmask16 m) {
  if constexpr (sizeof(CT) == 2) {
    _mm256_mask_storeu_epi16(out, m, f32_to_bf16(v));
  } else {
    _mm512_mask_storeu_ps(out, m, v);
  }
}

// out[r * width + c] = src row r, column c (T -> compute type), zero for cols <= c < width.
template <Dtype T, typename CT>
void copy_rows(const char* src, int64_t ld, int64_t rows, int64_t cols, int64_t width, CT* out) {
  const int64_t es = elem_size(T);
  for (int64_t r = 0; r < rows; ++r) {
    const char* s = src + r * ld * es;
    CT* o = out + r * width;
    for (int64_t c = 0; c < width; c += 16) {
      const __mmask16 store = tail_mask(width - c);
      const __mmask16 load = c < cols ? tail_mask(cols - c) : __mmask16(0);
      if constexpr (sizeof(CT) == 2) {  // bf16 -> bf16: copy the bits
        _mm256_mask_storeu_epi16(o + c, store, _mm256_maskz_loadu_epi16(load, s + c * es));
      } else {
        _mm512_mask_storeu_ps(o + c, store, load16<T>(s + c * es, load));
      }
    }
  }
}

// out[c * width + r] = src row r, column c (T -> compute type), zero for rows <= r < width.
// (Scalar stores: once per key block or query block, not per tile.)
template <Dtype T, typename CT>
void copy_rows_transposed(const char* src, int64_t ld, int64_t rows, int64_t cols, int64_t width, CT* out) {
  const int64_t es = elem_size(T);
  for (int64_t r = 0; r < width; ++r) {
    if (r >= rows) {
      for (int64_t c = 0; c < cols; ++c) out[c * width + r] = CT(0);
      continue;
    }
    const char* s = src + r * ld * es;
    if constexpr (sizeof(CT) == 2) {
      for (int64_t c = 0; c < cols; ++c) __builtin_memcpy(out + c * width + r, s + c * es, 2);
    } else {
      float row[16];
      for (int64_t c = 0; c < cols; c += 16) {
        const int64_t m = imin(16, cols - c);
        _mm512_storeu_ps(row, load16<T>(s + c * es, tail_mask(m)));
        for (int64_t l = 0; l < m; ++l) out[(c + l) * width + r] = row[l];
      }
    }
  }
}

// One value of type T as fp32 (attention_common.h's value_at needs F16C for fp16).
template <Dtype T>
inline float scalar_f32(const char* p) {
  if constexpr (T == Dtype::f32) {
    float f;
    __builtin_memcpy(&f, p, 4);
    return f;
  } else {
    return _mm512_cvtss_f32(load16<T>(p, __mmask16(1)));
  }
}

// ---- GEMM tiles: C (M x n_pad, fp32, row stride ldc) (+)= A (M x K) B (K x n_pad), with A
// row-major in the compute type and B packed as attention_common.h's gemm_bf16 / gemm_f32 take
// it (bf16: pairs of k; K even). The same product as those, but with the accumulators held in
// registers across the whole tile (the common gemm's runtime accumulate / row_scale choices
// put them on the stack between calls) and 4 x 64 register tiles, which divide the 64- and
// 128-row blocks: 219-228 against 193-212 GFLOP/s per Zen 4 core at K = 64..128 (bf16).
template <bool kBf16, int MR, int NR, bool kAcc, typename CT>
inline void gemm_tile(int64_t K, const CT* a, int64_t lda, const CT* b, int64_t n_pad, float* c, int64_t ldc) {
  __m512 acc[MR][NR];
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) acc[m][n] = kAcc ? _mm512_loadu_ps(c + m * ldc + n * 16) : _mm512_setzero_ps();
  }
  if constexpr (kBf16) {
    for (int64_t p = 0; p < K / 2; ++p) {
      __m512bh bv[NR];
#pragma GCC unroll 4
      for (int n = 0; n < NR; ++n) bv[n] = (__m512bh)_mm512_loadu_si512(b + p * n_pad * 2 + n * 32);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        int32_t pair;
        __builtin_memcpy(&pair, a + m * lda + 2 * p, 4);
        const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
        for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], av, bv[n]);
      }
    }
  } else {
    for (int64_t p = 0; p < K; ++p) {
      __m512 bv[NR];
#pragma GCC unroll 4
      for (int n = 0; n < NR; ++n) bv[n] = _mm512_loadu_ps(b + p * n_pad + n * 16);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        const __m512 av = _mm512_set1_ps(a[m * lda + p]);
#pragma GCC unroll 4
        for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_fmadd_ps(av, bv[n], acc[m][n]);
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) _mm512_storeu_ps(c + m * ldc + n * 16, acc[m][n]);
  }
}

template <bool kBf16, int NR, bool kAcc, typename CT>
inline void gemm_panel(int64_t M, int64_t K, const CT* a, int64_t lda, const CT* b, int64_t n_pad, float* c,
                       int64_t ldc) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) gemm_tile<kBf16, 4, NR, kAcc>(K, a + m * lda, lda, b, n_pad, c + m * ldc, ldc);
  switch (M - m) {
    case 1:
      return gemm_tile<kBf16, 1, NR, kAcc>(K, a + m * lda, lda, b, n_pad, c + m * ldc, ldc);
    case 2:
      return gemm_tile<kBf16, 2, NR, kAcc>(K, a + m * lda, lda, b, n_pad, c + m * ldc, ldc);
    case 3:
      return gemm_tile<kBf16, 3, NR, kAcc>(K, a + m * lda, lda, b, n_pad, c + m * ldc, ldc);
  }
}

// C (M x n_pad) = A B (kAcc false) or C + A B (kAcc true); n_pad a multiple of 16.
template <bool kBf16, bool kAcc, typename CT>
void tile_gemm(int64_t M, int64_t n_pad, int64_t K, const CT* a, int64_t lda, const CT* b, float* c, int64_t ldc) {
  const int64_t b_col = kBf16 ? 2 : 1;  // elements of a B row per column
  int64_t n = 0;
  for (; n + 64 <= n_pad; n += 64) gemm_panel<kBf16, 4, kAcc>(M, K, a, lda, b + n * b_col, n_pad, c + n, ldc);
  switch ((n_pad - n) / 16) {
    case 1:
      return gemm_panel<kBf16, 1, kAcc>(M, K, a, lda, b + n * b_col, n_pad, c + n, ldc);
    case 2:
      return gemm_panel<kBf16, 2, kAcc>(M, K, a, lda, b + n * b_col, n_pad, c + n, ldc);
    case 3:
      return gemm_panel<kBf16, 3, kAcc>(M, K, a, lda, b + n * b_col, n_pad, c + n, ldc);
  }
}

// A tile product, C (M x n_pad) = A B (kAcc false) or C + A B: tile_gemm on the register
// tiles, or under brgemm (p.brgemm) oneDNN's brgemm in column panels of at most kBrgemmPanel:
// bf16 B packed panel by panel (panel c0 at b + c0 * K: pack_panels; K even), fp32 B as the
// register tiles take it (row-major, n_pad wide: panel c0 at b + c0, ld_b = n_pad).
template <bool kBf16, bool kAcc, typename CT>
void product(bool brgemm, int64_t M, int64_t n_pad, int64_t K, const CT* a, int64_t lda, const CT* b, float* c,
             int64_t ldc) {
  if (!brgemm) return tile_gemm<kBf16, kAcc>(M, n_pad, K, a, lda, b, c, ldc);
  for (int64_t c0 = 0; c0 < n_pad; c0 += kBrgemmPanel) {
    const int64_t w = imin(kBrgemmPanel, n_pad - c0);
    if constexpr (kBf16) {
      brgemm_bf16(M, w, K, lda, w, ldc, kAcc, a, b + c0 * K, c + c0);
    } else {
      brgemm_f32(M, w, K, lda, n_pad, ldc, kAcc, a, b + c0, c + c0);
    }
  }
}

// pack_b_bf16 of src (rows x cols, B = src or, transposed, src^T) as product's B: at full
// width n_pad, or for brgemm as panels of kBrgemmPanel columns, each with ld_b = its width.
void pack_panels(bool brgemm, const uint16_t* src, int64_t ld, int64_t rows, int64_t cols, bool transpose, int64_t k_pad,
                 int64_t n_pad, uint16_t* out) {
  if (!brgemm) return pack_b_bf16(src, ld, rows, cols, transpose, k_pad, n_pad, out);
  const int64_t N = transpose ? rows : cols;
  for (int64_t c0 = 0; c0 < n_pad; c0 += kBrgemmPanel) {
    const int64_t w = imin(kBrgemmPanel, n_pad - c0), n = imax(0, imin(w, N - c0));
    if (transpose) {
      pack_b_bf16(src + c0 * ld, ld, n, cols, true, k_pad, w, out + c0 * k_pad);
    } else {
      pack_b_bf16(src + c0, ld, rows, n, false, k_pad, w, out + c0 * k_pad);
    }
  }
}

// Per-thread scratch of bwd_key_chunk, carved from the workspace (fp32 words, 64-byte pieces).
struct Scratch {
  void* ka;    // key block rows (block_k x kq), compute type
  void* va;    // value block rows (block_k x kv)
  void* ka_t;  // K^T (D x block_k even)
  float* s_t;  // S^T tile (block_k x block_q)
  float* dp_t;
  void* p_t;   // P^T (after dropout), compute type, block_k x block_q
  void* ds_t;  // dS^T, compute type
  void* ds_v;  // dS^T as right operand (bf16 pairs of keys)
  float* dk;   // block_k x d16
  float* dv;   // block_k x dv16
  float* mask_row;     // block_q
  uint32_t* row_keys;  // block_q
};

int64_t piece(int64_t floats) { return bwd_round_up(floats, 16); }

Scratch carve(const BackwardParams& p, float* w) {
  const int64_t bk = p.block_k, bq = p.block_q, bk2 = bwd_round_up(bk, 2);
  Scratch s;
  s.ka = w, w += piece(bk * bwd_d_even(p));
  s.va = w, w += piece(bk * bwd_dv_even(p));
  s.ka_t = w, w += piece(p.a.D * bk2);
  s.s_t = w, w += piece(bk * bq);
  s.dp_t = w, w += piece(bk * bq);
  s.p_t = w, w += piece(bk * bq);
  s.ds_t = w, w += piece(bk * bq);
  s.ds_v = w, w += piece(bk2 * bq);
  s.dk = w, w += piece(bk * bwd_d16(p));
  s.dv = w, w += piece(bk * bwd_dv16(p));
  s.mask_row = w, w += piece(bq);
  s.row_keys = reinterpret_cast<uint32_t*>(w), w += piece(bq);
  return s;
}

// Where the per-head workspace rows of a query block live.
struct QueryBlock {
  int64_t i0, rows, rows16;  // first query (within the sequence), count, count rounded to 16
  int64_t r;                 // padded row of the block in the per-head workspace
};

inline QueryBlock query_block(const BackwardParams& p, const SeqSpan& s, int64_t n, int64_t t) {
  QueryBlock q;
  q.i0 = t * p.block_q;
  q.rows = imin(p.block_q, s.sq - q.i0);
  q.rows16 = bwd_round_up(q.rows, 16);
  q.r = p.seq_rows[n] + q.i0;
  return q;
}

// ----------------------------------------------------------------------------- pass 1

template <Dtype T>
void prepare_block(const BackwardParams& p, int64_t h, int64_t n, int64_t t) {
  using CT = typename Compute<T>::type;
  constexpr bool kBf16 = Compute<T>::kBf16;
  const AttentionParams& a = p.a;
  const SeqSpan s = seq_span(a, n);
  const QueryBlock qb = query_block(p, s, n, t);
  const int64_t es = elem_size(T), D = a.D, Dv = a.Dv;
  const int64_t d_even = bwd_d_even(p), dv_even = bwd_dv_even(p), d16 = bwd_d16(p), dv16 = bwd_dv16(p);
  const int64_t head_rows = h * p.rows_total + qb.r;

  const char* q = row_ptr(a.q, a.q_stride, es, s.b, h, s.q0 + qb.i0);
  const char* dout = row_ptr(p.dout, p.dout_stride, es, s.b, h, s.q0 + qb.i0);
  int64_t q_stride = a.q_stride[2], dout_stride = p.dout_stride[2];
  const float* lse_in = a.lse + (s.b * a.H + h) * a.Sq + s.q0 + qb.i0;
  const float inf = __builtin_inff();
  // A query that sees no key (lse -inf) passes no gradient. Its P and dS are 0, but a NaN in
  // its q or dout row would still reach dK and dV through 0 x NaN in the tile products: such
  // a block is packed from a copy with those rows zeroed (rare: causal with Sq > Sk, padding).
  char* zeroed = nullptr;
  for (int64_t m = 0; m < qb.rows && !zeroed; ++m) {
    if (lse_in[m] == -inf) zeroed = static_cast<char*>(__builtin_malloc(qb.rows * (D + Dv) * es));
  }
  if (zeroed) {
    char* dout_copy = zeroed + qb.rows * D * es;
    for (int64_t m = 0; m < qb.rows; ++m) {
      const bool none = lse_in[m] == -inf;
      if (none) {
        __builtin_memset(zeroed + m * D * es, 0, D * es);
        __builtin_memset(dout_copy + m * Dv * es, 0, Dv * es);
      } else {
        __builtin_memcpy(zeroed + m * D * es, q + m * q_stride * es, D * es);
        __builtin_memcpy(dout_copy + m * Dv * es, dout + m * dout_stride * es, Dv * es);
      }
    }
    q = zeroed, dout = dout_copy, q_stride = D, dout_stride = Dv;
  }
  CT* q_t = static_cast<CT*>(p.q_t) + head_rows * d_even;
  CT* q_n = static_cast<CT*>(p.q_n) + head_rows * d16;
  CT* do_t = static_cast<CT*>(p.do_t) + head_rows * dv_even;
  CT* do_n = static_cast<CT*>(p.do_n) + head_rows * dv16;
  if constexpr (kBf16) {
    const auto* q16 = reinterpret_cast<const uint16_t*>(q);
    const auto* do16 = reinterpret_cast<const uint16_t*>(dout);
    pack_panels(p.brgemm, q16, q_stride, qb.rows, D, true, d_even, qb.rows16, q_t);
    pack_panels(p.brgemm, q16, q_stride, qb.rows, D, false, bwd_round_up(qb.rows, 2), d16, q_n);
    pack_panels(p.brgemm, do16, dout_stride, qb.rows, Dv, true, dv_even, qb.rows16, do_t);
    pack_panels(p.brgemm, do16, dout_stride, qb.rows, Dv, false, bwd_round_up(qb.rows, 2), dv16, do_n);
  } else {
    copy_rows_transposed<T>(q, q_stride, qb.rows, D, qb.rows16, q_t);
    copy_rows<T>(q, q_stride, qb.rows, D, d16, q_n);
    copy_rows_transposed<T>(dout, dout_stride, qb.rows, Dv, qb.rows16, do_t);
    copy_rows<T>(dout, dout_stride, qb.rows, Dv, dv16, do_n);
  }

  float* delta = p.delta + head_rows;
  float* lse = p.lse + head_rows;
  for (int64_t m = 0; m < qb.rows16; ++m) {
    if (m >= qb.rows) {
      delta[m] = 0.0f;
      lse[m] = inf;  // padding queries: P = 0
      continue;
    }
    const char* o_row = row_ptr(a.out, a.out_stride, es, s.b, h, s.q0 + qb.i0 + m);
    const char* do_row = dout + m * dout_stride * es;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < Dv; d += 16) {
      const __mmask16 mk = tail_mask(Dv - d);
      acc = _mm512_fmadd_ps(load16<T>(do_row + d * es, mk), load16<T>(o_row + d * es, mk), acc);
    }
    delta[m] = reduce_add(acc);
    const float l = lse_in[m];
    lse[m] = l == -inf ? inf : in_exp_units<T>(l);  // a query that sees no key: P = 0, no gradient
  }
  __builtin_free(zeroed);
}

// ----------------------------------------------------------------------------- pass 2

// The elementwise part of a tile, key row by key row: P^T = exp(S^T * scale + mask - lse),
// dropout, dS^T = P^T * (dP^T - delta). kGeneral: some queries of the tile do not see some
// keys, or an additive mask applies.
template <Dtype T, bool kGeneral, bool kDropout>
void softmax_grad_rows(const BackwardParams& p, const Scratch& w, const SeqSpan& s, int64_t h, int64_t j0,
                       int64_t nk, const QueryBlock& qb, const float* lse, const float* delta) {
  using CT = typename Compute<T>::type;
  const AttentionParams& a = p.a;
  const int64_t ld = qb.rows16, d0 = s.sk - s.sq;
  const __m512 scale = _mm512_set1_ps(a.scale * exp_base<T>());
  const __m512 dscale = _mm512_set1_ps(a.dropout_scale);
  CT* p_t = static_cast<CT*>(w.p_t);
  CT* ds_t = static_cast<CT*>(w.ds_t);
  for (int64_t r = 0; r < nk; ++r) {
    const int64_t j = j0 + r, key = s.k0 + j;
    int64_t lo = 0, hi = qb.rows16;  // lanes (queries of the block) that see key j
    if constexpr (kGeneral) {
      if (a.window_right >= 0) lo = imax(lo, j - d0 - a.window_right - qb.i0);
      if (a.window_left >= 0) hi = imin(hi, j - d0 + a.window_left + 1 - qb.i0);
    }
    const bool dead = lo >= hi ||
                      (a.key_padding_mask && !a.key_padding_mask[s.b * a.kpm_stride[0] + key * a.kpm_stride[1]]);
    CT* p_row = p_t + r * ld;
    CT* ds_row = ds_t + r * ld;
    if (dead) {
      for (int64_t c = 0; c < ld; ++c) p_row[c] = ds_row[c] = CT(0);
      continue;
    }
    if constexpr (kGeneral) {
      if (a.attn_mask) {
        const char* m = static_cast<const char*>(a.attn_mask) +
                        (s.b * a.mask_stride[0] + h * a.mask_stride[1] + (s.q0 + qb.i0) * a.mask_stride[2] +
                         key * a.mask_stride[3]) * elem_size(T);
        for (int64_t c = 0; c < ld; ++c) {
          w.mask_row[c] = c < qb.rows ? in_exp_units<T>(scalar_f32<T>(m + c * a.mask_stride[2] * elem_size(T))) : 0.0f;
        }
      }
    }
    const float* s_row = w.s_t + r * ld;
    const float* dp_row = w.dp_t + r * ld;
    for (int64_t c = 0; c < ld; c += 16) {
      __m512 x = _mm512_loadu_ps(lse + c);
      __mmask16 unmasked = 0xFFFF;
      if constexpr (kGeneral) {
        if (a.attn_mask) {
          const __m512 mv = _mm512_loadu_ps(w.mask_row + c);
          x = _mm512_sub_ps(x, mv);
          // a -inf entry hides the key even from a NaN score (NaN - lse + -inf is NaN, not 0)
          unmasked = _mm512_cmp_ps_mask(mv, _mm512_set1_ps(-__builtin_inff()), _CMP_NEQ_UQ);
        }
      }
      // exp keeps NaN (attention_common.h): a NaN score or lse gives NaN p and dS, which the
      // tile products carry into dq, dk and dv
      __m512 e = softmax_exp<T>(_mm512_fmsub_ps(_mm512_loadu_ps(s_row + c), scale, x));
      if constexpr (kGeneral) {
        const int64_t l = imax(lo - c, 0), u = imin(hi - c, 16);
        const __mmask16 seen = l >= u ? __mmask16(0) : __mmask16(tail_mask(u) & ~tail_mask(l));
        e = _mm512_maskz_mov_ps(seen & unmasked, e);
      }
      __m512 dp = _mm512_loadu_ps(dp_row + c);
      __m512 pd = e;
      if constexpr (kDropout) {
        const __mmask16 keep = dropout_keep_rows16(_mm512_loadu_si512(w.row_keys + c), static_cast<uint32_t>(key),
                                                   a.dropout_threshold);
        pd = _mm512_maskz_mul_ps(keep, e, dscale);
        dp = _mm512_maskz_mul_ps(keep, dp, dscale);
      }
      const __m512 ds = _mm512_mul_ps(e, _mm512_sub_ps(dp, _mm512_loadu_ps(delta + c)));
      store_compute(p_row + c, pd, __mmask16(0xFFFF));
      store_compute(ds_row + c, ds, __mmask16(0xFFFF));
    }
  }
}

// One (query head, query block) x key block tile: S^T, dP^T, the elementwise part, then
// dV += P^T dO, dK += dS^T Q, dQ^T += K^T dS^T.
template <Dtype T>
void tile(const BackwardParams& p, const Scratch& w, const SeqSpan& s, int64_t n, int64_t h, int64_t chunk, int64_t j0,
          int64_t nk, int64_t t) {
  using CT = typename Compute<T>::type;
  constexpr bool kBf16 = Compute<T>::kBf16;
  const AttentionParams& a = p.a;
  const QueryBlock qb = query_block(p, s, n, t);
  const int64_t D = a.D;
  const int64_t kq = kBf16 ? bwd_d_even(p) : D, kv = kBf16 ? bwd_dv_even(p) : a.Dv;
  const int64_t km = kBf16 ? bwd_round_up(qb.rows, 2) : qb.rows, kk = kBf16 ? bwd_round_up(nk, 2) : nk;
  const int64_t d16 = bwd_d16(p), dv16 = bwd_dv16(p), ld = qb.rows16;
  const int64_t head_rows = h * p.rows_total + qb.r;

  const CT* q_t = static_cast<const CT*>(p.q_t) + head_rows * bwd_d_even(p);
  const CT* q_n = static_cast<const CT*>(p.q_n) + head_rows * d16;
  const CT* do_t = static_cast<const CT*>(p.do_t) + head_rows * bwd_dv_even(p);
  const CT* do_n = static_cast<const CT*>(p.do_n) + head_rows * dv16;
  const float* lse = p.lse + head_rows;
  const float* delta = p.delta + head_rows;
  float* dq_t = p.dq_t + ((chunk * a.H + h) * p.rows_total + qb.r) * D;

  product<kBf16, false>(p.brgemm, nk, ld, kq, static_cast<const CT*>(w.ka), kq, q_t, w.s_t, ld);
  product<kBf16, false>(p.brgemm, nk, ld, kv, static_cast<const CT*>(w.va), kv, do_t, w.dp_t, ld);

  const KeyRange first = visible_keys(a, s, qb.i0), last = visible_keys(a, s, qb.i0 + qb.rows - 1);
  const bool general = a.attn_mask != nullptr || !(last.lo <= j0 && first.hi >= j0 + nk);
  if (a.dropout) {
    for (int64_t c = 0; c < ld; ++c) {
      w.row_keys[c] = dropout_row_key(a.seed, dropout_row(a, s.b, h, s.q0 + qb.i0 + c));
    }
    if (general) {
      softmax_grad_rows<T, true, true>(p, w, s, h, j0, nk, qb, lse, delta);
    } else {
      softmax_grad_rows<T, false, true>(p, w, s, h, j0, nk, qb, lse, delta);
    }
  } else if (general) {
    softmax_grad_rows<T, true, false>(p, w, s, h, j0, nk, qb, lse, delta);
  } else {
    softmax_grad_rows<T, false, false>(p, w, s, h, j0, nk, qb, lse, delta);
  }

  const CT* p_t = static_cast<const CT*>(w.p_t);
  const CT* ds_t = static_cast<const CT*>(w.ds_t);
  product<kBf16, true>(p.brgemm, nk, dv16, km, p_t, ld, do_n, w.dv, dv16);
  product<kBf16, true>(p.brgemm, nk, d16, km, ds_t, ld, q_n, w.dk, d16);
  if constexpr (kBf16) {
    auto* ds_v = static_cast<uint16_t*>(w.ds_v);
    pack_panels(p.brgemm, ds_t, ld, nk, ld, false, kk, ld, ds_v);
    product<true, true>(p.brgemm, D, ld, kk, static_cast<const uint16_t*>(w.ka_t), kk, ds_v, dq_t, ld);
  } else {
    product<false, true>(p.brgemm, D, ld, kk, static_cast<const float*>(w.ka_t), kk, ds_t, dq_t, ld);
  }
}

template <Dtype T>
void key_chunk(const BackwardParams& p, int64_t n, int64_t hk, int64_t chunk, float* workspace) {
  using CT = typename Compute<T>::type;
  constexpr bool kBf16 = Compute<T>::kBf16;
  const AttentionParams& a = p.a;
  const SeqSpan s = seq_span(a, n);
  const Scratch w = carve(p, workspace);
  const int64_t es = elem_size(T), D = a.D, Dv = a.Dv;
  const int64_t kq = kBf16 ? bwd_d_even(p) : D, kv = kBf16 ? bwd_dv_even(p) : Dv;
  const int64_t d16 = bwd_d16(p), dv16 = bwd_dv16(p), group = a.H / a.Hkv, d0 = s.sk - s.sq;
  const int64_t blocks = (s.sk + p.block_k - 1) / p.block_k, per_chunk = (blocks + p.chunks - 1) / p.chunks;
  const float scale = a.scale;

  for (int64_t kb = chunk * per_chunk; kb < imin(blocks, (chunk + 1) * per_chunk); ++kb) {
    const int64_t j0 = kb * p.block_k, nk = imin(p.block_k, s.sk - j0);
    const char* k = row_ptr(a.k, a.k_stride, es, s.b, hk, s.k0 + j0);
    const char* v = row_ptr(a.v, a.v_stride, es, s.b, hk, s.k0 + j0);
    copy_rows<T>(k, a.k_stride[2], nk, D, kq, static_cast<CT*>(w.ka));
    copy_rows<T>(v, a.v_stride[2], nk, Dv, kv, static_cast<CT*>(w.va));
    copy_rows_transposed<T>(k, a.k_stride[2], nk, D, kBf16 ? bwd_round_up(nk, 2) : nk, static_cast<CT*>(w.ka_t));
    for (int64_t i = 0; i < nk * d16; ++i) w.dk[i] = 0.0f;
    for (int64_t i = 0; i < nk * dv16; ++i) w.dv[i] = 0.0f;

    // the queries that see some key of [j0, j0 + nk): i + d0 - window_left <= j0 + nk - 1 and
    // i + d0 + window_right >= j0
    const int64_t i_begin = a.window_right >= 0 ? imax(0, j0 - d0 - a.window_right) : 0;
    const int64_t i_end = a.window_left >= 0 ? imin(s.sq, j0 + nk - d0 + a.window_left) : s.sq;
    if (i_begin < i_end) {
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t t = i_begin / p.block_q; t * p.block_q < i_end; ++t) {
          tile<T>(p, w, s, n, hk * group + g, chunk, j0, nk, t);
        }
      }
    }

    for (int64_t r = 0; r < nk; ++r) {
      char* dk = row_ptr(p.dk, p.dk_stride, es, s.b, hk, s.k0 + j0 + r);
      char* dv = row_ptr(p.dv, p.dv_stride, es, s.b, hk, s.k0 + j0 + r);
      for (int64_t d = 0; d < D; d += 16) {
        store16<T>(dk + d * es, _mm512_mul_ps(_mm512_loadu_ps(w.dk + r * d16 + d), _mm512_set1_ps(scale)),
                   tail_mask(D - d));
      }
      for (int64_t d = 0; d < Dv; d += 16) store16<T>(dv + d * es, _mm512_loadu_ps(w.dv + r * dv16 + d), tail_mask(Dv - d));
    }
  }
  if (p.brgemm) brgemm_release();  // this thread's tile configuration (AMX), before the pool runs other work on it
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
  const __m512i lanes = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(static_cast<int>(ld)));
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int64_t m = 0; m < qb.rows; ++m) {
    char* dq = row_ptr(p.dq, p.dq_stride, es, s.b, h, s.q0 + qb.i0 + m);
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 mk = tail_mask(D - d);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < p.chunks; ++c) {  // fixed order: the same sums on any thread count
        acc = _mm512_add_ps(acc, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk, lanes,
                                                          dq_t + c * chunk_stride + d * ld + m, 4));
      }
      store16<T>(dq + d * es, _mm512_mul_ps(acc, scale), mk);
    }
  }
}

}  // namespace

int64_t bwd_workspace_floats(const BackwardParams& p) {
  const int64_t bk = p.block_k, bq = p.block_q, bk2 = bwd_round_up(bk, 2);
  return piece(bk * bwd_d_even(p)) + piece(bk * bwd_dv_even(p)) + piece(p.a.D * bk2) + 4 * piece(bk * bq) +
         piece(bk2 * bq) + piece(bk * bwd_d16(p)) + piece(bk * bwd_dv16(p)) + 2 * piece(bq) + 16;
}

void bwd_prepare_block(const BackwardParams& p, int64_t h, int64_t n, int64_t t) {
  FASTARCH_DTYPE_DISPATCH(p.a.dtype, prepare_block, p, h, n, t)
}
void bwd_key_chunk(const BackwardParams& p, int64_t n, int64_t hk, int64_t chunk, float* workspace) {
  FASTARCH_DTYPE_DISPATCH(p.a.dtype, key_chunk, p, n, hk, chunk, workspace)
}
void bwd_finish_block(const BackwardParams& p, int64_t h, int64_t n, int64_t t) {
  FASTARCH_DTYPE_DISPATCH(p.a.dtype, finish_block, p, h, n, t)
}

}  // namespace fastarch::cpu::attention

#pragma GCC pop_options
