// What the CPU attention kernels (forward, decode: attention_fwd*.cpp, attention_decode*.cpp;
// backward: attention_bwd*.cpp) share: the parameters of one call, the visibility rules and
// sequence offsets of fastarch/ops/attn/reference.py, the dropout hash, and (for the AVX-512 kernel
// translation units only) the vector primitives and GEMM tiles both directions are built of.
//
// Plain C++ with no torch headers, so the kernel TUs compile quickly and no torch inline
// function is ever emitted with AVX-512 instructions. The glue TUs (attention_cpu.cpp, the
// backward's) fill AttentionParams from tensors.
//
// AVX-512 part: a kernel TU that wants it defines FASTARCH_ATTENTION_AVX512 before including
// this header; the part compiles under its own `#pragma GCC target` (AVX-512 F/BW/VL/DQ +
// BF16 + FMA + F16C) and must only run after cpu_has_avx512_bf16() (isa.h). It uses no standard
// library templates (an instantiation made under the pragma could be the one the linker
// keeps for the whole extension). A kernel TU's own `#pragma GCC target` must list exactly the
// same features: with fewer, GCC does not inline the header's exp and conversions into the
// TU's loops (they become calls; ~8% of the backward's time).
#pragma once
#include <cstdint>

namespace fastarch::cpu::attention {

enum class Dtype { f32, f16, bf16 };

// Runs fn<Dtype::f32 | f16 | bf16>(args...) for the run-time dtype d (the kernels are templates
// on it); a statement, usable in a loop.
#define FASTARCH_DTYPE_DISPATCH(d, fn, ...) \
  switch (d) {                              \
    case Dtype::f32:                        \
      fn<Dtype::f32>(__VA_ARGS__);          \
      break;                                \
    case Dtype::f16:                        \
      fn<Dtype::f16>(__VA_ARGS__);          \
      break;                                \
    case Dtype::bf16:                       \
      fn<Dtype::bf16>(__VA_ARGS__);         \
      break;                                \
  }

// One attention call over (B, H, S, D) views; all strides are in elements and the last dims
// are contiguous. Semantics: fastarch/ops/attn/reference.py.
struct AttentionParams {
  Dtype dtype;
  const void* q;  // (B, H, Sq, D)
  const void* k;  // (B, Hkv, Sk, D)
  const void* v;  // (B, Hkv, Sk, Dv)
  void* out;      // (B, H, Sq, Dv), q's dtype
  float* lse;     // (B, H, Sq) fp32, contiguous
  int64_t q_stride[3];  // batch, head, seq
  int64_t k_stride[3];
  int64_t v_stride[3];
  int64_t out_stride[3];
  int64_t B, H, Hkv, Sq, Sk, D, Dv;

  // Packed variable lengths (B == 1): sequence n is rows cu_seqlens_q[n] .. cu_seqlens_q[n+1]
  // of q (and of k, v with cu_seqlens_k). Null when not packed.
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int64_t num_seqs;  // N when packed, else B
  int64_t max_seqlen_q, max_seqlen_k;  // longest sequence (Sq, Sk when not packed)

  float scale;
  // Key j is visible to query i of a sequence when lo <= j < hi (see visible_keys):
  // window_left < 0 means no left bound; window_right < 0 no right bound. causal is folded in
  // as window_right = min(window_right, 0) (window_right = 0 when it was unbounded).
  int64_t window_left, window_right;

  // Additive float mask of q's dtype, element (b, h, i, j) at
  // attn_mask + b*mask_stride[0] + h*mask_stride[1] + i*mask_stride[2] + j*mask_stride[3]
  // (broadcast dims have stride 0; i, j are indices within the 4-D view). Null if none.
  const void* attn_mask;
  int64_t mask_stride[4];
  // bool (B, Sk), true = a real key; element (b, j) at key_padding_mask[b*kpm_stride[0] +
  // j*kpm_stride[1]]. Null if none.
  const bool* key_padding_mask;
  int64_t kpm_stride[2];

