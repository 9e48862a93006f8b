// AVX-512 build of the CPU linear layer on block-quantized weights (qlinear.h).
//
// Each W row is read front to back once per group of up to 8 rows of x: a block's 32 values
// are widened in registers to two vectors of 16 fp32 values, exactly ggml's dequantized values
// (Q4_1's d * q + m as one fused multiply-add: d * q is exact, so its one rounding is ggml's
// rounding of the sum), then each row of x takes two fused multiply-adds. One or two rows of x
// keep two sets of accumulators (even and odd blocks) so that the additions overlap. The blocks
// are prefetched kPrefetchBytes ahead (see linear_cols.h). The sums of 16 output columns are
// kept and then finished by vector: the bias added and rounded once to the dtype.
//
// Compiled for AVX-512 through the target pragma below and called only after a run-time CPU
// check. No torch headers (no inline function of theirs may be emitted with AVX-512 code).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "qlinear.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

#include "cpu/avx512_math.h"

namespace fastarch::cpu {
namespace {

constexpr int64_t kPrefetchBytes = 2048;

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// Block blk's values 0-15 in lo, 16-31 in hi, as fp32. The 4-bit formats build the block's 16
// levels in one vector and pick each value by its bits: against widening each value to fp32
// and scaling it, 1.0-1.16x (Zen 5, 2 threads, SmolLM2's projections, in-process A/B). Two W
// rows at a time against one x row, or prefetching 1-8 KB ahead instead of 2, measured alike or
// slower.
template <Quant Q>
__attribute__((always_inline)) inline void block_values(const uint8_t* blk, __m512& lo, __m512& hi) {
  if constexpr (Q == Quant::q8_0) {
    const __m512 d = _mm512_set1_ps(half_at(blk));
    const __m512i q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
    const __m512i q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18)));
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(q0), d);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(q1), d);
  } else {
    // the block's 16 levels (d q + m, or d (q - 8)) in one vector, then each value picked from it
    // by its 4 bits (vpermps reads an index's low 4 bits only: the low nibble needs no mask)
    const int64_t head = Q == Quant::q4_1 ? 4 : 2;
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + head)));
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512 levels;
    if constexpr (Q == Quant::q4_1) {  // d and m widened together (1.1x against one at a time)
      uint32_t dm_bits;
      std::memcpy(&dm_bits, blk, 4);
      const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(dm_bits)));
      levels = _mm512_fmadd_ps(iota, _mm512_broadcastss_ps(dm), _mm512_broadcastss_ps(_mm_movehdup_ps(dm)));
    } else {
      levels = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(8)), _mm512_set1_ps(half_at(blk)));
    }
    lo = _mm512_permutexvar_ps(q, levels);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), levels);
  }
}

// The dot products of one W row (nb blocks) with R rows of x (row stride ldx): sums[r].
template <Quant Q, int R>
void row_dots(const uint8_t* w, int64_t nb, const float* x, int64_t ldx, float* sums) {
  constexpr int64_t kBytes = quant_block_bytes(Q);
  constexpr int kSets = R <= 2 ? 2 : 1;  // accumulator sets (alternate blocks)
  __m512 acc[kSets][R][2];
  for (int s = 0; s < kSets; ++s)
    for (int r = 0; r < R; ++r) acc[s][r][0] = acc[s][r][1] = _mm512_setzero_ps();
  auto block = [&](int64_t b, __m512 (&a)[R][2]) __attribute__((always_inline)) {
    const uint8_t* blk = w + b * kBytes;
    _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchBytes, _MM_HINT_T0);
    __m512 lo, hi;
    block_values<Q>(blk, lo, hi);
    const float* xb = x + b * kQuantBlock;
    for (int r = 0; r < R; ++r) {
      a[r][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb + r * ldx), a[r][0]);
      a[r][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + r * ldx + 16), a[r][1]);
    }
  };
  int64_t b = 0;
  if constexpr (kSets == 2) {
    for (; b + 2 <= nb; b += 2) {
      block(b, acc[0]);
      block(b + 1, acc[1]);
    }
  }
  for (; b < nb; ++b) block(b, acc[0]);
  for (int r = 0; r < R; ++r) {
    __m512 s = _mm512_add_ps(acc[0][r][0], acc[0][r][1]);
    if constexpr (kSets == 2) s = _mm512_add_ps(s, _mm512_add_ps(acc[1][r][0], acc[1][r][1]));
    sums[r] = _mm512_reduce_add_ps(s);
  }
}

