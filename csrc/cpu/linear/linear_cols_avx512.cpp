// AVX-512 build of the CPU small-batch linear layer (fp32, fp16, bf16 weights; fp32 sums).
//
// Up to 4 rows of x (kStreamRows): each W row is read front to back, 64 values per step into 4
// accumulators per x row, then summed across lanes, the bias added and rounded once. More rows:
// a tile is 4 rows of W against up to 4 rows of x: 16 zmm accumulators, each summing 16 lanes of
// one (x row, W row) dot product; per 16 columns of W it loads 4 W vectors (widened to fp32,
// exactly) and up to 4 x vectors and issues up to 16 FMAs. The 4 W rows stream from memory
// once, prefetched kPrefetchBytes ahead (Zen 5, 2 threads, SmolLM2's projections, in-process
// A/B: fp32 1.03-1.08x, fp16 1.06-1.33x at 5-32 rows); a later group of x rows finds them in
// L1/L2. At the end the 4 accumulators of an x row
// are summed across lanes together (one shuffle tree for 4 sums, not 4 reductions), the bias
// added, and the 4 outputs rounded once to the dtype. bf16 on a CPU with AVX512-BF16: the same
// tiles on vdpbf16ps, x as given (tile_dot).
//
// Compiled for AVX-512 through the target pragma below and called only after a run-time CPU
// check. No torch headers (no inline function of theirs may be emitted with AVX-512 code).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "linear_cols.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

#include "cpu/avx512_math.h"

namespace fastarch::cpu {
namespace {

using avx512::Elem;

constexpr int kTileCols = 4;  // W rows (output columns) per tile
constexpr int kTileRows = 4;  // x rows per tile
// Up to this many x rows, each W row is streamed on its own (stream_row); more take the
// 4 x 4 tiles. Measured (bench/linear_rows.py, AMD EPYC Zen 4, 2 threads): one sequential
// stream per W row reads bf16/fp16 weights at ~22-26 GB/s where the tiles' four interleaved
// rows reach ~15; the tiles reuse each x load over 4 W rows, which pays from ~8 x rows.
constexpr int64_t kStreamRows = 4;

// The lane sums of a, b, c, d in lanes 0..3.
inline __m512 sum_lanes4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  // 128-bit block j now holds 4 partial sums of the j-th argument
  __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  s = _mm512_add_ps(s, _mm512_shuffle_ps(s, s, 0x4E));
  s = _mm512_add_ps(s, _mm512_shuffle_ps(s, s, 0xB1));  // every lane of block j: the sum of a[j]
  return _mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), s);
}

// A tile's results: the 4 accumulators of each x row summed across lanes together, the bias
// added, the (up to 4) outputs rounded once and stored.
template <typename L, int MB>
__attribute__((always_inline)) inline void store_tile(const LinearParams& p, int64_t m0, int64_t n0, int cols,
                                                      const __m512 (&acc)[MB][kTileCols]) {
  const __mmask16 out_mask = __mmask16((1u << cols) - 1);
  const __m512 bias = p.bias ? L::load(static_cast<const char*>(p.bias) + n0 * L::kBytes, out_mask)
                             : _mm512_setzero_ps();
  #pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) {
    char* out = static_cast<char*>(p.out) + ((m0 + m) * p.out_features + n0) * L::kBytes;
    L::store(out, _mm512_add_ps(sum_lanes4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]), bias), out_mask);
  }
}