  // Dropout: probability (i, j) is kept when dropout_hash(seed, (b*H + h)*Sq + i, j) >=
  // dropout_threshold, and kept ones are scaled by dropout_scale = 1 / (1 - p).
  bool dropout;
  uint64_t seed;
  uint32_t dropout_threshold;  // min(floor(p * 2^32), 2^32 - 1)
  float dropout_scale;
};

// Decode: Sq_new queries per sequence against caches of S_max slots, cache_seqlens[b] valid.
struct DecodeParams {
  Dtype dtype;
  const void* q;        // (B, H, Sq, D)
  const void* k_cache;  // (B, Hkv, S_max, D)
  const void* v_cache;  // (B, Hkv, S_max, Dv)
  void* out;            // (B, H, Sq, Dv)
  float* lse;           // (B, H, Sq) fp32, contiguous
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];
  int64_t B, H, Hkv, Sq, S_max, D, Dv;
  const int32_t* cache_seqlens;  // (B,)
  float scale;
  bool causal;
  int64_t window_left;  // < 0: unbounded
};

// ----------------------------------------------------------------------------- sequences

// One sequence of the call: its batch index (0 when packed), where its queries and keys start
// on the sequence axis of the 4-D views, and how many there are.
struct SeqSpan {
  int64_t b;
  int64_t q0, sq;
  int64_t k0, sk;
};

inline SeqSpan seq_span(const AttentionParams& p, int64_t n) {
  if (p.cu_seqlens_q == nullptr) return {n, 0, p.Sq, 0, p.Sk};
  const int64_t q0 = p.cu_seqlens_q[n], k0 = p.cu_seqlens_k[n];
  return {0, q0, p.cu_seqlens_q[n + 1] - q0, k0, p.cu_seqlens_k[n + 1] - k0};
}

// The keys [lo, hi) that query i (0 <= i < sq) of a sequence of sq queries and sk keys sees
// before the masks: bottom-right aligned diagonal d = i + sk - sq, lo = d - window_left,
// hi = d + window_right + 1, clipped to [0, sk]. Empty (lo == hi) when it sees none.
// lo and hi never decrease as i grows.
struct KeyRange {
  int64_t lo, hi;
};

inline KeyRange visible_keys(int64_t i, int64_t sq, int64_t sk, int64_t window_left, int64_t window_right) {
  const int64_t diag = i + sk - sq;
  int64_t lo = window_left >= 0 ? diag - window_left : 0;
  int64_t hi = window_right >= 0 ? diag + window_right + 1 : sk;
  lo = lo < 0 ? 0 : (lo > sk ? sk : lo);
  hi = hi > sk ? sk : hi;
  if (hi < lo) hi = lo;
  return {lo, hi};
}

inline KeyRange visible_keys(const AttentionParams& p, const SeqSpan& s, int64_t i) {
  return visible_keys(i, s.sq, s.sk, p.window_left, p.window_right);
}

// causal folded into the right window bound (AttentionParams::window_right).
inline int64_t fold_causal(bool causal, int64_t window_right) {
  if (!causal) return window_right;
  return window_right < 0 || window_right > 0 ? 0 : window_right;
}

// Pointers to row (b, h, i) of the 4-D views (i on the view's sequence axis, i.e. packed index).
inline const char* row_ptr(const void* base, const int64_t* stride, int64_t elem_size, int64_t b, int64_t h,
                           int64_t i) {
  return static_cast<const char*>(base) + (b * stride[0] + h * stride[1] + i * stride[2]) * elem_size;
}
inline char* row_ptr(void* base, const int64_t* stride, int64_t elem_size, int64_t b, int64_t h, int64_t i) {
  return static_cast<char*>(base) + (b * stride[0] + h * stride[1] + i * stride[2]) * elem_size;
}

inline int64_t elem_size(Dtype d) { return d == Dtype::f32 ? 4 : 2; }

// ----------------------------------------------------------------------------- dropout

// _mix32 of fastarch/ops/attn/reference.py in uint32 arithmetic.
inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x4C7D19F3u;
  return h ^ (h >> 16);
}

// The first half of dropout_hash, once per query row: mix32((row + seed) mod 2^32).
inline uint32_t dropout_row_key(uint64_t seed, uint64_t row) { return mix32(static_cast<uint32_t>(row + seed)); }

inline uint32_t dropout_hash(uint64_t seed, uint64_t row, uint64_t col) {
  return mix32(dropout_row_key(seed, row) ^ static_cast<uint32_t>(col));
}

// The hash row of query i (packed index) of head h in batch b: (b*H + h)*Sq + i.
inline uint64_t dropout_row(const AttentionParams& p, int64_t b, int64_t h, int64_t i) {
  return static_cast<uint64_t>((b * p.H + h) * p.Sq + i);
}

}  // namespace fastarch::cpu::attention

// ============================================================================= AVX-512 part
#ifdef FASTARCH_ATTENTION_AVX512
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

