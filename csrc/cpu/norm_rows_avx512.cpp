// AVX-512 build of the CPU norm row kernels (fp32, fp16, bf16; statistics in fp32).
//
// One row at a time: the first pass streams the row from memory, the later passes re-read it
// from L1/L2, so memory traffic is one read per input and one write per output. The whole
// file is compiled for AVX-512 through the target pragma below and is only called after a
// run-time CPU check, so the extension still loads on CPUs without it. It includes no torch
// headers, so no inline function of theirs is emitted with AVX-512 instructions.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "norm_rows.h"

// (No standard-library templates are used below the pragma: an instantiation made here could
// be the one the linker keeps for the whole extension.)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

namespace fastarch::cpu {
namespace {

// 16 values of dtype D in memory <-> 16 fp32 lanes. Masked forms touch only the lanes in m
// (masked-off lanes load as 0.0 and are never written).
template <Dtype D>
struct Lanes16;

template <>
struct Lanes16<Dtype::f32> {
  static constexpr int64_t kBytes = 4;
  static __m512 load(const char* p) { return _mm512_loadu_ps(p); }
  static __m512 load(const char* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(char* p, __m512 v) { _mm512_storeu_ps(p, v); }
  static void store(char* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
  static __m512 round(__m512 v) { return v; }
};

template <>
struct Lanes16<Dtype::bf16> {
  static constexpr int64_t kBytes = 2;
  static __m512 widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  // Round to nearest even (what a bf16 cast does); NaN stays NaN, made quiet.
  static __m256i narrow(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
    r = _mm512_srli_epi32(r, 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
  }
  static __m512 load(const char* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static __m512 load(const char* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
  static void store(char* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(v)); }
  static void store(char* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, narrow(v)); }
  static __m512 round(__m512 v) { return widen(narrow(v)); }
};

template <>
struct Lanes16<Dtype::f16> {
  static constexpr int64_t kBytes = 2;
  static __m512 widen(__m256i h) { return _mm512_cvtph_ps(h); }
  static __m256i narrow(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static __m512 load(const char* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static __m512 load(const char* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
  static void store(char* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(v)); }
  static void store(char* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, narrow(v)); }
  static __m512 round(__m512 v) { return widen(narrow(v)); }
};

// The columns of a row in chunks of 16: `full` whole chunks, then a masked tail.
struct Chunks {
  int64_t full;
  __mmask16 tail;  // 0 when cols is a multiple of 16
  explicit Chunks(int64_t cols)
      : full(cols / 16), tail(static_cast<__mmask16>((1u << (cols % 16)) - 1)) {}
};

// Row sums are taken in two levels: vector accumulators within a block of kBlockChunks
// chunks, then across blocks. Each lane adds at most a few dozen values at either level, so a
// 65536-wide row sums about as accurately as a pairwise sum.
constexpr int64_t kBlockChunks = 32;

inline int64_t block_end(int64_t begin, int64_t full) {
  return begin + kBlockChunks < full ? begin + kBlockChunks : full;
}

// Sums over the row of d = v - shift and of d^2. Two accumulators each (to hide the add
// latency); masked-off tail lanes load as 0 and the masked ops leave their lanes alone.
struct Deviations {
  float sum;
  float sum_sq;
};

template <Dtype D>
Deviations deviations(const char* src, const Chunks& c, float shift) {
  using L = Lanes16<D>;
  const __m512 s = _mm512_set1_ps(shift);
  __m512 total = _mm512_setzero_ps(), total_sq = total;
  for (int64_t b = 0; b < c.full; b += kBlockChunks) {
    const int64_t e = block_end(b, c.full);
    __m512 d0 = _mm512_setzero_ps(), d1 = d0, q0 = d0, q1 = d0;
    int64_t k = b;
    for (; k + 2 <= e; k += 2) {
      const char* p = src + k * 16 * L::kBytes;
      const __m512 u = _mm512_sub_ps(L::load(p), s);
      const __m512 v = _mm512_sub_ps(L::load(p + 16 * L::kBytes), s);
      d0 = _mm512_add_ps(d0, u);
      d1 = _mm512_add_ps(d1, v);
      q0 = _mm512_fmadd_ps(u, u, q0);
      q1 = _mm512_fmadd_ps(v, v, q1);
    }
    if (k < e) {
      const __m512 u = _mm512_sub_ps(L::load(src + k * 16 * L::kBytes), s);
      d0 = _mm512_add_ps(d0, u);
      q0 = _mm512_fmadd_ps(u, u, q0);
    }
    total = _mm512_add_ps(total, _mm512_add_ps(d0, d1));
    total_sq = _mm512_add_ps(total_sq, _mm512_add_ps(q0, q1));
  }
  if (c.tail) {
    const __m512 u = _mm512_sub_ps(L::load(src + c.full * 16 * L::kBytes, c.tail), s);
    total = _mm512_mask_add_ps(total, c.tail, total, u);
    total_sq = _mm512_mask3_fmadd_ps(u, u, total_sq, c.tail);
  }
  return {_mm512_reduce_add_ps(total), _mm512_reduce_add_ps(total_sq)};
}

template <Dtype D>
float sum_row(const char* src, const Chunks& c) {
  using L = Lanes16<D>;
  __m512 total = _mm512_setzero_ps();
  for (int64_t b = 0; b < c.full; b += kBlockChunks) {
    const int64_t e = block_end(b, c.full);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int64_t k = b;
    for (; k + 2 <= e; k += 2) {
      const char* p = src + k * 16 * L::kBytes;
      a0 = _mm512_add_ps(a0, L::load(p));
      a1 = _mm512_add_ps(a1, L::load(p + 16 * L::kBytes));
    }
    if (k < e) a0 = _mm512_add_ps(a0, L::load(src + k * 16 * L::kBytes));
    total = _mm512_add_ps(total, _mm512_add_ps(a0, a1));
  }
  if (c.tail) total = _mm512_add_ps(total, L::load(src + c.full * 16 * L::kBytes, c.tail));
  return _mm512_reduce_add_ps(total);
}

// out = round(x + residual) chunk by chunk; returns the sum of the rounded values, which are
// what the statistics and the backward pass see.
template <Dtype D>
float add_residual(const char* x, const char* res, char* out, const Chunks& c) {
  using L = Lanes16<D>;
  __m512 total = _mm512_setzero_ps();
  for (int64_t b = 0; b < c.full; b += kBlockChunks) {
    const int64_t e = block_end(b, c.full);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = b; k < e; ++k) {
      const int64_t o = k * 16 * L::kBytes;
      const __m512 s = L::round(_mm512_add_ps(L::load(x + o), L::load(res + o)));
      L::store(out + o, s);
      acc = _mm512_add_ps(acc, s);
    }
    total = _mm512_add_ps(total, acc);
  }
  if (c.tail) {
    const int64_t o = c.full * 16 * L::kBytes;
    const __m512 s = L::round(_mm512_add_ps(L::load(x + o, c.tail), L::load(res + o, c.tail)));
    L::store(out + o, s, c.tail);
    total = _mm512_add_ps(total, s);  // masked-off lanes are 0 + 0
  }
  return _mm512_reduce_add_ps(total);
}

// y = ((v - mean) - correction) * rstd * w + b on one chunk of 16 (or the masked tail)
template <Dtype D, bool kWeight, bool kBias>
inline void normalize_chunk(
    const char* src, const char* w, const char* b, char* y, int64_t o, __m512 mean, __m512 correction, __m512 rstd,
    __mmask16 m, bool masked) {
  using L = Lanes16<D>;
  const __m512 d = _mm512_sub_ps(masked ? L::load(src + o, m) : L::load(src + o), mean);
  __m512 t = _mm512_mul_ps(_mm512_sub_ps(d, correction), rstd);
  if constexpr (kWeight) t = _mm512_mul_ps(t, masked ? L::load(w + o, m) : L::load(w + o));
  if constexpr (kBias) t = _mm512_add_ps(t, masked ? L::load(b + o, m) : L::load(b + o));
  if (masked) {
    L::store(y + o, t, m);
  } else {
    L::store(y + o, t);
  }
}

template <Dtype D, bool kWeight, bool kBias>
void normalize_row(
    const char* src, const char* w, const char* b, char* y, const Chunks& c, float mean, float correction, float rstd) {
  using L = Lanes16<D>;
  const __m512 vm = _mm512_set1_ps(mean), vc = _mm512_set1_ps(correction), vr = _mm512_set1_ps(rstd);
  for (int64_t k = 0; k < c.full; ++k) {
    normalize_chunk<D, kWeight, kBias>(src, w, b, y, k * 16 * L::kBytes, vm, vc, vr, c.tail, false);
  }
  if (c.tail) normalize_chunk<D, kWeight, kBias>(src, w, b, y, c.full * 16 * L::kBytes, vm, vc, vr, c.tail, true);
}

template <Dtype D, bool kWeight, bool kBias>
void forward_rows(const NormForwardParams& p, int64_t begin, int64_t end) {
  using L = Lanes16<D>;
  const Chunks c(p.cols);
  const float n = static_cast<float>(p.cols);
  const float eps = static_cast<float>(p.eps);
  const char* w = static_cast<const char*>(p.weight);
  const char* b = static_cast<const char*>(p.bias);
  for (int64_t r = begin; r < end; ++r) {
    const char* src = static_cast<const char*>(p.x) + r * p.x_row_stride * L::kBytes;
    float sum = 0.f;
    bool have_sum = false;
    if (p.residual) {
      char* out = static_cast<char*>(p.residual_out) + r * p.cols * L::kBytes;
      sum = add_residual<D>(src, static_cast<const char*>(p.residual) + r * p.residual_row_stride * L::kBytes, out, c);
      have_sum = true;
      src = out;
    }
    const float mean = p.rms ? 0.f : (have_sum ? sum : sum_row<D>(src, c)) / n;
    const Deviations dev = deviations<D>(src, c, mean);
    float correction = 0.f, var;
    if (p.rms) {
      var = dev.sum_sq / n;
    } else {
      // Corrected two-pass variance: deviations from the fp32 mean, minus the square of their
      // own mean (the mean's rounding error), which is also subtracted from every deviation
      // below. No E[x^2] - mean^2 cancellation, and no rounding error of the mean amplified
      // by rstd when the row's spread is small next to its mean.
      correction = dev.sum / n;
      var = dev.sum_sq / n - correction * correction;
      var = var > 0.f ? var : 0.f;
    }
    const float rstd = 1.f / std::sqrt(var + eps);
    normalize_row<D, kWeight, kBias>(
        src, w, b, static_cast<char*>(p.y) + r * p.cols * L::kBytes, c, mean, correction, rstd);
    if (!p.rms) static_cast<float*>(p.mean)[r] = mean + correction;
    static_cast<float*>(p.rstd)[r] = rstd;
  }
}

template <Dtype D, bool kWeight, bool kWeightGrads>
void backward_rows(const NormBackwardParams& p, int64_t begin, int64_t end, float* dwa, float* dba) {
  using L = Lanes16<D>;
  const Chunks c(p.cols);
  const float n = static_cast<float>(p.cols);
  const char* w = static_cast<const char*>(p.weight);
  for (int64_t r = begin; r < end; ++r) {
    const char* src = static_cast<const char*>(p.xin) + r * p.xin_row_stride * L::kBytes;
    const char* dy = static_cast<const char*>(p.dy) + r * p.dy_row_stride * L::kBytes;
    const __m512 mean = _mm512_set1_ps(p.rms ? 0.f : static_cast<const float*>(p.mean)[r]);
    const float rstd_s = static_cast<const float*>(p.rstd)[r];
    const __m512 rstd = _mm512_set1_ps(rstd_s);
    // Pass 1: the two row sums of the input gradient (blocked, as deviations()), and this
    // thread's dweight/dbias sums.
    __m512 acc_g = _mm512_setzero_ps(), acc_gx = acc_g;
    for (int64_t b = 0; b <= c.full; b += kBlockChunks) {
      const int64_t e = block_end(b, c.full) + (b + kBlockChunks > c.full && c.tail ? 1 : 0);
      __m512 block_g = _mm512_setzero_ps(), block_gx = block_g;
      for (int64_t k = b; k < e; ++k) {
        const bool tail = k == c.full;
        const int64_t o = k * 16 * L::kBytes;
        const __m512 xhat =
            _mm512_mul_ps(_mm512_sub_ps(tail ? L::load(src + o, c.tail) : L::load(src + o), mean), rstd);
        const __m512 d = tail ? L::load(dy + o, c.tail) : L::load(dy + o);  // 0 in masked-off lanes
        __m512 g = d;
        if constexpr (kWeight) g = _mm512_mul_ps(d, tail ? L::load(w + o, c.tail) : L::load(w + o));
        block_g = _mm512_add_ps(block_g, g);
        block_gx = _mm512_fmadd_ps(g, xhat, block_gx);
        if constexpr (kWeightGrads) {
          float* pw = dwa + k * 16;
          float* pb = dba + k * 16;
          if (tail) {
            _mm512_mask_storeu_ps(pw, c.tail, _mm512_fmadd_ps(d, xhat, _mm512_maskz_loadu_ps(c.tail, pw)));
            _mm512_mask_storeu_ps(pb, c.tail, _mm512_add_ps(d, _mm512_maskz_loadu_ps(c.tail, pb)));
          } else {
            _mm512_storeu_ps(pw, _mm512_fmadd_ps(d, xhat, _mm512_loadu_ps(pw)));
            _mm512_storeu_ps(pb, _mm512_add_ps(d, _mm512_loadu_ps(pb)));
          }
        }
      }
      acc_g = _mm512_add_ps(acc_g, block_g);
      acc_gx = _mm512_add_ps(acc_gx, block_gx);
    }
    // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); RMS norm drops mean(g).
    const __m512 c_g = _mm512_set1_ps(p.rms ? 0.f : _mm512_reduce_add_ps(acc_g) / n);
    const __m512 c_gx = _mm512_set1_ps(_mm512_reduce_add_ps(acc_gx) / n);
    const char* dres = p.dresidual_out
        ? static_cast<const char*>(p.dresidual_out) + r * p.dresidual_out_row_stride * L::kBytes
        : nullptr;
    char* dx = static_cast<char*>(p.dx) + r * p.cols * L::kBytes;
    for (int64_t k = 0; k <= c.full; ++k) {
      const bool tail = k == c.full;
      if (tail && !c.tail) break;
      const int64_t o = k * 16 * L::kBytes;
      const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(tail ? L::load(src + o, c.tail) : L::load(src + o), mean), rstd);
      __m512 g = tail ? L::load(dy + o, c.tail) : L::load(dy + o);
      if constexpr (kWeight) g = _mm512_mul_ps(g, tail ? L::load(w + o, c.tail) : L::load(w + o));
      __m512 v = _mm512_mul_ps(rstd, _mm512_sub_ps(_mm512_sub_ps(g, c_g), _mm512_mul_ps(xhat, c_gx)));
      if (dres) v = _mm512_add_ps(v, tail ? L::load(dres + o, c.tail) : L::load(dres + o));
      if (tail) {
        L::store(dx + o, v, c.tail);
      } else {
        L::store(dx + o, v);
      }
    }
  }
}

}  // namespace

template <Dtype D>
void norm_forward_rows_avx512(const NormForwardParams& p, int64_t begin, int64_t end) {
  const bool w = p.weight != nullptr, b = p.bias != nullptr;
  if (w && b) {
    forward_rows<D, true, true>(p, begin, end);
  } else if (w) {
    forward_rows<D, true, false>(p, begin, end);
  } else if (b) {
    forward_rows<D, false, true>(p, begin, end);
  } else {
    forward_rows<D, false, false>(p, begin, end);
  }
}

template <Dtype D>
void norm_backward_rows_avx512(
    const NormBackwardParams& p, int64_t begin, int64_t end, float* dweight_acc, float* dbias_acc) {
  // dweight and dbias are accumulated together: the caller asks for both or neither
  // (a missing one gets a scratch buffer).
  const bool w = p.weight != nullptr, grads = dweight_acc != nullptr;
  if (w && grads) {
    backward_rows<D, true, true>(p, begin, end, dweight_acc, dbias_acc);
  } else if (w) {
    backward_rows<D, true, false>(p, begin, end, nullptr, nullptr);
  } else if (grads) {
    backward_rows<D, false, true>(p, begin, end, dweight_acc, dbias_acc);
  } else {
    backward_rows<D, false, false>(p, begin, end, nullptr, nullptr);
  }
}

#define FASTARCH_INSTANTIATE(D)                                                                \
  template void norm_forward_rows_avx512<D>(const NormForwardParams&, int64_t, int64_t); \
  template void norm_backward_rows_avx512<D>(const NormBackwardParams&, int64_t, int64_t, float*, float*);
FASTARCH_INSTANTIATE(Dtype::f32)
FASTARCH_INSTANTIATE(Dtype::f16)
FASTARCH_INSTANTIATE(Dtype::bf16)
#undef FASTARCH_INSTANTIATE

}  // namespace fastarch::cpu

#pragma GCC pop_options