// Output columns n0 .. n0 + cols - 1 (cols <= 4) of x rows m0 .. m0 + MB - 1. With fewer than 4
// columns the missing W rows repeat the last one (read, never written).
template <Elem E, int MB>
void tile(const LinearParams& p, int64_t m0, int64_t n0, int cols) {
  using L = avx512::Lanes<E, false>;
  const int64_t K = p.in_features;
  const float* x = static_cast<const float*>(p.x) + m0 * p.ldx;
  const char* w[kTileCols];
  #pragma GCC unroll 4
  for (int c = 0; c < kTileCols; ++c) w[c] = static_cast<const char*>(p.w) + (n0 + std::min(c, cols - 1)) * K * L::kBytes;
  __m512 acc[MB][kTileCols];
  #pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
    #pragma GCC unroll 4
    for (int c = 0; c < kTileCols; ++c) acc[m][c] = _mm512_setzero_ps();
  // 16 columns of W at k per step, the last, partial step masked. (The unroll pragmas make GCC
  // unroll these loops before it decides where acc lives: otherwise it keeps the accumulators
  // in memory and stores them at every step, at a third of the speed.)
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[kTileCols];
    if (L::kBytes == 4 || (k & 31) == 0) {  // (a cache line of W per step for fp32, per two for 16-bit)
      #pragma GCC unroll 4
      for (int c = 0; c < kTileCols; ++c) _mm_prefetch(w[c] + k * L::kBytes + kPrefetchBytes, _MM_HINT_T0);
    }
    #pragma GCC unroll 4
    for (int c = 0; c < kTileCols; ++c) wv[c] = L::load(w[c] + k * L::kBytes, __mmask16(0xFFFF));
    #pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * p.ldx + k);
      #pragma GCC unroll 4
      for (int c = 0; c < kTileCols; ++c) acc[m][c] = _mm512_fmadd_ps(wv[c], xv, acc[m][c]);
    }
  }
  if (k < K) {
    const __mmask16 mask = __mmask16((1u << (K - k)) - 1);
    __m512 wv[kTileCols];
    #pragma GCC unroll 4
    for (int c = 0; c < kTileCols; ++c) wv[c] = L::load(w[c] + k * L::kBytes, mask);
    #pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * p.ldx + k);
      #pragma GCC unroll 4
      for (int c = 0; c < kTileCols; ++c) acc[m][c] = _mm512_fmadd_ps(wv[c], xv, acc[m][c]);
    }
  }
  store_tile<L, MB>(p, m0, n0, cols, acc);
}

// tile() for bf16 W and x on the AVX512-BF16 instruction: vdpbf16ps takes 32 values of one W
// row against 32 of one x row (x as given, not widened), each pair's two products (exact in
// fp32) added into an fp32 lane: half the instructions of widening both to fp32 for FMAs. The
// four W rows are prefetched kPrefetchBytes ahead, full steps take plain loads (a masked load
// from memory is slow on the Zen 5), the last step masked. As every vdpbf16ps, it reads bf16
// subnormals as 0 and flushes subnormal sums to 0 (PyTorch's bf16 GEMM, oneDNN's, does the
// same). AMD EPYC Zen 5, 2 threads, SmolLM2-135M's projections (bench/linear_rows.py), side by
// side in one process: 1.3x the widened tile at 5-32 rows; with the prefetch and plain loads,
// against F.linear 1.64x at 5 rows, 1.26x at 8, 1.12x at 16, 0.97x at 32.
template <int MB>
void tile_dot(const LinearParams& p, int64_t m0, int64_t n0, int cols) {
  using L = avx512::Lanes<Elem::bf16, false>;
  const int64_t K = p.in_features;
  const uint16_t* x = static_cast<const uint16_t*>(p.x16) + m0 * p.ldx16;
  const uint16_t* w[kTileCols];
  #pragma GCC unroll 4
  for (int c = 0; c < kTileCols; ++c) w[c] = static_cast<const uint16_t*>(p.w) + (n0 + std::min(c, cols - 1)) * K;
  __m512 acc[MB][kTileCols];
  #pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
    #pragma GCC unroll 4
    for (int c = 0; c < kTileCols; ++c) acc[m][c] = _mm512_setzero_ps();
  // (as tile(): the unroll pragmas keep acc in registers)
  auto dot = [&](const __m512bh (&wv)[kTileCols], int m, __m512bh xv) {
    #pragma GCC unroll 4
    for (int c = 0; c < kTileCols; ++c) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], wv[c], xv);
  };
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[kTileCols];
    #pragma GCC unroll 4
    for (int c = 0; c < kTileCols; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(w[c] + k) + kPrefetchBytes, _MM_HINT_T0);
      wv[c] = (__m512bh)_mm512_loadu_si512(w[c] + k);
    }
    #pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) dot(wv, m, (__m512bh)_mm512_loadu_si512(x + m * p.ldx16 + k));
  }
  if (k < K) {
    const __mmask32 mask = __mmask32((1u << (K - k)) - 1);
    __m512bh wv[kTileCols];
    #pragma GCC unroll 4
    for (int c = 0; c < kTileCols; ++c) wv[c] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w[c] + k);
    #pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) dot(wv, m, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * p.ldx16 + k));
  }
  store_tile<L, MB>(p, m0, n0, cols, acc);
}

