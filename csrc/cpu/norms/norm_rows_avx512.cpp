// AVX-512 build of the CPU norm row kernels (fp32, fp16, bf16; statistics in fp32).
//
// One row at a time. The first pass streams the row from memory and leaves it in an fp32
// scratch row (x, or x + residual; for the backward, xhat and dy * w), which the later passes
// read from L1/L2 without converting again; RMSNorm's first pass also sums the squares (two
// passes; LayerNorm's deviations need the mean first: three). Rows of 4 KB and more prefetch
// the next row during their last pass. Memory traffic is one read per input and one
// write per output; large outputs are written with streaming stores (kStream). Weight and
// bias come as fp32. On a CPU with AVX512-BF16 one instruction rounds to bf16 (kBf16Insn).
//
// The whole file is compiled for AVX-512 through the target pragma below and is only called
// after a run-time CPU check, so the extension still loads on CPUs without it. It includes no
// torch headers, so no inline function of theirs is emitted with AVX-512 instructions.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "norm_rows.h"

// (No standard-library templates are used below the pragma: an instantiation made here could
// be the one the linker keeps for the whole extension.)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

#include "cpu/avx512_math.h"

namespace fastarch::cpu {
namespace {

// 16 values of dtype D in memory <-> 16 fp32 lanes (avx512_math.h). kBf16Insn: narrow bf16
// with vcvtneps2bf16.
template <Dtype D, bool kBf16Insn = false>
using Lanes16 = avx512::LanesOf<D, kBf16Insn>;

using F32 = Lanes16<Dtype::f32>;

// A full chunk of results: a streaming store when kStream (no read-for-ownership of the
// destination line, and the output does not evict the inputs from cache), else a plain one.
template <typename L, bool kStream>
inline void put(void* p, __m512 v) {
  if constexpr (kStream) {
    L::stream(p, v);
  } else {
    L::store(p, v);
  }
}

template <typename L>
inline const void* at(const void* row, int64_t k) {
  return static_cast<const char*>(row) + k * 16 * L::kBytes;
}
template <typename L>
inline void* at(void* row, int64_t k) {
  return static_cast<char*>(row) + k * 16 * L::kBytes;
}

// The columns of a row in chunks of 16: `full` whole chunks, then a masked tail. Row sums are
// taken in two levels, within blocks of kBlockChunks chunks and across blocks, so that each
// lane adds at most a few dozen values at either level: a 65536-wide row sums about as
// accurately as with a pairwise sum.
constexpr int64_t kBlockChunks = 32;

struct Chunks {
  int64_t full;
  __mmask16 tail;  // 0 when cols is a multiple of 16
  explicit Chunks(int64_t cols) : full(cols / 16), tail(static_cast<__mmask16>((1u << (cols % 16)) - 1)) {}
  int64_t count() const { return full + (tail ? 1 : 0); }  // chunk index `full` is the tail
  int64_t block_end(int64_t begin) const { return begin + kBlockChunks < count() ? begin + kBlockChunks : count(); }
  __mmask16 mask(int64_t k) const { return k == full ? tail : static_cast<__mmask16>(0xFFFF); }
};

template <typename L>
inline __m512 load_chunk(const void* row, int64_t k, const Chunks& c) {
  return k == c.full ? L::load(at<L>(row, k), c.tail) : L::load(at<L>(row, k));
}

// The sums of pass 1: of s, and (kSquares, for RMSNorm, whose statistics need no mean) of s^2,
// in the blocks and order of LayerNorm's pass 2 (statistics()), which RMSNorm skips.
struct RowSums {
  float sum, sum_sq;
};

// Pass 1 of the forward: s = x, or round(x + residual) (also written to residual_out), into
// the fp32 scratch row (fp32 x without a residual is read in place: kCopy false); returns the
// sum of s (and with kSquares of s^2). Masked-off tail lanes are 0 and add nothing.
template <typename L, bool kStream, bool kCopy, bool kSquares>
RowSums load_row(const void* x, const void* res, void* out, float* scratch, const Chunks& c) {
  __m512 total = _mm512_setzero_ps(), total_sq = total;
  for (int64_t b = 0; b < c.count(); b += kBlockChunks) {
    __m512 acc = _mm512_setzero_ps(), q0 = acc;
    for (int64_t k = b; k < c.block_end(b); ++k) {
      __m512 s = load_chunk<L>(x, k, c);
      if (res) {
        s = L::round(_mm512_add_ps(s, load_chunk<L>(res, k, c)));
        if (k == c.full) {
          L::store(at<L>(out, k), s, c.tail);
        } else {
          put<L, kStream>(at<L>(out, k), s);
        }
      }
      if constexpr (kCopy) F32::store(scratch + 16 * k, s);  // whole chunk: the scratch row has room
      acc = _mm512_add_ps(acc, s);
      if constexpr (kSquares) q0 = _mm512_fmadd_ps(s, s, q0);
    }
    total = _mm512_add_ps(total, acc);
    if constexpr (kSquares) total_sq = _mm512_add_ps(total_sq, q0);
  }
  return {_mm512_reduce_add_ps(total), kSquares ? _mm512_reduce_add_ps(total_sq) : 0.f};
}

// RMSNorm's rstd from pass 1's sum of squares.
inline float rms_rstd(float sum_sq, float n, float eps) { return 1.f / std::sqrt(sum_sq / n + eps); }

struct Statistics {
  float mean;        // as computed; the deviations are taken from it
  float correction;  // the deviations' own mean: the rounding error of `mean`
  float rstd;
};

// Pass 2 of LayerNorm: statistics of the fp32 row s (masked-off tail lanes are excluded).
Statistics statistics(const float* s, const Chunks& c, float n, float eps, float sum) {
  const __m512 mean = _mm512_set1_ps(sum / n);
  __m512 total = _mm512_setzero_ps(), total_sq = total;
  for (int64_t b = 0; b < c.count(); b += kBlockChunks) {
    __m512 d0 = _mm512_setzero_ps(), q0 = d0;
    for (int64_t k = b; k < c.block_end(b); ++k) {
      const __mmask16 m = c.mask(k);
      const __m512 d = _mm512_maskz_sub_ps(m, load_chunk<F32>(s, k, c), mean);
      d0 = _mm512_add_ps(d0, d);
      q0 = _mm512_fmadd_ps(d, d, q0);
    }
    total = _mm512_add_ps(total, d0);
    total_sq = _mm512_add_ps(total_sq, q0);
  }
  const float sum_sq = _mm512_reduce_add_ps(total_sq);
  // Corrected two-pass variance: deviations from the fp32 mean, minus the square of their own
  // mean (the mean's rounding error), which is also subtracted from every deviation. No
  // E[x^2] - mean^2 cancellation, and no rounding error of the mean amplified by rstd when the
  // row's spread is small next to its mean.
  const float row_mean = sum / n;
  const float correction = _mm512_reduce_add_ps(total) / n;
  float var = sum_sq / n - correction * correction;  // NaN for a NaN or inf in the row
  var = var < 0.f ? 0.f : var;  // rounding can take it below 0; a NaN stays NaN
  // A row whose mean square mean^2 + var overflows fp32 (|x| beyond ~1.8e19) has no fp32
  // statistics: rstd is NaN, and so is the row's y, as PyTorch's LayerNorm gives (else a var
  // of inf would make y the bias alone, silently wrong). One test per row, not per element.
  const bool in_range = row_mean * row_mean + var <= __FLT_MAX__;
  return {row_mean, correction, in_range ? 1.f / std::sqrt(var + eps) : __builtin_nanf("")};
}

// Pass 3: y = ((s - mean) - correction) * rstd * w + b. next, next_res: the next row's x and
// residual (or null), prefetched a line per chunk, so that their reads from memory overlap this
// row's arithmetic from cache instead of following it (see kPrefetchRowBytes).
template <typename L, bool kWeight, bool kBias, bool kStream>
void normalize_row(const float* s, const float* w, const float* b, void* y, const Chunks& c, const Statistics& st,
                   const char* next, const char* next_res) {
  const __m512 vm = _mm512_set1_ps(st.mean), vc = _mm512_set1_ps(st.correction), vr = _mm512_set1_ps(st.rstd);
  for (int64_t k = 0; k < c.count(); ++k) {
    if (next && (L::kBytes == 4 || (k & 1) == 0)) {  // (a line per fp32 chunk, per two 16-bit ones)
      _mm_prefetch(static_cast<const char*>(at<L>(next, k)), _MM_HINT_T0);
      if (next_res) _mm_prefetch(static_cast<const char*>(at<L>(next_res, k)), _MM_HINT_T0);
    }
    __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_sub_ps(load_chunk<F32>(s, k, c), vm), vc), vr);
    if constexpr (kWeight && kBias) {
      t = _mm512_fmadd_ps(t, load_chunk<F32>(w, k, c), load_chunk<F32>(b, k, c));
    } else if constexpr (kWeight) {
      t = _mm512_mul_ps(t, load_chunk<F32>(w, k, c));
    } else if constexpr (kBias) {
      t = _mm512_add_ps(t, load_chunk<F32>(b, k, c));
    }
    if (k == c.full) {
      L::store(at<L>(y, k), t, c.tail);
    } else {
      put<L, kStream>(at<L>(y, k), t);
    }
  }
}

