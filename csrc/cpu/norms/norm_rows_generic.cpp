// Portable build of the CPU norm row kernels: for CPUs without AVX-512 and for fp64 (whose
// only users are gradcheck and the reference comparisons). Same algorithm as the AVX-512
// build: two-pass statistics in the accumulation type over a row held in cache.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/portable.h"
#include "cpu/portable_math.h"
#include "norm_rows.h"

FASTARCH_PORTABLE_BEGIN

namespace fastarch::cpu {
namespace {

template <Dtype D>
struct Types;
template <>
struct Types<Dtype::f32> {
  using T = float;
  using Acc = float;
};
template <>
struct Types<Dtype::f64> {
  using T = double;
  using Acc = double;
};
template <>
struct Types<Dtype::f16> {
  using T = c10::Half;
  using Acc = float;
};
template <>
struct Types<Dtype::bf16> {
  using T = c10::BFloat16;
  using Acc = float;
};

// Eight interleaved partial sums (vectorizable without reassociation flags) per block of
// kBlock values, then a sum across blocks: each partial adds few values, so long rows sum
// about as accurately as with a pairwise sum.
constexpr int kLanes = 8;
constexpr int64_t kBlock = 512;

template <typename Acc, typename T, typename F>
Acc row_sum(const T* v, int64_t n, F term) {
  Acc total = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(b + kBlock, n);
    Acc part[kLanes] = {};
    int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) {
      for (int k = 0; k < kLanes; ++k) part[k] += term(static_cast<Acc>(v[i + k]));
    }
    for (int k = 0; i < e; ++i, ++k) part[k] += term(static_cast<Acc>(v[i]));
    Acc block = 0;
    for (int k = 0; k < kLanes; ++k) block += part[k];
    total += block;
  }
  return total;
}

// The fp32 statistics of the 16-bit and fp32 rows, in vectors: per block of kBlock values,
// kSumVecs vectors of partial sums (kSumLanes lanes: independent chains of additions), the
// values past the last whole group of kSumLanes added into the lanes in order, the lanes added
// up as a tree of halves, then the blocks in order.
using portable::kVecLanes;
using portable::Vec;
constexpr int kSumLanes = 32;
constexpr int kSumVecs = kSumLanes / kVecLanes;


// Sums over row v[0, n) of term(v) (term takes and returns a Vec or a float), one per terms;
// copy (unless null): v's values as fp32, written there as they are read.
template <typename T, typename... Terms>
void vec_row_sums(const T* v, int64_t n, float* copy, float* sums, Terms... terms) {
  constexpr int kTerms = sizeof...(Terms);
  for (int t = 0; t < kTerms; ++t) sums[t] = 0.0f;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(b + kBlock, n);
    Vec part[kTerms][kSumVecs] = {};
    int64_t i = b;
    for (; i + kSumLanes <= e; i += kSumLanes) {
      for (int k = 0; k < kSumVecs; ++k) {
        const Vec x = portable::load_f32(v + i + k * kVecLanes);
        if (copy) portable::store_vec(copy + i + k * kVecLanes, x);
        int t = 0;
        ((part[t++][k] += terms(x)), ...);
      }
    }
    if (i < e) {  // the values past the last whole group, into the lanes in order
      float lane[kTerms][kSumLanes];
      std::memcpy(lane, part, sizeof lane);
      for (int k = 0; i < e; ++i, ++k) {
        const float x = static_cast<float>(v[i]);
        if (copy) copy[i] = x;
        int t = 0;
        ((lane[t++][k] += terms(x)), ...);
      }
      std::memcpy(part, lane, sizeof lane);
    }
    for (int t = 0; t < kTerms; ++t) sums[t] += portable::tree_sum(part[t]);
  }
}

