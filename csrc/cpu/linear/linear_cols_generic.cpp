// Portable build of the CPU small-batch linear layer: per output column, each x row's dot
// product with the W row in the compute type (fp32; fp64 for fp64), kept in 16 independent
// partial sums so that the compiler vectorizes the loop without reordering a reduction
// itself; the W row is read once per group of 4 x rows. The bias is added and the result
// rounded once.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "linear_cols.h"
#include "cpu/portable.h"

FASTARCH_PORTABLE_BEGIN

namespace fastarch::cpu {
namespace {

constexpr int kLanes = 16;
constexpr int kRowGroup = 4;

// MB dot products of K values, pair m being x + m * ldx and w + m * ldw: the rows of x against one
// weight row (ldw 0), or one row of x against weight rows (ldx 0). kLanes partial sums in
// order, then the lanes in order; MB chains of additions interleaved so that they overlap.
template <typename Acc, typename Elem, int MB>
void dot_pairs(const Acc* x, int64_t ldx, const Elem* w, int64_t ldw, int64_t K, Acc* sums) {
  Acc part[MB][kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int m = 0; m < MB; ++m)
      for (int l = 0; l < kLanes; ++l) part[m][l] += static_cast<Acc>(w[m * ldw + k + l]) * x[m * ldx + k + l];
  for (int l = 0; k + l < K; ++l)
    for (int m = 0; m < MB; ++m) part[m][l] += static_cast<Acc>(w[m * ldw + k + l]) * x[m * ldx + k + l];
  for (int m = 0; m < MB; ++m) {
    Acc s = 0;
    for (int l = 0; l < kLanes; ++l) s += part[m][l];
    sums[m] = s;
  }
}

// One row of x (a decode step) takes weight rows kColGroup at a time.
constexpr int kColGroup = 4;

// Elem: the weights' and outputs' type; Acc: the sums' and x's (the glue widens x).
template <typename Elem, typename Acc>
void cols(const LinearParams& p, int64_t begin, int64_t end) {
  const int64_t K = p.in_features;
  const Acc* x = static_cast<const Acc*>(p.x);
  const Elem* w = static_cast<const Elem*>(p.w);
  const Elem* bias = static_cast<const Elem*>(p.bias);
  Elem* out = static_cast<Elem*>(p.out);
  Acc sums[kRowGroup];
  int64_t n = begin;
  if (p.rows == 1) {  // one row of x (a decode step): weight rows kColGroup at a time
    for (; n + kColGroup <= end; n += kColGroup) {
      Acc col_sums[kColGroup];
      dot_pairs<Acc, Elem, kColGroup>(x, 0, w + n * K, K, K, col_sums);
      for (int c = 0; c < kColGroup; ++c) {
        out[n + c] = static_cast<Elem>(col_sums[c] + (bias ? static_cast<Acc>(bias[n + c]) : Acc(0)));
      }
    }
  }
  for (; n < end; ++n) {
    const Acc b = bias ? static_cast<Acc>(bias[n]) : Acc(0);
    for (int64_t m0 = 0; m0 < p.rows; m0 += kRowGroup) {
      const int64_t mb = std::min<int64_t>(kRowGroup, p.rows - m0);
      const Acc* xm = x + m0 * p.ldx;
      switch (mb) {
        case 4:
          dot_pairs<Acc, Elem, 4>(xm, p.ldx, w + n * K, 0, K, sums);
          break;
        case 3:
          dot_pairs<Acc, Elem, 3>(xm, p.ldx, w + n * K, 0, K, sums);
          break;
        case 2:
          dot_pairs<Acc, Elem, 2>(xm, p.ldx, w + n * K, 0, K, sums);
          break;
        default:
          dot_pairs<Acc, Elem, 1>(xm, p.ldx, w + n * K, 0, K, sums);
      }
      for (int64_t m = 0; m < mb; ++m) out[(m0 + m) * p.out_features + n] = static_cast<Elem>(sums[m] + b);
    }
  }
}

}  // namespace

template <Isa I, Dtype D>
void linear_cols_generic(const LinearParams& p, int64_t begin, int64_t end) {
  if constexpr (D == Dtype::f32) {
    cols<float, float>(p, begin, end);
  } else if constexpr (D == Dtype::f64) {
    cols<double, double>(p, begin, end);
  } else if constexpr (D == Dtype::f16) {
    cols<c10::Half, float>(p, begin, end);
  } else {
    cols<c10::BFloat16, float>(p, begin, end);
  }
}

template void linear_cols_generic<kPortableBuild, Dtype::f32>(const LinearParams&, int64_t, int64_t);
template void linear_cols_generic<kPortableBuild, Dtype::f64>(const LinearParams&, int64_t, int64_t);
template void linear_cols_generic<kPortableBuild, Dtype::f16>(const LinearParams&, int64_t, int64_t);
template void linear_cols_generic<kPortableBuild, Dtype::bf16>(const LinearParams&, int64_t, int64_t);

}  // namespace fastarch::cpu

FASTARCH_PORTABLE_END