#include "cpu/avx512_math.h"

namespace fastarch::cpu::attention::avx512 {

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// ---- conversions: 16 values <-> 16 fp32 lanes (masked lanes load as 0)
inline __m512 bf16_to_f32(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline __m256i f32_to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }  // round to nearest even
inline __m512 f16_to_f32(__m256i h) { return _mm512_cvtph_ps(h); }
inline __m256i f32_to_f16(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

template <Dtype T>
inline __m512 load16(const void* p) {
  if constexpr (T == Dtype::f32) return _mm512_loadu_ps(p);
  if constexpr (T == Dtype::bf16) return bf16_to_f32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
  if constexpr (T == Dtype::f16) return f16_to_f32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
}
// A full mask takes the plain load, as avx512_math.h's lanes do: on the Zen 5 a masked load
// whose line comes from memory is several times slower (a float mask streamed through the
// forward's masked logits: 1.05-1.15x for the whole attention, in-process A/B).
template <Dtype T>
inline __m512 load16(const void* p, __mmask16 m) {
  if (m == __mmask16(0xFFFF)) return load16<T>(p);
  if constexpr (T == Dtype::f32) return _mm512_maskz_loadu_ps(m, p);
  if constexpr (T == Dtype::bf16) return bf16_to_f32(_mm256_maskz_loadu_epi16(m, p));
  if constexpr (T == Dtype::f16) return f16_to_f32(_mm256_maskz_loadu_epi16(m, p));
}
template <Dtype T>
inline void store16(void* p, __m512 v, __mmask16 m) {
  if constexpr (T == Dtype::f32) _mm512_mask_storeu_ps(p, m, v);
  if constexpr (T == Dtype::bf16) _mm256_mask_storeu_epi16(p, m, f32_to_bf16(v));
  if constexpr (T == Dtype::f16) _mm256_mask_storeu_epi16(p, m, f32_to_f16(v));
}

// z + mask * unit, the mask in the exponent's units (unit: log2 e for 16-bit inputs). A finite
// mask entry beyond FLT_MAX / log2 e (48 bf16 values, among them torch.finfo(bf16).min, what
// Hugging Face fills masked positions with) saturates at +-FLT_MAX instead of overflowing into
// +-inf, which would hide its key, and zero a row that sees only such keys where the reference
// averages them. Other lanes: the plain FMA's bits.
inline __m512 add_mask(__m512 z, __m512 mask, __m512 unit) {
  const __m512 r = _mm512_fmadd_ps(mask, unit, z);
  constexpr int kInf = 0x18;  // fpclass: +inf | -inf
  const __mmask16 over =
      _mm512_fpclass_ps_mask(r, kInf) & ~_mm512_fpclass_ps_mask(mask, kInf) & ~_mm512_fpclass_ps_mask(z, kInf);
  if (!over) return r;
  const __m512 big = _mm512_set1_ps(3.40282347e38f);
  return _mm512_mask_mov_ps(r, over, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), big), _mm512_min_ps(big, r)));
}

inline float reduce_max(__m512 v) { return _mm512_reduce_max_ps(v); }
inline float reduce_add(__m512 v) { return _mm512_reduce_add_ps(v); }

// ---- exp
// exp_accurate: exp(x) within 1.08 ulp of fp32 (the kernels' shared exp_ps, cpu/avx512_math.h):
// exp(-inf) = 0, exp(x < -150) = 0, no NaN for finite or infinite x, exp(NaN) = NaN.
inline __m512 exp_accurate(__m512 x) { return fastarch::cpu::avx512::exp_ps<false>(x); }

// exp2_fast: 2^x within 1.8e-6 relative (the kernels' shared exp2_low, cpu/avx512_math.h): for
// bf16/fp16 attention, whose probabilities are rounded to 2^-9 or fp16 anyway. 2^x = 0 for x <
// -200 (and -inf); 2^NaN = NaN.
inline __m512 exp2_fast(__m512 x) { return fastarch::cpu::avx512::exp2_low(x); }

// The forwards' choice of exp by dtype: fp32 the accurate one in natural units, bf16 and fp16
// the fast one on scores pre-scaled by log2(e), which saves a multiply and the two-step range
// reduction.
struct ExpAccurate {
  static constexpr bool kLog2 = false;  // exponents in natural units
  static __m512 exp(__m512 x) { return exp_accurate(x); }
};
struct ExpFast {
  static constexpr bool kLog2 = true;  // exponents in units of log2: exp(z) = 2^(z log2 e)
  static __m512 exp(__m512 x) { return exp2_fast(x); }
};

