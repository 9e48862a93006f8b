// The column loop of the AVX-512 quantized linear kernels (qlinear_avx512.cpp: x in fp32;
// qlinear_int8_avx512.cpp: x rounded to int8): for each group of up to kQuantRowGroup rows and
// each 16 output columns, dots(rows, first row, first column, columns, sums) gives the sums of
// those W rows with the group's rows (sums[row][column]); they are then finished by vector: the
// bias added and rounded once to the dtype. Include after the target pragma of qlinear_avx512.cpp and
// cpu/avx512_math.h.
#pragma once
#include <algorithm>
#include <cstdint>

#include "qlinear.h"

namespace fastarch::cpu {

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