template <Quant Q>
void rows_dots(int64_t rows, const uint8_t* w, int64_t nb, const float* x, int64_t ldx, float* sums) {
  switch (rows) {
    case 1: return row_dots<Q, 1>(w, nb, x, ldx, sums);
    case 2: return row_dots<Q, 2>(w, nb, x, ldx, sums);
    case 3: return row_dots<Q, 3>(w, nb, x, ldx, sums);
    case 4: return row_dots<Q, 4>(w, nb, x, ldx, sums);
    case 5: return row_dots<Q, 5>(w, nb, x, ldx, sums);
    case 6: return row_dots<Q, 6>(w, nb, x, ldx, sums);
    case 7: return row_dots<Q, 7>(w, nb, x, ldx, sums);
    default: return row_dots<Q, 8>(w, nb, x, ldx, sums);
  }
}

}  // namespace

template <Quant Q, Dtype D>
void qlinear_cols_avx512(const QuantLinearParams& p, int64_t begin, int64_t end) {
  using L = avx512::LanesOf<D, false>;  // (rounding by hand: one store per 16 outputs)
  static_assert(kQuantColChunk == 16, "a chunk of output columns is one vector");
  const int64_t nb = p.in_features / kQuantBlock, row_bytes = nb * quant_block_bytes(Q);
  const int64_t N = p.out_features;
  alignas(64) float sums[kQuantRowGroup][kQuantColChunk];
  for (int64_t m0 = 0; m0 < p.rows; m0 += kQuantRowGroup) {
    const int64_t mb = std::min(kQuantRowGroup, p.rows - m0);
    for (int64_t n0 = begin; n0 < end; n0 += kQuantColChunk) {
      const int cols = static_cast<int>(std::min(kQuantColChunk, end - n0));
      float col[kQuantRowGroup];
      for (int c = 0; c < cols; ++c) {
        rows_dots<Q>(mb, p.w + (n0 + c) * row_bytes, nb, p.x + m0 * p.ldx, p.ldx, col);
        for (int64_t m = 0; m < mb; ++m) sums[m][c] = col[m];
      }
      const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
      const __m512 bias = p.bias ? L::load(static_cast<const char*>(p.bias) + n0 * L::kBytes, mask)
                                 : _mm512_setzero_ps();
      for (int64_t m = 0; m < mb; ++m) {
        char* out = static_cast<char*>(p.out) + ((m0 + m) * N + n0) * L::kBytes;
        L::store(out, _mm512_add_ps(_mm512_load_ps(sums[m]), bias), mask);
      }
    }
  }
}

template <Quant Q>
void dequantize_rows_avx512(const uint8_t* w, int64_t in_features, int64_t begin, int64_t end, float* out) {
  const int64_t nb = in_features / kQuantBlock, row_bytes = nb * quant_block_bytes(Q);
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* row = w + n * row_bytes;
    float* dst = out + (n - begin) * in_features;
    for (int64_t b = 0; b < nb; ++b) {
      __m512 lo, hi;
      block_values<Q>(row + b * quant_block_bytes(Q), lo, hi);
      _mm512_storeu_ps(dst + b * kQuantBlock, lo);
      _mm512_storeu_ps(dst + b * kQuantBlock + 16, hi);
    }
  }
}

#define FASTARCH_QLINEAR_AVX512(Q)                                                                     \
  template void qlinear_cols_avx512<Q, Dtype::f32>(const QuantLinearParams&, int64_t, int64_t);         \
  template void qlinear_cols_avx512<Q, Dtype::f16>(const QuantLinearParams&, int64_t, int64_t);         \
  template void qlinear_cols_avx512<Q, Dtype::bf16>(const QuantLinearParams&, int64_t, int64_t);        \
  template void dequantize_rows_avx512<Q>(const uint8_t*, int64_t, int64_t, int64_t, float*);
FASTARCH_QLINEAR_AVX512(Quant::q4_0)
FASTARCH_QLINEAR_AVX512(Quant::q4_1)
FASTARCH_QLINEAR_AVX512(Quant::q8_0)
#undef FASTARCH_QLINEAR_AVX512

}  // namespace fastarch::cpu

#pragma GCC pop_options