template <typename L, bool kWeight, bool kBias, bool kStream>
void forward_rows(const NormForwardParams& p, int64_t begin, int64_t end, const Avx512RowArgs& a) {
  const Chunks c(p.cols);
  const float n = static_cast<float>(p.cols), eps = static_cast<float>(p.eps);
  for (int64_t r = begin; r < end; ++r) {
    const char* x = static_cast<const char*>(p.x) + r * p.x_row_stride * L::kBytes;
    const char* res = p.residual ? static_cast<const char*>(p.residual) + r * p.residual_row_stride * L::kBytes : nullptr;
    char* out = p.residual ? static_cast<char*>(p.residual_out) + r * p.cols * L::kBytes : nullptr;
    constexpr bool kInPlace = L::kBytes == 4;  // fp32 x needs no copy unless a residual is added
    const bool copy = !kInPlace || res;
    const float* s = copy ? a.scratch : reinterpret_cast<const float*>(x);
    Statistics st;
    if (p.rms) {  // (the sums of squares in pass 1: two passes, not three)
      const RowSums sums = copy ? load_row<L, kStream, true, true>(x, res, out, a.scratch, c)
                                : load_row<L, kStream, false, true>(x, nullptr, nullptr, nullptr, c);
      st = {0.f, 0.f, rms_rstd(sums.sum_sq, n, eps)};
    } else {
      const RowSums sums = copy ? load_row<L, kStream, true, false>(x, res, out, a.scratch, c)
                                : load_row<L, kStream, false, false>(x, nullptr, nullptr, nullptr, c);
      st = statistics(s, c, n, eps, sums.sum);
    }
    const bool ahead = r + 1 < end && p.cols * L::kBytes >= kPrefetchRowBytes;
    normalize_row<L, kWeight, kBias, kStream>(s, a.weight, a.bias, static_cast<char*>(p.y) + r * p.cols * L::kBytes, c, st,
                                              ahead ? x + p.x_row_stride * L::kBytes : nullptr,
                                              ahead && res ? res + p.residual_row_stride * L::kBytes : nullptr);
    if (!p.rms) static_cast<float*>(p.mean)[r] = st.mean + st.correction;
    static_cast<float*>(p.rstd)[r] = st.rstd;
  }
  if constexpr (kStream) _mm_sfence();  // order the streaming stores before the caller's reads
}