// Output column n of x rows m0 .. m0 + MB - 1: W row n read front to back as one stream, 64
// values per step into 4 accumulators per x row, each cache line prefetched kPrefetchBytes
// ahead (the rows of W follow one another: the prefetch runs on into the next). On the AMD EPYC
// Zen 5, 2 threads, SmolLM2-135M-shaped weights through the op, side by side in one process:
// bf16 1.04-1.07x at 1 row, 1.06-1.10x at 4; fp32 1.02-1.03x (already near the copy bandwidth).
template <Elem E, int MB>
void stream_row(const LinearParams& p, int64_t m0, int64_t n) {
  using L = avx512::Lanes<E, false>;
  const int64_t K = p.in_features;
  const float* x = static_cast<const float*>(p.x) + m0 * p.ldx;
  const char* w = static_cast<const char*>(p.w) + n * K * L::kBytes;
  __m512 acc[MB][4];
  #pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
    #pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    #pragma GCC unroll 4
    for (int64_t b = 0; b < 64 * L::kBytes; b += 64) _mm_prefetch(w + k * L::kBytes + b + kPrefetchBytes, _MM_HINT_T0);
    __m512 wv[4];
    #pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) wv[j] = L::load(w + (k + 16 * j) * L::kBytes, __mmask16(0xFFFF));
    #pragma GCC unroll 4
    for (int m = 0; m < MB; ++m)
      #pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_fmadd_ps(wv[j], _mm512_loadu_ps(x + m * p.ldx + k + 16 * j), acc[m][j]);
  }
  for (; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    const __m512 wv = L::load(w + k * L::kBytes, mask);
    #pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) acc[m][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + m * p.ldx + k), acc[m][0]);
  }
  const __m512 bias = p.bias ? L::load(static_cast<const char*>(p.bias) + n * L::kBytes, 1) : _mm512_setzero_ps();
  #pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) {
    const float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3])));
    L::store(static_cast<char*>(p.out) + ((m0 + m) * p.out_features + n) * L::kBytes,
             _mm512_add_ps(_mm512_set1_ps(sum), bias), 1);
  }
}

template <Elem E>
void stream_cols(const LinearParams& p, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    int64_t m0 = 0;
    for (; m0 + 4 <= p.rows; m0 += 4) stream_row<E, 4>(p, m0, n);
    switch (p.rows - m0) {
      case 3: stream_row<E, 3>(p, m0, n); break;
      case 2: stream_row<E, 2>(p, m0, n); break;
      case 1: stream_row<E, 1>(p, m0, n); break;
      default: break;
    }
  }
}

template <Elem E>
void cols(const LinearParams& p, int64_t begin, int64_t end) {
  if (p.rows <= kStreamRows) return stream_cols<E>(p, begin, end);
  // The tiles of MB x rows: bf16 on vdpbf16ps where the glue passed x as given (AVX512-BF16).
  auto run = [&]<int MB>(int64_t m0, int64_t n0, int cols) {
    if constexpr (E == Elem::bf16) {
      if (p.x16) return tile_dot<MB>(p, m0, n0, cols);
    }
    tile<E, MB>(p, m0, n0, cols);
  };
  for (int64_t n0 = begin; n0 < end; n0 += kTileCols) {
    const int cols = static_cast<int>(std::min<int64_t>(kTileCols, end - n0));
    int64_t m0 = 0;
    for (; m0 + kTileRows <= p.rows; m0 += kTileRows) run.template operator()<kTileRows>(m0, n0, cols);
    switch (p.rows - m0) {
      case 3:
        run.template operator()<3>(m0, n0, cols);
        break;
      case 2:
        run.template operator()<2>(m0, n0, cols);
        break;
      case 1:
        run.template operator()<1>(m0, n0, cols);
        break;
      default:
        break;
    }
  }
}

}  // namespace

template <Dtype D>
void linear_cols_avx512(const LinearParams& p, int64_t begin, int64_t end) {
  if constexpr (D == Dtype::f32) {
    cols<Elem::f32>(p, begin, end);
  } else if constexpr (D == Dtype::f16) {
    cols<Elem::f16>(p, begin, end);
  } else if constexpr (D == Dtype::bf16) {
    cols<Elem::bf16>(p, begin, end);
  }
}

template void linear_cols_avx512<Dtype::f32>(const LinearParams&, int64_t, int64_t);
template void linear_cols_avx512<Dtype::f16>(const LinearParams&, int64_t, int64_t);
template void linear_cols_avx512<Dtype::bf16>(const LinearParams&, int64_t, int64_t);

}  // namespace fastarch::cpu

#pragma GCC pop_options