// ---- dropout: keep mask of columns col0 .. col0+15 of a row (row_key = dropout_row_key)
// The last round of the hash on 16 lanes (h = row_key ^ col each), and the keep test.
inline __mmask16 dropout_keep_lanes(__m512i h, uint32_t threshold) {
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x7FEB352D));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x4C7D19F3));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  return _mm512_cmpge_epu32_mask(h, _mm512_set1_epi32(static_cast<int>(threshold)));
}

inline __mmask16 dropout_keep16(uint32_t row_key, int64_t col0, uint32_t threshold) {
  const __m512i cols = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(col0))),
                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  return dropout_keep_lanes(_mm512_xor_si512(_mm512_set1_epi32(static_cast<int>(row_key)), cols), threshold);
}

// ============================================================================= GEMM tiles
// C (M x N, fp32, row stride ldc) = row_scale[m] * C + A (M x K) * B (K x N), where
//  - A is row-major (row stride lda) in the compute type: bf16 (uint16_t bits) or fp32;
//  - B is pre-packed (pack_b_*) for N padded to a multiple of 16 (n_pad);
//  - accumulate false: C = A * B (C is not read); row_scale null: scale 1.
// Columns of C beyond N up to n_pad are written too (C must have room: ldc >= n_pad).
//
// bf16 (vdpbf16ps, AVX512-BF16; fp32 accumulation, products exact): B packed as "VNNI" pairs,
// element (k, n) at B[(k/2) * n_pad*2 + n*2 + k%2]; K padded to even with zero rows, and A
// must then hold a finite value (0) in its column K (the caller pads A's rows).
// fp32 (FMA): element (k, n) at B[k * n_pad + n].
//
// Register tile: up to kTileM rows x kTileN16 vectors of 16 columns (24 accumulators of 32
// registers); the A values are broadcast from memory inside the multiply-add.
constexpr int kTileM = 6;
constexpr int kTileN16 = 4;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A tile's accumulators: zero, or c (times row_scale[m] per row, if given) to accumulate on.
template <int MR, int NR>
inline void tile_start(__m512 (&acc)[MR][NR], const float* c, int64_t ldc, bool accumulate, const float* row_scale) {
  for (int m = 0; m < MR; ++m) {
    const __m512 s = row_scale ? _mm512_set1_ps(row_scale[m]) : _mm512_set1_ps(1.0f);
    for (int n = 0; n < NR; ++n) {
      acc[m][n] = accumulate ? (row_scale ? _mm512_mul_ps(s, _mm512_loadu_ps(c + m * ldc + n * 16))
                                          : _mm512_loadu_ps(c + m * ldc + n * 16))
                             : _mm512_setzero_ps();
    }
  }
}