template <typename L, bool kWeight, bool kWeightGrads, bool kStream>
void backward_rows(
    const NormBackwardParams& p, int64_t begin, int64_t end, float* dwa, float* dba, const Avx512RowArgs& a) {
  const Chunks c(p.cols);
  const float n = static_cast<float>(p.cols);
  float* xhat_row = a.scratch;
  float* g_row = a.scratch + 16 * c.count();
  for (int64_t r = begin; r < end; ++r) {
    const char* src = static_cast<const char*>(p.xin) + r * p.xin_row_stride * L::kBytes;
    const char* dy = static_cast<const char*>(p.dy) + r * p.dy_row_stride * L::kBytes;
    const __m512 mean = _mm512_set1_ps(p.rms ? 0.f : static_cast<const float*>(p.mean)[r]);
    const __m512 rstd = _mm512_set1_ps(static_cast<const float*>(p.rstd)[r]);
    // Pass 1: xhat and g = dy * w into the scratch rows; the row sums of g and g * xhat; this
    // thread's dweight/dbias sums. Masked-off tail lanes: xhat is masked to 0, dy loads 0.
    __m512 acc_g = _mm512_setzero_ps(), acc_gx = acc_g;
    for (int64_t b = 0; b < c.count(); b += kBlockChunks) {
      __m512 block_g = _mm512_setzero_ps(), block_gx = block_g;
      for (int64_t k = b; k < c.block_end(b); ++k) {
        const __m512 xhat = _mm512_maskz_mul_ps(c.mask(k), _mm512_sub_ps(load_chunk<L>(src, k, c), mean), rstd);
        const __m512 d = load_chunk<L>(dy, k, c);
        __m512 g = d;
        if constexpr (kWeight) g = _mm512_mul_ps(d, load_chunk<F32>(a.weight, k, c));
        F32::store(xhat_row + 16 * k, xhat);
        F32::store(g_row + 16 * k, g);
        block_g = _mm512_add_ps(block_g, g);
        block_gx = _mm512_fmadd_ps(g, xhat, block_gx);
        if constexpr (kWeightGrads) {
          const __mmask16 m = c.mask(k);
          float* pw = dwa + 16 * k;
          float* pb = dba + 16 * k;
          _mm512_mask_storeu_ps(pw, m, _mm512_fmadd_ps(d, xhat, _mm512_maskz_loadu_ps(m, pw)));
          _mm512_mask_storeu_ps(pb, m, _mm512_add_ps(d, _mm512_maskz_loadu_ps(m, pb)));
        }
      }
      acc_g = _mm512_add_ps(acc_g, block_g);
      acc_gx = _mm512_add_ps(acc_gx, block_gx);
    }
    // Pass 2: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); RMS norm drops mean(g).
    const __m512 c_g = _mm512_set1_ps(p.rms ? 0.f : _mm512_reduce_add_ps(acc_g) / n);
    const __m512 c_gx = _mm512_set1_ps(_mm512_reduce_add_ps(acc_gx) / n);
    const char* dres = p.dresidual_out
        ? static_cast<const char*>(p.dresidual_out) + r * p.dresidual_out_row_stride * L::kBytes
        : nullptr;
    char* dx = static_cast<char*>(p.dx) + r * p.cols * L::kBytes;
    // the next row's x and dy prefetched as the forward's pass 3 does (forward + backward
    // 1.04-1.24x at 2048x4096 and 1024x8192 on the Zen 5, in-process A/B)
    const bool ahead = r + 1 < end && p.cols * L::kBytes >= kPrefetchRowBytes;
    for (int64_t k = 0; k < c.count(); ++k) {
      if (ahead && (L::kBytes == 4 || (k & 1) == 0)) {
        _mm_prefetch(static_cast<const char*>(at<L>(src + p.xin_row_stride * L::kBytes, k)), _MM_HINT_T0);
        _mm_prefetch(static_cast<const char*>(at<L>(dy + p.dy_row_stride * L::kBytes, k)), _MM_HINT_T0);
      }
      const __m512 centered = _mm512_sub_ps(F32::load(g_row + 16 * k), c_g);
      __m512 v = _mm512_mul_ps(rstd, _mm512_fnmadd_ps(F32::load(xhat_row + 16 * k), c_gx, centered));
      if (dres) v = _mm512_add_ps(v, load_chunk<L>(dres, k, c));
      if (k == c.full) {
        L::store(at<L>(dx, k), v, c.tail);
      } else {
        put<L, kStream>(at<L>(dx, k), v);
      }
    }
  }
  if constexpr (kStream) _mm_sfence();
}

