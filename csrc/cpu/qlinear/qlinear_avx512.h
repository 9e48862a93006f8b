// What the AVX-512 quantized linear kernels share (qlinear_avx512.cpp: x in fp32;
// qlinear_int8_avx512.cpp: x rounded to int8): an fp16 field, Q4_K/Q5_K's scales, and the
// column loop: for each group of up to kQuantRowGroup rows and
// each 16 output columns, dots(rows, first row, first column, columns, sums) gives the sums of
// those W rows with the group's rows (sums[row][column]); they are then finished by vector: the
// bias added and rounded once to the dtype. Include after the target pragma of qlinear_avx512.cpp and
// cpu/avx512_math.h.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "qlinear.h"

namespace fastarch::cpu {

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// Q4_K/Q5_K's per-sub-block d sc_s (s[0..7]) and dmin m_s (s[8..15]), from the 12 scale bytes
// (formats.py, k_scales): exact products.
__attribute__((always_inline)) inline void k_scales(const uint8_t* blk, float* s) {
  uint32_t word[3];
  std::memcpy(word, blk + 4, 12);
  const uint32_t six = 0x3f3f3f3f, four = 0x0f0f0f0f, two = 0x03030303;
  const uint32_t sc_lo = word[0] & six, mn_lo = word[1] & six;
  const uint32_t sc_hi = (word[2] & four) | (((word[0] >> 6) & two) << 4);
  const uint32_t mn_hi = ((word[2] >> 4) & four) | (((word[1] >> 6) & two) << 4);
  const __m128i bytes = _mm_setr_epi32(static_cast<int>(sc_lo), static_cast<int>(sc_hi), static_cast<int>(mn_lo),
                                       static_cast<int>(mn_hi));
  uint32_t dm_bits;
  std::memcpy(&dm_bits, blk, 4);
  const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(dm_bits)));  // d, dmin
  const __m512 scale = _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                                             _mm512_castps128_ps512(dm));
  _mm512_store_ps(s, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)), scale));
}

template <Quant Q, Dtype D, typename Dots>
__attribute__((always_inline)) inline void qlinear_cols(const QuantLinearParams& p, int64_t begin, int64_t end,
                                                        Dots&& dots) {
  using L = avx512::LanesOf<D, false>;  // (rounding by hand: one store per 16 outputs)
  static_assert(kQuantColChunk == 16, "a chunk of output columns is one vector");
  const int64_t N = p.out_features;
  alignas(64) float sums[kQuantRowGroup][kQuantColChunk];
  for (int64_t m0 = 0; m0 < p.rows; m0 += kQuantRowGroup) {
    const int64_t mb = std::min(kQuantRowGroup, p.rows - m0);
    for (int64_t n0 = begin; n0 < end; n0 += kQuantColChunk) {
      const int cols = static_cast<int>(std::min(kQuantColChunk, end - n0));
      dots(mb, m0, n0, cols, sums);
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

}  // namespace fastarch::cpu
