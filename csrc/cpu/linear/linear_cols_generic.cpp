// Portable build of the CPU small-batch linear layer: per output column, each x row's dot
// product with the W row in the compute type (fp32; fp64 for fp64), kept in 16 independent
// partial sums (fp32: two AVX2 vectors or four baseline ones, fused multiply-adds in the AVX2
// build); the W row is read once per group of 4 x rows, or one x row meets 4 W rows at a time.
// The bias is added and the result rounded once. A K-major W (transformers' Conv1D): cols_k_major.
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

// A K-major W (in_features rows of out_features values: W^T contiguous, as transformers' Conv1D
// keeps GPT-2's weights), up to kKMajorRows rows of x. The outputs of a block of kKMajorCols
// columns are summed in Acc arrays (L1) across all of K: each W row's piece of the block is read
// once, front to back, times x[m][k] for every row m. Four W rows at a time meet a partial sum
// in registers (one load and store of it per four products); the partial sums of kKMajorChunk
// rows of W at a time are added into the block's sums, which keeps the rounding error of
// in_features ~ 3000 sums near the dot products' (16 lanes) rather than growing with K. Then
// the bias is added and each output rounded once. Memory-bound at real models' sizes: the pieces
// of the W rows kKMajorAhead ahead are prefetched to L2 (each another page when rows are long).
// AMD EPYC Zen 4, bf16, one row of x, GPT-2's weights cycled out of cache, one thread: no
// prefetch or prefetches to L1 ~8 GB/s, to L2 ~12.6; two threads ~19-20 GB/s, the row-major
// kernel's speed on the same bytes (and 1.5-1.9x torch.addmm on the K-major weight). Pieces of
// 2 KB measured best of 1, 2 and 4 KB (noisy).
constexpr int64_t kKMajorPiece = 2048;  // bytes of a W row per block: 512 fp32 or 1024 16-bit columns
constexpr int64_t kKMajorCols = 1024;   // the most: the sums and partial sums of 4 rows, 2 x 16 KB
constexpr int64_t kKMajorChunk = 32;
constexpr int64_t kKMajorAhead = 8;

template <typename Elem, typename Acc, int MB, int KB>
__attribute__((always_inline)) inline void k_major_rows(const LinearParams& p, const Acc* x, const Elem* wk, int64_t k,
                                                        int64_t nb, Acc (&part)[kKMajorRows][kKMajorCols]) {
  using namespace portable;
  const int64_t N = p.out_features;
  int64_t j = 0;
  if constexpr (std::is_same_v<Acc, float>) {
    Vec xv[MB][KB];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < KB; ++r) xv[m][r] = splat(x[m * p.ldx + k + r]);
    for (; j + kVecLanes <= nb; j += kVecLanes) {
      Vec wv[KB];
      for (int r = 0; r < KB; ++r) wv[r] = load_f32(wk + r * N + j);
      for (int m = 0; m < MB; ++m) {
        Vec acc = load_vec(part[m] + j);
        for (int r = 0; r < KB; ++r) acc = madd(wv[r], xv[m][r], acc);
        store_vec(part[m] + j, acc);
      }
    }
    for (; j < nb; ++j)
      for (int m = 0; m < MB; ++m)
        for (int r = 0; r < KB; ++r) part[m][j] = madd_f32(static_cast<float>(wk[r * N + j]), x[m * p.ldx + k + r], part[m][j]);
  } else {
    for (; j < nb; ++j)
      for (int m = 0; m < MB; ++m)
        for (int r = 0; r < KB; ++r) part[m][j] += static_cast<Acc>(wk[r * N + j]) * x[m * p.ldx + k + r];
  }
}