template <int MR, int NR>
inline void tile_bf16(int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t b_pair_stride, float* c,
                      int64_t ldc, bool accumulate, const float* row_scale) {
  __m512 acc[MR][NR];
  tile_start<MR, NR>(acc, c, ldc, accumulate, row_scale);
  for (int64_t p = 0; p < kp; ++p) {
    __m512bh bv[NR];
    for (int n = 0; n < NR; ++n) bv[n] = (__m512bh)_mm512_loadu_si512(b + p * b_pair_stride + n * 32);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      __builtin_memcpy(&pair, a + m * lda + 2 * p, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], av, bv[n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) _mm512_storeu_ps(c + m * ldc + n * 16, acc[m][n]);
}

template <int MR, int NR>
inline void tile_f32(int64_t k, const float* a, int64_t lda, const float* b, int64_t n_pad, float* c, int64_t ldc,
                     bool accumulate, const float* row_scale) {
  __m512 acc[MR][NR];
  tile_start<MR, NR>(acc, c, ldc, accumulate, row_scale);
  for (int64_t p = 0; p < k; ++p) {
    __m512 bv[NR];
    for (int n = 0; n < NR; ++n) bv[n] = _mm512_loadu_ps(b + p * n_pad + n * 16);
    for (int m = 0; m < MR; ++m) {
      const __m512 av = _mm512_set1_ps(a[m * lda + p]);
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_fmadd_ps(av, bv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) _mm512_storeu_ps(c + m * ldc + n * 16, acc[m][n]);
}

// Dispatch of the register tiles over an M x n_pad block.
template <int NR, bool kBf16, typename TA>
inline void gemm_rows(int64_t M, int64_t K, const TA* a, int64_t lda, const TA* b, int64_t n_pad, float* c,
                      int64_t ldc, bool accumulate, const float* row_scale) {
  int64_t m = 0;
  for (; m + kTileM <= M; m += kTileM) {
    const float* rs = row_scale ? row_scale + m : nullptr;
    if constexpr (kBf16) {
      tile_bf16<kTileM, NR>(K / 2, a + m * lda, lda, b, n_pad * 2, c + m * ldc, ldc, accumulate, rs);
    } else {
      tile_f32<kTileM, NR>(K, a + m * lda, lda, b, n_pad, c + m * ldc, ldc, accumulate, rs);
    }
  }
  const int64_t rest = M - m;
  if (rest == 0) return;
  const float* rs = row_scale ? row_scale + m : nullptr;
#define FASTARCH_ATTN_TILE_CASE(R)                                                                      \
  case R:                                                                                               \
    if constexpr (kBf16) {                                                                              \
      tile_bf16<R, NR>(K / 2, a + m * lda, lda, b, n_pad * 2, c + m * ldc, ldc, accumulate, rs);        \
    } else {                                                                                            \
      tile_f32<R, NR>(K, a + m * lda, lda, b, n_pad, c + m * ldc, ldc, accumulate, rs);                 \
    }                                                                                                   \
    break;
  switch (rest) {
    FASTARCH_ATTN_TILE_CASE(1)
    FASTARCH_ATTN_TILE_CASE(2)
    FASTARCH_ATTN_TILE_CASE(3)
    FASTARCH_ATTN_TILE_CASE(4)
    FASTARCH_ATTN_TILE_CASE(5)
  }
#undef FASTARCH_ATTN_TILE_CASE
}

// C (M x n_pad) = row_scale * C + A (M x K) * B (K x n_pad); see the block comment above.
// bf16: K is the padded (even) depth.
template <bool kBf16, typename TA>
inline void gemm(int64_t M, int64_t n_pad, int64_t K, const TA* a, int64_t lda, const TA* b_packed, float* c,
                 int64_t ldc, bool accumulate, const float* row_scale) {
  int64_t n = 0;
  // a panel of kTileN16 vectors starts n*2 (bf16 pairs) or n (fp32) elements into each B row
  for (; n + 16 * kTileN16 <= n_pad; n += 16 * kTileN16) {
    gemm_rows<kTileN16, kBf16>(M, K, a, lda, b_packed + (kBf16 ? 2 * n : n), n_pad, c + n, ldc, accumulate, row_scale);
  }
  switch ((n_pad - n) / 16) {
    case 1:
      gemm_rows<1, kBf16>(M, K, a, lda, b_packed + (kBf16 ? 2 * n : n), n_pad, c + n, ldc, accumulate, row_scale);
      break;
    case 2:
      gemm_rows<2, kBf16>(M, K, a, lda, b_packed + (kBf16 ? 2 * n : n), n_pad, c + n, ldc, accumulate, row_scale);
      break;
    case 3:
      gemm_rows<3, kBf16>(M, K, a, lda, b_packed + (kBf16 ? 2 * n : n), n_pad, c + n, ldc, accumulate, row_scale);
      break;
  }
}

inline void gemm_bf16(int64_t M, int64_t n_pad, int64_t k_even, const uint16_t* a, int64_t lda,
                      const uint16_t* b_packed, float* c, int64_t ldc, bool accumulate, const float* row_scale) {
  gemm<true>(M, n_pad, k_even, a, lda, b_packed, c, ldc, accumulate, row_scale);
}
inline void gemm_f32(int64_t M, int64_t n_pad, int64_t K, const float* a, int64_t lda, const float* b_packed, float* c,
                     int64_t ldc, bool accumulate, const float* row_scale) {
  gemm<false>(M, n_pad, K, a, lda, b_packed, c, ldc, accumulate, row_scale);
}

// ---- packing B. src rows are `rows` rows of `cols` values of dtype T with row stride ld
// (elements). transpose false: B = src (K = rows, N = cols); true: B = src^T (K = cols,
// N = rows), e.g. K^T from the rows of k. Padding (k up to k_pad, n up to n_pad) is zero.
// bf16 packs need T == bf16; f32 packs take any T (converted).
template <Dtype T>
inline float value_at(const void* src, int64_t idx) {
  const char* s = static_cast<const char*>(src);
  if constexpr (T == Dtype::f32) {
    float f;
    __builtin_memcpy(&f, s + idx * 4, 4);
    return f;
  } else {
    uint16_t h;
    __builtin_memcpy(&h, s + idx * 2, 2);
    if constexpr (T == Dtype::bf16) {
      const uint32_t u = static_cast<uint32_t>(h) << 16;
      float f;
      __builtin_memcpy(&f, &u, 4);
      return f;
    } else {
      return _cvtsh_ss(h);
    }
  }
}

// bf16 VNNI pack: out[(k/2) * n_pad*2 + n*2 + k%2] = B(k, n), k < k_pad (even), n < n_pad.
inline void pack_b_bf16(const uint16_t* src, int64_t ld, int64_t rows, int64_t cols, bool transpose, int64_t k_pad,
                        int64_t n_pad, uint16_t* out) {
  const int64_t K = transpose ? cols : rows, N = transpose ? rows : cols;
  if (transpose) {
    // B(k, n) = src[n][k]: the pair (k, k+1) of key row n is one 32-bit word of src
    for (int64_t kp = 0; kp < k_pad / 2; ++kp) {
      uint32_t* o = reinterpret_cast<uint32_t*>(out + kp * n_pad * 2);
      const int64_t k = 2 * kp;
      for (int64_t n = 0; n < n_pad; ++n) {
        uint32_t w = 0;
        if (n < N) {
          const uint16_t lo = k < K ? src[n * ld + k] : 0, hi = k + 1 < K ? src[n * ld + k + 1] : 0;
          w = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
        }
        o[n] = w;
      }
    }
  } else {
    // B(k, n) = src[k][n]: interleave rows k and k+1, 16 columns at a time
    for (int64_t kp = 0; kp < k_pad / 2; ++kp) {
      const int64_t k = 2 * kp;
      uint16_t* o = out + kp * n_pad * 2;
      for (int64_t n = 0; n < n_pad; n += 16) {
        const __mmask16 m = n < N ? tail_mask(N - n) : __mmask16(0);
        const __m256i r0 = k < K ? _mm256_maskz_loadu_epi16(m, src + k * ld + n) : _mm256_setzero_si256();
        const __m256i r1 = k + 1 < K ? _mm256_maskz_loadu_epi16(m, src + (k + 1) * ld + n) : _mm256_setzero_si256();
        const __m512i a = _mm512_cvtepu16_epi32(r0), b = _mm512_cvtepu16_epi32(r1);
        _mm512_storeu_si512(o + 2 * n, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
      }
    }
  }
}

// One row of D values of type T (q's, a GEMM left operand) into the compute type C: bf16 bits
// copied (a zero at D when d_pad > D: bf16's pairs of k), else widened to fp32.
template <Dtype T, typename C>
inline void load_row(const char* src, int64_t D, int64_t d_pad, C* dst) {
  if constexpr (sizeof(C) == 2) {
    for (int64_t d = 0; d < D; d += 32) {
      const __mmask32 mk = D - d >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << (D - d)) - 1);
      _mm512_mask_storeu_epi16(dst + d, mk, _mm512_maskz_loadu_epi16(mk, src + d * 2));
    }
    if (d_pad != D) dst[D] = 0;
  } else {
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 mk = tail_mask(D - d);
      _mm512_mask_storeu_ps(dst + d, mk, load16<T>(src + d * elem_size(T), mk));
    }
  }
}

// fp32 pack: out[k * n_pad + n] = B(k, n) for k < K (no k padding), n < n_pad.
template <Dtype T>
inline void pack_b_f32(const void* src, int64_t ld, int64_t rows, int64_t cols, bool transpose, int64_t n_pad,
                       float* out) {
  const int64_t K = transpose ? cols : rows, N = transpose ? rows : cols;
  if (transpose) {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < n_pad; ++n) out[k * n_pad + n] = n < N ? value_at<T>(src, n * ld + k) : 0.0f;
  } else {
    const int64_t es = T == Dtype::f32 ? 4 : 2;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < n_pad; n += 16) {
        const __mmask16 m = n < N ? tail_mask(N - n) : __mmask16(0);
        _mm512_storeu_ps(out + k * n_pad + n, load16<T>(static_cast<const char*>(src) + (k * ld + n) * es, m));
      }
  }
}

}  // namespace fastarch::cpu::attention::avx512

#pragma GCC pop_options
#endif  // FASTARCH_ATTENTION_AVX512