// y[i] = ((src[i] - mean) - correction) * rstd * w[i] + b[i] in Acc for i in [i0, n) (w, b
// optional): the values past the vectors, and every value of the fp64 rows.
template <typename Acc, typename S, typename W, typename T>
void normalize_values(int64_t i0, int64_t n, const S* src, const W* w, const W* b, Acc mean, Acc correction, Acc rstd,
                      T* y) {
  for (int64_t i = i0; i < n; ++i) {
    Acc v = ((static_cast<Acc>(src[i]) - mean) - correction) * rstd;
    if (w) v *= static_cast<Acc>(w[i]);
    if (b) v += static_cast<Acc>(b[i]);
    y[i] = static_cast<T>(v);
  }
}

// Rows of the 16-bit types up to this many values are converted to fp32 once, on the stack,
// for the statistics' two passes and the output's.
constexpr int64_t kRowScratch = 8192;

// The output of one row whose statistics are in sums (see normalize_row_vec), its values src
// (T, or their fp32 copy), writing y (T), in vectors where whole ones fit; kStream: y by
// streaming stores (whole vectors only: cols a multiple of 16).
template <typename T, bool kStream, typename S, typename W>
void normalize_row_out(const NormForwardParams& p, int64_t r, const S* src, const W* w, const W* b, float mean,
                       const float* sums) {
  const int64_t n = p.cols;
  const float count = static_cast<float>(n);
  const float correction = sums[1] / count;
  float var = sums[0] / count - correction * correction;
  var = var < 0.0f ? 0.0f : var;  // a NaN stays NaN
  const bool in_range = p.rms || mean * mean + var <= std::numeric_limits<float>::max();
  const float rstd = in_range ? 1.0f / std::sqrt(var + static_cast<float>(p.eps)) : std::numeric_limits<float>::quiet_NaN();
  T* y = static_cast<T*>(p.y) + r * n;
  const Vec vmean = portable::splat(mean), vcorr = portable::splat(correction), vrstd = portable::splat(rstd);
  const int64_t nv = n / kVecLanes * kVecLanes;
  // the next row's x (and residual) prefetched, as the AVX-512 build does (kPrefetchRowBytes;
  // level avx2 on the Zen 5, in-process A/B: 1.04-1.62x at 2048x4096 and 1024x8192)
  const bool ahead = r + 1 < p.rows && n * static_cast<int64_t>(sizeof(T)) >= kPrefetchRowBytes;
  const char* next = ahead ? reinterpret_cast<const char*>(static_cast<const T*>(p.x) + (r + 1) * p.x_row_stride) : nullptr;
  const char* next_res = ahead && p.residual
      ? reinterpret_cast<const char*>(static_cast<const T*>(p.residual) + (r + 1) * p.residual_row_stride) : nullptr;
  int64_t i = 0;
  for (; i < nv; i += kVecLanes) {
    if (next && (i * static_cast<int64_t>(sizeof(T))) % 64 == 0) {
      __builtin_prefetch(next + i * sizeof(T));
      if (next_res) __builtin_prefetch(next_res + i * sizeof(T));
    }
    Vec v = ((portable::load_f32(src + i) - vmean) - vcorr) * vrstd;
    if (w) v *= portable::load_f32(w + i);
    if (b) v += portable::load_f32(b + i);
    kStream ? portable::stream_f32(y + i, v) : portable::store_f32(y + i, v);
  }
  normalize_values<float>(i, n, src, w, b, mean, correction, rstd, y);
  if (!p.rms) static_cast<float*>(p.mean)[r] = mean + correction;
  static_cast<float*>(p.rstd)[r] = rstd;
}

