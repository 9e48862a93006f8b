// The column loop of the AVX2 and portable quantized linear kernels (qlinear_blocks_avx2.cpp,
// qlinear_generic.cpp): each output column n of [begin, end) of every group of up to kGroup
// rows, dots(rows, W row n, first row, sums) gives the group's sums; the bias is added and the
// result rounded once to the dtype. Include before the file's target pragma: the loop is
// baseline code for both builds (a call per column to the build's own dots).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "qlinear.h"

namespace fastarch::cpu {

template <Quant Q, Dtype D, int64_t kGroup, typename Dots>
void qlinear_cols_loop(const QuantLinearParams& p, int64_t begin, int64_t end, Dots&& dots) {
  using Elem = std::conditional_t<D == Dtype::f16, c10::Half, std::conditional_t<D == Dtype::bf16, c10::BFloat16, float>>;
  const int64_t row_bytes = p.in_features / quant_block_values(Q) * quant_block_bytes(Q);
  const Elem* bias = static_cast<const Elem*>(p.bias);
  Elem* out = static_cast<Elem*>(p.out);
  float sums[kGroup];
  for (int64_t m0 = 0; m0 < p.rows; m0 += kGroup) {
    const int64_t mb = std::min(kGroup, p.rows - m0);
    for (int64_t n = begin; n < end; ++n) {
      dots(mb, p.w + n * row_bytes, m0, sums);
      const float b = bias ? static_cast<float>(bias[n]) : 0.0f;
      for (int64_t m = 0; m < mb; ++m) out[(m0 + m) * p.out_features + n] = static_cast<Elem>(sums[m] + b);
    }
  }
}

}  // namespace fastarch::cpu