// Run-time flags -> template arguments.
template <typename L>
void forward_dispatch(const NormForwardParams& p, int64_t begin, int64_t end, const Avx512RowArgs& a) {
  const int flags = (p.weight ? 4 : 0) | (p.bias ? 2 : 0) | (a.stream ? 1 : 0);
  switch (flags) {
    case 7: return forward_rows<L, true, true, true>(p, begin, end, a);
    case 6: return forward_rows<L, true, true, false>(p, begin, end, a);
    case 5: return forward_rows<L, true, false, true>(p, begin, end, a);
    case 4: return forward_rows<L, true, false, false>(p, begin, end, a);
    case 3: return forward_rows<L, false, true, true>(p, begin, end, a);
    case 2: return forward_rows<L, false, true, false>(p, begin, end, a);
    case 1: return forward_rows<L, false, false, true>(p, begin, end, a);
    default: return forward_rows<L, false, false, false>(p, begin, end, a);
  }
}

// dweight and dbias are accumulated together: the caller asks for both or neither (a missing
// one gets a scratch buffer).
template <typename L>
void backward_dispatch(
    const NormBackwardParams& p, int64_t begin, int64_t end, float* dw, float* db, const Avx512RowArgs& a) {
  const int flags = (p.weight ? 4 : 0) | (dw ? 2 : 0) | (a.stream ? 1 : 0);
  switch (flags) {
    case 7: return backward_rows<L, true, true, true>(p, begin, end, dw, db, a);
    case 6: return backward_rows<L, true, true, false>(p, begin, end, dw, db, a);
    case 5: return backward_rows<L, true, false, true>(p, begin, end, dw, db, a);
    case 4: return backward_rows<L, true, false, false>(p, begin, end, dw, db, a);
    case 3: return backward_rows<L, false, true, true>(p, begin, end, dw, db, a);
    case 2: return backward_rows<L, false, true, false>(p, begin, end, dw, db, a);
    case 1: return backward_rows<L, false, false, true>(p, begin, end, dw, db, a);
    default: return backward_rows<L, false, false, false>(p, begin, end, dw, db, a);
  }
}

}  // namespace