// The statistics and output of one row whose values are src (T, or their fp32 copy). copy
// (unless null): where the first pass writes the row's fp32 values for the later passes to read
// (the 16-bit rows: converted once, in the pass that needs them first).
template <typename T, bool kStream, typename S, typename W>
void normalize_row_vec(const NormForwardParams& p, int64_t r, const S* src, const W* w, const W* b,
                       float* copy = nullptr) {
  const int64_t n = p.cols;
  const float count = static_cast<float>(n);
  float sums[2];
  float mean = 0.0f;
  // the squared deviations from m and (layer norm) the deviations, summed in one pass
  const auto dev_sq = [](float m) { return [m](auto x) { return (x - m) * (x - m); }; };
  const auto dev = [](float m) { return [m](auto x) { return x - m; }; };
  if (p.rms) {  // (mean 0: one pass, the first)
    vec_row_sums(src, n, copy, sums, dev_sq(0.0f));
    sums[1] = 0.0f;
  } else {
    vec_row_sums(src, n, copy, sums, [](auto x) { return x; });
    mean = sums[0] / count;
    if (copy) {
      vec_row_sums(static_cast<const float*>(copy), n, nullptr, sums, dev_sq(mean), dev(mean));
    } else {
      vec_row_sums(src, n, nullptr, sums, dev_sq(mean), dev(mean));
    }
  }
  if (copy) return normalize_row_out<T, kStream>(p, r, static_cast<const float*>(copy), w, b, mean, sums);
  normalize_row_out<T, kStream>(p, r, src, w, b, mean, sums);
}

// The fp32 forward of one row (the 16-bit types and fp32): the residual added (rounded to T),
// then normalize_row_vec on the row. When the row fits on the stack, the statistics read its
// fp32 copy, made while x (+ residual) is read: the 16-bit types are converted once, and a
// streamed residual_out is not read back from memory.
template <typename T, bool kStream, typename W>
void forward_row_vec(const NormForwardParams& p, int64_t r, const W* w, const W* b) {
  const int64_t n = p.cols;
  const T* src = static_cast<const T*>(p.x) + r * p.x_row_stride;
  const int64_t nv = n / kVecLanes * kVecLanes;
  const bool copy = n <= kRowScratch && (p.residual || !std::is_same_v<T, float>);
  alignas(64) float row[kRowScratch];
  if (p.residual) {
    const T* res = static_cast<const T*>(p.residual) + r * p.residual_row_stride;
    T* out = static_cast<T*>(p.residual_out) + r * n;
    int64_t i = 0;
    for (; i < nv; i += kVecLanes) {
      // the sum as rounded to T, rounded once for both of its writes
      const Vec v = portable::round_to<T>(portable::load_f32(src + i) + portable::load_f32(res + i));
      if (copy) portable::store_vec(row + i, v);
      kStream ? portable::stream_exact(out + i, v) : portable::store_exact(out + i, v);
    }
    for (; i < n; ++i) {
      out[i] = static_cast<T>(static_cast<float>(src[i]) + static_cast<float>(res[i]));
      if (copy) row[i] = static_cast<float>(out[i]);
    }
    if (copy) return normalize_row_vec<T, kStream>(p, r, row, w, b);
    if constexpr (kStream) portable::stream_fence();  // (read back below)
    src = out;
  } else if (copy) {
    return normalize_row_vec<T, kStream>(p, r, src, w, b, row);  // (converted in the first pass)
  }
  normalize_row_vec<T, kStream>(p, r, src, w, b);
}

// dx[i] = rstd (g - c_g - xhat c_gx) (+ dres[i]), g = dy w (w optional), xhat = (x - mean) rstd,
// in Acc for i in [i0, n): the values past the vectors, and every value of the fp64 rows.
// (d/dx of y = xhat w + b: dx = rstd (g - mean(g) - xhat mean(g xhat)); RMS drops mean(g).)
template <typename Acc, typename T, typename W>
void input_grads(int64_t i0, int64_t n, const T* src, const T* dy, const W* w, const T* dres, Acc mean, Acc rstd, Acc c_g,
                 Acc c_gx, T* dx) {
  for (int64_t i = i0; i < n; ++i) {
    const Acc xhat = (static_cast<Acc>(src[i]) - mean) * rstd;
    const Acc d = static_cast<Acc>(dy[i]);
    const Acc g = w ? d * static_cast<Acc>(w[i]) : d;
    Acc v = rstd * (g - c_g - xhat * c_gx);
    if (dres) v += static_cast<Acc>(dres[i]);
    dx[i] = static_cast<T>(v);
  }
}