template <typename Elem, typename Acc, int MB>
void k_major_block(const LinearParams& p, const Acc* x, int64_t n0, int64_t nb, Acc (&sums)[kKMajorRows][kKMajorCols],
                   Acc (&part)[kKMajorRows][kKMajorCols]) {
  const int64_t K = p.in_features, N = p.out_features;
  const Elem* w = static_cast<const Elem*>(p.w) + n0;
  const int64_t piece = nb * static_cast<int64_t>(sizeof(Elem));
  for (int m = 0; m < MB; ++m) std::fill(sums[m], sums[m] + nb, Acc(0));
  for (int64_t k0 = 0; k0 < K; k0 += kKMajorChunk) {
    const int64_t k1 = std::min(K, k0 + kKMajorChunk);
    for (int m = 0; m < MB; ++m) std::fill(part[m], part[m] + nb, Acc(0));
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
      for (int64_t r = kKMajorAhead; r < kKMajorAhead + 4 && k + r < K; ++r) {
        const char* ahead = reinterpret_cast<const char*>(w + (k + r) * N);
        for (int64_t b = 0; b < piece; b += 64) __builtin_prefetch(ahead + b, 0, 1);  // to L2 (prefetcht2)
      }
      k_major_rows<Elem, Acc, MB, 4>(p, x, w + k * N, k, nb, part);
    }
    for (; k < k1; ++k) k_major_rows<Elem, Acc, MB, 1>(p, x, w + k * N, k, nb, part);
    for (int m = 0; m < MB; ++m)
      for (int64_t j = 0; j < nb; ++j) sums[m][j] += part[m][j];
  }
}

template <typename Elem, typename Acc>
void cols_k_major(const LinearParams& p, int64_t begin, int64_t end) {
  const Acc* x = static_cast<const Acc*>(p.x);
  const Elem* bias = static_cast<const Elem*>(p.bias);
  Elem* out = static_cast<Elem*>(p.out);
  alignas(64) Acc sums[kKMajorRows][kKMajorCols];
  alignas(64) Acc part[kKMajorRows][kKMajorCols];
  constexpr int64_t kBlock = std::min<int64_t>(kKMajorCols, kKMajorPiece / sizeof(Elem));
  for (int64_t n0 = begin; n0 < end; n0 += kBlock) {
    const int64_t nb = std::min(kBlock, end - n0);
    switch (p.rows) {
      case 4: k_major_block<Elem, Acc, 4>(p, x, n0, nb, sums, part); break;
      case 3: k_major_block<Elem, Acc, 3>(p, x, n0, nb, sums, part); break;
      case 2: k_major_block<Elem, Acc, 2>(p, x, n0, nb, sums, part); break;
      default: k_major_block<Elem, Acc, 1>(p, x, n0, nb, sums, part);
    }
    for (int64_t m = 0; m < p.rows; ++m)
      for (int64_t j = 0; j < nb; ++j)
        out[m * p.out_features + n0 + j] = static_cast<Elem>(sums[m][j] + (bias ? static_cast<Acc>(bias[n0 + j]) : Acc(0)));
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

// The weights' and outputs' type (Elem) and the sums' and x's (Acc) of dtype D.
template <Dtype D>
struct Types {
  using Elem = std::conditional_t<D == Dtype::f32, float, std::conditional_t<D == Dtype::f64, double,
               std::conditional_t<D == Dtype::f16, c10::Half, c10::BFloat16>>>;
  using Acc = std::conditional_t<D == Dtype::f64, double, float>;
};

template <Isa I, Dtype D>
void linear_cols_generic(const LinearParams& p, int64_t begin, int64_t end) {
  cols<typename Types<D>::Elem, typename Types<D>::Acc>(p, begin, end);
}

template <Isa I, Dtype D>
void linear_cols_k_major_generic(const LinearParams& p, int64_t begin, int64_t end) {
  cols_k_major<typename Types<D>::Elem, typename Types<D>::Acc>(p, begin, end);
}

#define FASTARCH_LINEAR_COLS(D)                                                                    \
  template void linear_cols_generic<kPortableBuild, D>(const LinearParams&, int64_t, int64_t); \
  template void linear_cols_k_major_generic<kPortableBuild, D>(const LinearParams&, int64_t, int64_t);
FASTARCH_LINEAR_COLS(Dtype::f32)
FASTARCH_LINEAR_COLS(Dtype::f64)
FASTARCH_LINEAR_COLS(Dtype::f16)
FASTARCH_LINEAR_COLS(Dtype::bf16)
#undef FASTARCH_LINEAR_COLS

}  // namespace fastarch::cpu

FASTARCH_PORTABLE_END