template <Dtype D>
void norm_forward_rows_avx512(const NormForwardParams& p, int64_t begin, int64_t end, const Avx512RowArgs& a) {
  if constexpr (D == Dtype::bf16) {
    if (a.bf16_instructions) return forward_dispatch<Lanes16<D, true>>(p, begin, end, a);
  }
  forward_dispatch<Lanes16<D, false>>(p, begin, end, a);
}

template <Dtype D>
void norm_backward_rows_avx512(
    const NormBackwardParams& p, int64_t begin, int64_t end, float* dweight_acc, float* dbias_acc,
    const Avx512RowArgs& a) {
  if constexpr (D == Dtype::bf16) {
    if (a.bf16_instructions) return backward_dispatch<Lanes16<D, true>>(p, begin, end, dweight_acc, dbias_acc, a);
  }
  backward_dispatch<Lanes16<D, false>>(p, begin, end, dweight_acc, dbias_acc, a);
}

#define FASTARCH_INSTANTIATE(D)                                                                                   \
  template void norm_forward_rows_avx512<D>(const NormForwardParams&, int64_t, int64_t, const Avx512RowArgs&); \
  template void norm_backward_rows_avx512<D>(                                                                    \
      const NormBackwardParams&, int64_t, int64_t, float*, float*, const Avx512RowArgs&);
FASTARCH_INSTANTIATE(Dtype::f32)
FASTARCH_INSTANTIATE(Dtype::f16)
FASTARCH_INSTANTIATE(Dtype::bf16)
#undef FASTARCH_INSTANTIATE

}  // namespace fastarch::cpu

#pragma GCC pop_options