// The fp32 backward of one row (the 16-bit types and fp32), in vectors where whole ones fit:
// the two sums as vec_row_sums orders them (lanes, then blocks), dweight/dbias added into
// this thread's accumulators (kGrads). w: T, or fp32 with the weight's offset added.
template <typename T, bool kWeight, bool kGrads, typename W>
void backward_row_vec(const NormBackwardParams& p, int64_t r, const W* w, float* dw, float* db) {
  const int64_t n = p.cols;
  const T* src = static_cast<const T*>(p.xin) + r * p.xin_row_stride;
  const T* dy = static_cast<const T*>(p.dy) + r * p.dy_row_stride;
  const float mean = p.rms ? 0.0f : static_cast<const float*>(p.mean)[r];
  const float rstd = static_cast<const float*>(p.rstd)[r];
  const Vec vmean = portable::splat(mean), vrstd = portable::splat(rstd);
  float sum_g = 0.0f, sum_gx = 0.0f;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(b + kBlock, n);
    Vec part_g[kSumVecs] = {}, part_gx[kSumVecs] = {};
    int64_t i = b;
    for (; i + kSumLanes <= e; i += kSumLanes) {
      for (int k = 0; k < kSumVecs; ++k) {
        const int64_t at = i + k * kVecLanes;
        const Vec xhat = (portable::load_f32(src + at) - vmean) * vrstd;
        const Vec d = portable::load_f32(dy + at);
        const Vec g = kWeight ? d * portable::load_f32(w + at) : d;
        part_g[k] += g;
        part_gx[k] += g * xhat;
        if constexpr (kGrads) {
          portable::store_vec(dw + at, portable::load_vec(dw + at) + d * xhat);
          portable::store_vec(db + at, portable::load_vec(db + at) + d);
        }
      }
    }
    float lane_g[kSumLanes], lane_gx[kSumLanes];
    std::memcpy(lane_g, part_g, sizeof lane_g);
    std::memcpy(lane_gx, part_gx, sizeof lane_gx);
    for (int k = 0; i < e; ++i, ++k) {
      const float xhat = (static_cast<float>(src[i]) - mean) * rstd;
      const float d = static_cast<float>(dy[i]);
      const float g = kWeight ? d * static_cast<float>(w[i]) : d;
      lane_g[k] += g;
      lane_gx[k] += g * xhat;
      if constexpr (kGrads) {
        dw[i] += d * xhat;
        db[i] += d;
      }
    }
    std::memcpy(part_g, lane_g, sizeof lane_g);
    std::memcpy(part_gx, lane_gx, sizeof lane_gx);
    sum_g += portable::tree_sum(part_g);
    sum_gx += portable::tree_sum(part_gx);
  }
  const float c_g = p.rms ? 0.0f : sum_g / static_cast<float>(n);
  const float c_gx = sum_gx / static_cast<float>(n);
  const T* dres = p.dresidual_out ? static_cast<const T*>(p.dresidual_out) + r * p.dresidual_out_row_stride : nullptr;
  T* dx = static_cast<T*>(p.dx) + r * n;
  const Vec vc_g = portable::splat(c_g), vc_gx = portable::splat(c_gx);
  const int64_t nv = n / kVecLanes * kVecLanes;
  int64_t i = 0;
  for (; i < nv; i += kVecLanes) {
    const Vec xhat = (portable::load_f32(src + i) - vmean) * vrstd;
    const Vec d = portable::load_f32(dy + i);
    const Vec g = kWeight ? d * portable::load_f32(w + i) : d;
    Vec v = vrstd * (g - vc_g - xhat * vc_gx);
    if (dres) v += portable::load_f32(dres + i);
    portable::store_f32(dx + i, v);
  }
  input_grads<float>(i, n, src, dy, kWeight ? w : nullptr, dres, mean, rstd, c_g, c_gx, dx);
}

}  // namespace

