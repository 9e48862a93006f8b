// Portable build of the CPU small-batch linear layer: per output column, each x row's dot
// product with the W row in the compute type (fp32; fp64 for fp64), kept in 16 independent
// partial sums (fp32: two AVX2 vectors or four baseline ones, fused multiply-adds in the AVX2
// build); the W row is read once per group of 4 x rows, or one x row meets 4 W rows at a time.
// The bias is added and the result rounded once.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "linear_cols.h"
#include "cpu/portable.h"
#include "cpu/portable_math.h"

FASTARCH_PORTABLE_BEGIN

namespace fastarch::cpu {
namespace {

constexpr int kLanes = 16;
constexpr int kRowGroup = 4;
// (A prefetch each kLanes values, kPrefetchBytes ahead, where one weight row meets the rows of x:
// see linear_cols.h.)

// MB dot products of K values, pair m being x + m * ldx and w + m * ldw: the rows of x against one
// weight row (kSharedW: ldw 0, each weight vector loaded and converted once), or one row of x
// against weight rows (ldx 0). kLanes partial sums in order, then the lanes in order; MB chains
// of additions interleaved so that they overlap.
// fp32 sums: in fp32 vectors (portable_math.h), the 16-bit weights widened by vector loads.
template <typename Elem, int MB, bool kSharedW>
void dot_pairs(const float* x, int64_t ldx, const Elem* w, int64_t ldw, int64_t K, float* sums) {
  using namespace portable;
  constexpr int kVecs = kLanes / kVecLanes;
  Vec part[MB][kVecs] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    if constexpr (kSharedW) __builtin_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetchBytes);
    for (int v = 0; v < kVecs; ++v) {
      const int64_t at = k + v * kVecLanes;
      if constexpr (kSharedW) {
        const Vec wv = load_f32(w + at);
        for (int m = 0; m < MB; ++m) part[m][v] = madd(wv, load_vec(x + m * ldx + at), part[m][v]);
      } else {  // ldx 0: one row of x
        const Vec xv = load_vec(x + at);
        for (int m = 0; m < MB; ++m) part[m][v] = madd(load_f32(w + m * ldw + at), xv, part[m][v]);
      }
    }
  }
  for (int m = 0; m < MB; ++m) {
    float lane[kLanes];
    std::memcpy(lane, part[m], sizeof lane);
    for (int l = 0; k + l < K; ++l) {
      lane[l] = madd_f32(static_cast<float>(w[(kSharedW ? 0 : m * ldw) + k + l]), x[m * ldx + k + l], lane[l]);
    }
    float s = 0;
    for (int l = 0; l < kLanes; ++l) s += lane[l];
    sums[m] = s;
  }
}

// fp64 sums (fp64 weights), scalar lanes that the compiler vectorizes.
template <typename Elem, int MB, bool kSharedW>
void dot_pairs(const double* x, int64_t ldx, const Elem* w, int64_t ldw, int64_t K, double* sums) {
  double part[MB][kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int m = 0; m < MB; ++m)
      for (int l = 0; l < kLanes; ++l) part[m][l] += w[m * ldw + k + l] * x[m * ldx + k + l];
  for (int l = 0; k + l < K; ++l)
    for (int m = 0; m < MB; ++m) part[m][l] += w[m * ldw + k + l] * x[m * ldx + k + l];
  for (int m = 0; m < MB; ++m) {
    double s = 0;
    for (int l = 0; l < kLanes; ++l) s += part[m][l];
    sums[m] = s;
  }
}

// One row of x against kColGroup weight rows at a time (fp32/fp64 weights in the baseline build,
// below).
constexpr int kColGroup = 4;
// The AVX2 build streams fp32 (and fp64) weight rows one at a time too: on a real AVX2-only
// CPU (AMD EPYC Zen 3, 2 threads, SmolLM2-135M's fp32 weights, one row of x) that was
// 1.09-1.17x the group in three runs (the group had gained 1.5x on a Zen 4 restricted to AVX2,
// which no user runs).
constexpr bool kColumnGroups = kPortableBuild != Isa::avx2;

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
  // One row of x (a decode step): fp32/fp64 weight rows kColGroup at a time in the baseline
  // build. 16-bit weights stream one row at a time instead (measured on a Zen 4 EPYC at level
  // avx2, SmolLM2-135M's weights: 9.7 against 19 ms in bf16, 10 against 16.5 in fp16; on the
  // Zen 3 the group was 1.4-1.7x slower still in bf16).
  if (p.rows == 1 && std::is_same_v<Elem, Acc> && kColumnGroups) {
    for (; n + kColGroup <= end; n += kColGroup) {
      Acc col_sums[kColGroup];
      dot_pairs<Elem, kColGroup, false>(x, 0, w + n * K, K, K, col_sums);
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
          dot_pairs<Elem, 4, true>(xm, p.ldx, w + n * K, 0, K, sums);
          break;
        case 3:
          dot_pairs<Elem, 3, true>(xm, p.ldx, w + n * K, 0, K, sums);
          break;
        case 2:
          dot_pairs<Elem, 2, true>(xm, p.ldx, w + n * K, 0, K, sums);
          break;
        default:
          dot_pairs<Elem, 1, true>(xm, p.ldx, w + n * K, 0, K, sums);
      }
      for (int64_t m = 0; m < mb; ++m) out[(m0 + m) * p.out_features + n] = static_cast<Elem>(sums[m] + b);
    }
  }
}

}  // namespace

template <Isa I, Dtype D>
void linear_widen_generic(const void* x, int64_t rows, int64_t K, int64_t ldx, float* out) {
  using namespace portable;
  using Elem = std::conditional_t<D == Dtype::f16, c10::Half, c10::BFloat16>;
  for (int64_t m = 0; m < rows; ++m) {
    const Elem* src = static_cast<const Elem*>(x) + m * ldx;
    float* dst = out + m * K;
    int64_t k = 0;
    for (; k + kVecLanes <= K; k += kVecLanes) store_vec(dst + k, load_f32(src + k));
    for (; k < K; ++k) dst[k] = static_cast<float>(src[k]);
  }
}

template void linear_widen_generic<kPortableBuild, Dtype::f16>(const void*, int64_t, int64_t, int64_t, float*);
template void linear_widen_generic<kPortableBuild, Dtype::bf16>(const void*, int64_t, int64_t, int64_t, float*);

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