template <Isa I, Dtype D>
void norm_forward_rows_generic(const NormForwardParams& p, int64_t begin, int64_t end, bool stream, const void* weight,
                               const void* bias) {
  using T = typename Types<D>::T;
  using Acc = typename Types<D>::Acc;
  if constexpr (std::is_same_v<Acc, float>) {
    const auto rows = [&](const auto* w, const auto* b) {
      if (stream) {
        for (int64_t r = begin; r < end; ++r) forward_row_vec<T, true>(p, r, w, b);
        portable::stream_fence();  // the streaming stores, ordered before the caller's reads
      } else {
        for (int64_t r = begin; r < end; ++r) forward_row_vec<T, false>(p, r, w, b);
      }
    };
    if (weight) return rows(static_cast<const float*>(weight), static_cast<const float*>(bias));
    const T* w = static_cast<const T*>(p.weight);
    const T* b = static_cast<const T*>(p.bias);
    if constexpr (!std::is_same_v<T, float>) {
      if (p.cols <= kRowScratch) {  // 16-bit weight and bias converted once for these rows
        alignas(64) float wf[kRowScratch], bf[kRowScratch];
        for (int64_t i = 0; i < p.cols; ++i) wf[i] = w ? static_cast<float>(w[i]) : 0.0f;
        for (int64_t i = 0; i < p.cols; ++i) bf[i] = b ? static_cast<float>(b[i]) : 0.0f;
        return rows(w ? wf : nullptr, b ? bf : nullptr);
      }
    }
    rows(w, b);
    return;
  }
  const int64_t n = p.cols;
  // (fp64: the converted vectors are fp64 as well)
  const T* w = static_cast<const T*>(weight ? weight : p.weight);
  const T* b = static_cast<const T*>(weight ? bias : p.bias);
  for (int64_t r = begin; r < end; ++r) {
    const T* src = static_cast<const T*>(p.x) + r * p.x_row_stride;
    if (p.residual) {
      const T* res = static_cast<const T*>(p.residual) + r * p.residual_row_stride;
      T* out = static_cast<T*>(p.residual_out) + r * n;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(static_cast<Acc>(src[i]) + static_cast<Acc>(res[i]));
      src = out;
    }
    const Acc count = static_cast<Acc>(n);
    const Acc mean = p.rms ? Acc(0) : row_sum<Acc>(src, n, [](Acc v) { return v; }) / count;
    const Acc sum_sq = row_sum<Acc>(src, n, [mean](Acc v) { return (v - mean) * (v - mean); });
    // Corrected two-pass variance (see the AVX-512 build): the deviations' own mean is the
    // fp32 mean's rounding error; it is removed from the variance and from every deviation.
    const Acc correction = p.rms ? Acc(0) : row_sum<Acc>(src, n, [mean](Acc v) { return v - mean; }) / count;
    Acc var = sum_sq / count - correction * correction;  // NaN for a NaN or inf in the row
    var = var < Acc(0) ? Acc(0) : var;                   // a NaN stays NaN
    // Statistics beyond the accumulation type (the mean square mean^2 + var overflows): NaN,
    // as in the AVX-512 build. RMS norm: rstd = 0 then (y = x * 0, as PyTorch's).
    using Limits = std::numeric_limits<Acc>;
    const bool in_range = p.rms || mean * mean + var <= Limits::max();
    const Acc rstd = in_range ? Acc(1) / std::sqrt(var + static_cast<Acc>(p.eps)) : Limits::quiet_NaN();
    normalize_values<Acc>(0, n, src, w, b, mean, correction, rstd, static_cast<T*>(p.y) + r * n);
    if (!p.rms) static_cast<Acc*>(p.mean)[r] = mean + correction;
    static_cast<Acc*>(p.rstd)[r] = rstd;
  }
}

template <Isa I, Dtype D>
void norm_backward_rows_generic(
    const NormBackwardParams& p, int64_t begin, int64_t end, void* dweight_acc, void* dbias_acc, const void* weight) {
  using T = typename Types<D>::T;
  using Acc = typename Types<D>::Acc;
  const int64_t n = p.cols;
  Acc* dw = static_cast<Acc*>(dweight_acc);
  Acc* db = static_cast<Acc*>(dbias_acc);
  if constexpr (std::is_same_v<Acc, float>) {
    // (dweight and dbias come together: the glue allocates both or neither)
    const auto rows = [&](auto has_weight, auto grads, const auto* w) {
      for (int64_t r = begin; r < end; ++r) backward_row_vec<T, has_weight, grads>(p, r, w, dw, db);
    };
    const auto with_grads = [&](auto has_weight, const auto* w) {
      dw ? rows(has_weight, std::true_type{}, w) : rows(has_weight, std::false_type{}, w);
    };
    if (weight) return with_grads(std::true_type{}, static_cast<const float*>(weight));
    if (p.weight) return with_grads(std::true_type{}, static_cast<const T*>(p.weight));
    return with_grads(std::false_type{}, static_cast<const T*>(nullptr));
  }
  const T* w = static_cast<const T*>(weight ? weight : p.weight);  // (fp64: the converted vector is fp64)
  for (int64_t r = begin; r < end; ++r) {
    const T* src = static_cast<const T*>(p.xin) + r * p.xin_row_stride;
    const T* dy = static_cast<const T*>(p.dy) + r * p.dy_row_stride;
    const Acc mean = p.rms ? Acc(0) : static_cast<const Acc*>(p.mean)[r];
    const Acc rstd = static_cast<const Acc*>(p.rstd)[r];
    Acc sum_g = 0, sum_gx = 0;
    for (int64_t b = 0; b < n; b += kBlock) {  // blocked sums, as in row_sum
      const int64_t e = std::min(b + kBlock, n);
      Acc block_g = 0, block_gx = 0;
      for (int64_t i = b; i < e; ++i) {
        const Acc xhat = (static_cast<Acc>(src[i]) - mean) * rstd;
        const Acc d = static_cast<Acc>(dy[i]);
        const Acc g = w ? d * static_cast<Acc>(w[i]) : d;
        block_g += g;
        block_gx += g * xhat;
        if (dw) dw[i] += d * xhat;
        if (db) db[i] += d;
      }
      sum_g += block_g;
      sum_gx += block_gx;
    }
    const Acc c_g = p.rms ? Acc(0) : sum_g / static_cast<Acc>(n);
    const Acc c_gx = sum_gx / static_cast<Acc>(n);
    const T* dres = p.dresidual_out ? static_cast<const T*>(p.dresidual_out) + r * p.dresidual_out_row_stride : nullptr;
    input_grads<Acc>(0, n, src, dy, w, dres, mean, rstd, c_g, c_gx, static_cast<T*>(p.dx) + r * n);
  }
}

#define FASTARCH_INSTANTIATE(D)                                                                 \
  template void norm_forward_rows_generic<kPortableBuild, D>(const NormForwardParams&, int64_t, int64_t, bool, \
                                                             const void*, const void*);                      \
  template void norm_backward_rows_generic<kPortableBuild, D>(const NormBackwardParams&, int64_t, int64_t, void*, void*, \
                                                              const void*);
FASTARCH_INSTANTIATE(Dtype::f32)
FASTARCH_INSTANTIATE(Dtype::f64)
FASTARCH_INSTANTIATE(Dtype::f16)
FASTARCH_INSTANTIATE(Dtype::bf16)
#undef FASTARCH_INSTANTIATE

}  // namespace fastarch::cpu

FASTARCH_PORTABLE_END
