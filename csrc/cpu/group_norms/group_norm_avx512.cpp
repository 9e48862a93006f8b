// AVX-512 build of the CPU group norm passes (fp32, fp16, bf16: loads widened to fp32, math in
// fp32, one rounding on store). Same items and sums as the portable build (group_norm_rows.h).
// NCHW: an item is a stretch of one channel's row, summed by 2 x 16 lanes and the shift, scale
// and table values are scalars; NHWC: an item is a block of rows of all channels, processed 64
// channels at a time with register accumulators and table vectors.
//
// Compiled for AVX-512 through the target pragma below and called only after a run-time CPU
// check; no torch headers (no inline function of theirs is emitted with AVX-512 instructions).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "group_norm_rows.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

#include "cpu/avx512_math.h"

namespace fastarch::cpu::gn {
namespace {

using avx512::splat;

template <Dtype D, bool kBf16Insn>
using Lanes = avx512::LanesOf<D, kBf16Insn>;

// fp32 scratch and tables (sums, per-channel tables) through avx512_math.h's lanes, whose masked
// forms take the plain instructions for a full mask (1.02-1.05x on the channels-last forward,
// Zen 5).
using F32 = Lanes<Dtype::f32, false>;

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

template <typename L>
inline const void* at(const void* base, int64_t i) {
  return static_cast<const char*>(base) + i * L::kBytes;
}
template <typename L>
inline void* at(void* base, int64_t i) {
  return static_cast<char*>(base) + i * L::kBytes;
}

// silu(z) = z / (1 + exp(-z)): -0 where exp(-z) overflows, NaN at z = -inf (as F.silu). For
// 16-bit outputs (kLow) the division is vrcp14ps (relative error < 2^-14, an eighth of fp16's
// half ulp; rcp14(inf) = 0 as 1 / inf).
template <bool kLow>
inline __m512 silu(__m512 z) {
  const __m512 d = _mm512_add_ps(splat(1.0f), avx512::exp_ps<kLow>(_mm512_sub_ps(_mm512_setzero_ps(), z)));
  return kLow ? _mm512_mul_ps(z, _mm512_rcp14_ps(d)) : _mm512_div_ps(z, d);
}
// silu'(z) = s (1 + z (1 - s)), 1 - s without cancellation (e s where e = exp(-z) < 1); s by
// vrcp14ps for kLow, as above.
template <bool kLow>
inline __m512 silu_grad(__m512 z) {
  if constexpr (kLow) {
    const __m512 e = avx512::exp_ps<true>(_mm512_sub_ps(_mm512_setzero_ps(), z));
    const __m512 s = _mm512_rcp14_ps(_mm512_add_ps(splat(1.0f), e));
    const __mmask16 small = _mm512_cmp_ps_mask(e, splat(1.0f), _CMP_LT_OQ);
    const __m512 one_minus_s = _mm512_mask_blend_ps(small, _mm512_sub_ps(splat(1.0f), s), _mm512_mul_ps(e, s));
    return _mm512_mul_ps(s, _mm512_fmadd_ps(z, one_minus_s, splat(1.0f)));
  } else {
    const avx512::Sigmoid sg = avx512::sigmoid<false>(z);
    return _mm512_mul_ps(sg.s, _mm512_fmadd_ps(z, sg.one_minus_s, splat(1.0f)));
  }
}

// Channels per NHWC block: 4 vectors of sums and 4 of squares stay in registers.
constexpr int kBlockVectors = 4;
constexpr int64_t kBlockChannels = 16 * kBlockVectors;

// The item's NCHW row stretch (channel c, positions [s0, s1)) or NHWC tile (positions [s0, s1)).
struct Item {
  int64_t n, c, k, s0, s1;
};
template <typename P>
Item locate(const P& p, const Tiling& t, int64_t item) {
  Item it{};
  it.n = p.channels_last ? item / t.chunks : item / (p.channels * t.chunks);
  it.c = p.channels_last ? -1 : (item / t.chunks) % p.channels;
  it.k = item % t.chunks;
  it.s0 = it.k * t.chunk;
  it.s1 = std::min(p.spatial, it.s0 + t.chunk);
  return it;
}

inline float* partial_at(float* partial, const Tiling& t, int64_t channels, int64_t n, int64_t c, int64_t k) {
  return partial + ((n * channels + c) * t.chunks + k) * 2;
}

// The sums of one NCHW stretch of `len` values from `row`: f(x, dy, mask, i, a, b) (values i ..
// i + 15 of the stretch) adds to a and b
// (two chains for 32 values in flight). Masked-off lanes must add 0. Summed in blocks of 256
// values (8 per lane) whose totals are then added, so that no running sum takes more than ~64
// terms (stretches are up to 16K values): long rows sum about as accurately as short ones.
template <typename L, typename F>
inline void row_sums(const void* row, const void* drow, int64_t len, F f, float* out) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 total_a = zero, total_b = zero;
  for (int64_t b0 = 0; b0 < len; b0 += 256) {
    const int64_t b1 = std::min(len, b0 + 256);
    __m512 a0 = zero, a1 = zero, bb0 = zero, bb1 = zero;
    int64_t i = b0;
    for (; i + 32 <= b1; i += 32) {
      f(L::load(at<L>(row, i), 0xFFFF), drow ? L::load(at<L>(drow, i), 0xFFFF) : zero, 0xFFFF, i, a0, bb0);
      f(L::load(at<L>(row, i + 16), 0xFFFF), drow ? L::load(at<L>(drow, i + 16), 0xFFFF) : zero, 0xFFFF, i + 16, a1,
        bb1);
    }
    for (; i < b1; i += 16) {
      const __mmask16 m = tail_mask(b1 - i);
      f(L::load(at<L>(row, i), m), drow ? L::load(at<L>(drow, i), m) : zero, m, i, a0, bb0);
    }
    total_a = _mm512_add_ps(total_a, _mm512_add_ps(a0, a1));
    total_b = _mm512_add_ps(total_b, _mm512_add_ps(bb0, bb1));
  }
  out[0] = _mm512_reduce_add_ps(total_a);
  out[1] = _mm512_reduce_add_ps(total_b);
}

// Rows per NHWC block: the block's rows (8 KB of fp32 at C = 256) stay in L1 while every
// channel block goes over them. (Going down all of an item's rows per channel block instead
// strides by C values, and at C = 256 those rows fall into a few L1 sets: ~2x slower.)
constexpr int64_t kRows = 8;
constexpr int64_t kPointRows = 1;

// Calls fn.template operator()<W>() with W = min(V, vectors), vectors >= 1: the 16-channel
// vectors left in an NHWC block as a compile-time count (register arrays sized by a run-time one
// are spilled to the stack).
template <int V, typename Fn>
inline void with_vectors(int64_t vectors, Fn&& fn) {
  const int64_t w = std::min<int64_t>(V, vectors);
  if constexpr (V >= 2) {
    if (w == 1) return fn.template operator()<1>();
  }
  if constexpr (V >= 3) {
    if (w == 2) return fn.template operator()<2>();
  }
  if constexpr (V >= 4) {
    if (w == 3) return fn.template operator()<3>();
  }
  static_assert(V <= 4, "with_vectors: add the cases of a wider block");
  fn.template operator()<V>();
}

// How far ahead of its loads an NHWC tile's pass prefetches, in bytes of rows: its blocks go
// across kRows rows one channel block at a time, an order the hardware prefetchers do not follow
// from memory (the same rows' lines kRows * C apart in time), so each load asks for the line
// of the same channels ~8 KB of rows further on. Channels-last forward 1.05-1.65x, forward +
// backward up to 1.3x (Zen 5, fp32 and bf16, C 256-1280; in-process A/B, 4-8 KB best).
constexpr int64_t kAheadBytes = 8192;

// The sums of rows [r0, r1) of an NHWC tile at the V 16-channel vectors from channel c0, in
// registers (V a compile-time count, so the accumulators are never spilled), added to totals.
// Prefetches x and dy `ahead` values on, and x at `also` past that when also != 0 (the other
// sample that apply_stats reads in step).
template <int V, typename L, typename P, typename F>
inline void tile_block(const P& p, const Item& it, int64_t r0, int64_t r1, int64_t c0, const void* x, const void* dy,
                       F& f, float* totals, int64_t ahead, int64_t also) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 a[V], b[V];
  __mmask16 m[V];
  for (int v = 0; v < V; ++v) {
    a[v] = b[v] = zero;
    m[v] = tail_mask(p.channels - c0 - 16 * v);
  }
  auto prefetch = [](const void* q) { _mm_prefetch(static_cast<const char*>(q), _MM_HINT_T0); };
  for (int64_t s = r0; s < r1; ++s) {
    const int64_t row = (it.n * p.spatial + s) * p.channels;
    for (int v = 0; v < V; ++v) {
      const int64_t c = c0 + 16 * v;
      prefetch(at<L>(x, row + c + ahead));  // (past the tensor's end too: a prefetch never faults)
      if (dy) prefetch(at<L>(dy, row + c + ahead));
      if (also) prefetch(at<L>(x, row + c + ahead + also));
      f(L::load(at<L>(x, row + c), m[v]), dy ? L::load(at<L>(dy, row + c), m[v]) : zero, m[v], c, row + c, a[v], b[v]);
    }
  }
  for (int v = 0; v < V; ++v) {
    const int64_t c = c0 + 16 * v;
    F32::store(totals + c, _mm512_add_ps(F32::load(totals + c, m[v]), a[v]), m[v]);
    F32::store(totals + p.channels + c, _mm512_add_ps(F32::load(totals + p.channels + c, m[v]), b[v]), m[v]);
  }
}

// The same sums for an NHWC tile, per channel: f(x, dy, mask, c, offset, a, b) for each
// 16-channel vector at channel c of each row (offset: of x[n, s, c]); per block of kRows rows in
// registers, then added to the tile's totals (items hold at most 1024 rows: no running sum takes
// more than ~128 terms). Results stored to the partial array. also: as tile_block's.
template <typename L, typename P, typename F>
inline void tile_sums(const P& p, const Tiling& t, const Item& it, const void* x, const void* dy, F f, float* partial,
                      float* totals, int64_t also = 0) {
  std::fill(totals, totals + 2 * p.channels, 0.0f);
  const int64_t ahead = std::max<int64_t>(1, kAheadBytes / (p.channels * L::kBytes)) * p.channels;
  for (int64_t r0 = it.s0; r0 < it.s1; r0 += kRows) {
    const int64_t r1 = std::min(it.s1, r0 + kRows);
    for (int64_t c0 = 0; c0 < p.channels; c0 += kBlockChannels) {
      with_vectors<kBlockVectors>((p.channels - c0 + 15) / 16, [&]<int W>() {
        tile_block<W, L>(p, it, r0, r1, c0, x, dy, f, totals, ahead, also);
      });
    }
  }
  for (int64_t c = 0; c < p.channels; ++c) {
    float* out = partial_at(partial, t, p.channels, it.n, c, it.k);
    out[0] = totals[c];
    out[1] = totals[p.channels + c];
  }
}

// The forward statistics' step: d = x - shift (0 where masked off) added to a, d^2 to b. The
// statistics pass and the pipelined apply_stats share it, so their sums are the same bits.
inline void add_shifted(__m512 x, __m512 shift, __mmask16 m, __m512& a, __m512& b) {
  const __m512 d = _mm512_maskz_sub_ps(m, x, shift);
  a = _mm512_add_ps(a, d);
  b = _mm512_fmadd_ps(d, d, b);
}

// The forward's output step: act((x - M) A + B). apply() and the pipelined apply_stats share
// it, so their outputs are the same bits.
template <bool kSilu, bool kLow>
inline __m512 output_of(__m512 x, __m512 mean, __m512 a, __m512 b) {
  const __m512 z = _mm512_fmadd_ps(_mm512_sub_ps(x, mean), a, b);
  return kSilu ? silu<kLow>(z) : z;
}

// Forward statistics: sum and sum of squares of x - shift, shift = x[n, c, 0].
template <typename L>
void stats(const GroupNormForwardParams& p, const Tiling& t, int64_t begin, int64_t end, float* partial) {
  std::vector<float> totals(p.channels_last ? 2 * p.channels : 0);
  for (int64_t item = begin; item < end; ++item) {
    const Item it = locate(p, t, item);
    if (!p.channels_last) {
      const void* row = at<L>(p.x, (it.n * p.channels + it.c) * p.spatial);
      const __m512 shift = L::load(row, 1);
      const __m512 sh = _mm512_permutexvar_ps(_mm512_setzero_si512(), shift);
      row_sums<L>(at<L>(row, it.s0), nullptr, it.s1 - it.s0, [&](__m512 v, __m512, __mmask16 m, int64_t, __m512& a, __m512& b) {
        add_shifted(v, sh, m, a, b);
      }, partial_at(partial, t, p.channels, it.n, it.c, it.k));
    } else {
      const int64_t first = it.n * p.spatial * p.channels;  // row s = 0 of sample n: the shifts
      tile_sums<L>(p, t, it, p.x, nullptr, [&](__m512 v, __m512, __mmask16 m, int64_t c, int64_t, __m512& a, __m512& b) {
        add_shifted(v, L::load(at<L>(p.x, first + c), m), m, a, b);
      }, partial, totals.data());
    }
  }
}

// NHWC pointwise passes: rows [r0, r1) of V 16-channel vectors at channel c0, with the K
// tables each vector needs loaded into registers once for those rows: fn(offset of x[n, s, c],
// mask, tables) per row and vector. The passes go row by row (kPointRows = 1, memory order):
// blocks of 8 rows (tables loaded once per 8 rows) measured no faster on the shared 2-core EPYC.
template <int V, int K, typename Fn>
inline void nhwc_block(const Item& it, int64_t r0, int64_t r1, int64_t channels, int64_t spatial, int64_t c0,
                       const float* const* tabs, Fn& fn) {
  __mmask16 m[V];
  __m512 tv[V][K];
  for (int v = 0; v < V; ++v) {
    m[v] = tail_mask(channels - c0 - 16 * v);
    for (int k = 0; k < K; ++k) tv[v][k] = F32::load(tabs[k] + c0 + 16 * v, m[v]);
  }
  for (int64_t s = r0; s < r1; ++s) {
    const int64_t row = (it.n * spatial + s) * channels + c0;
    for (int v = 0; v < V; ++v) fn(row + 16 * v, m[v], tv[v]);
  }
}

template <int V, int K, typename P, typename Fn>
inline void for_each_nhwc_block(const P& p, const Item& it, const float* const* tabs, Fn fn) {
  for (int64_t r0 = it.s0; r0 < it.s1; r0 += kPointRows) {
    const int64_t r1 = std::min(it.s1, r0 + kPointRows);
    for (int64_t c0 = 0; c0 < p.channels; c0 += 16 * V) {
      with_vectors<V>((p.channels - c0 + 15) / 16,
                      [&]<int W>() { nhwc_block<W, K>(it, r0, r1, p.channels, p.spatial, c0, tabs, fn); });
    }
  }
}

// y = act((x - M) A + B).
template <typename L, bool kSilu>
void apply(const GroupNormForwardParams& p, const Tiling& t, int64_t begin, int64_t end, const float* tab) {
  constexpr bool kLow = L::kBytes == 2;
  const int64_t nc = p.batch * p.channels;
  const void* const x = p.x;  // (locals: the stores to y cannot change them, so they stay in registers)
  void* const y = p.y;
  for (int64_t item = begin; item < end; ++item) {
    const Item it = locate(p, t, item);
    if (!p.channels_last) {
      const int64_t j = it.n * p.channels + it.c;
      const __m512 mean = splat(tab[kM * nc + j]), a = splat(tab[kA * nc + j]), b = splat(tab[kB * nc + j]);
      const int64_t base = j * p.spatial;
      for (int64_t s = it.s0; s < it.s1; s += 16) {
        const __mmask16 m = tail_mask(it.s1 - s);
        L::store(at<L>(y, base + s), output_of<kSilu, kLow>(L::load(at<L>(x, base + s), m), mean, a, b), m);
      }
    } else {
      const float* tabs[3] = {tab + kM * nc + it.n * p.channels, tab + kA * nc + it.n * p.channels,
                              tab + kB * nc + it.n * p.channels};
      for_each_nhwc_block<4, 3>(p, it, tabs, [&](int64_t i, __mmask16 m, const __m512 (&tv)[3]) {
        L::store(at<L>(y, i), output_of<kSilu, kLow>(L::load(at<L>(x, i), m), tv[0], tv[1], tv[2]), m);
      });
    }
  }
}

// The apply of items [apply_begin, apply_begin + count) fused with the statistics of items
// [stats_begin, stats_begin + count), item j with item j (NCHW: stretches of equal length; NHWC:
// tiles of the same rows of two samples): the statistics' loads (from memory) run while the
// apply's arithmetic (in cache) does, instead of one after the other. The statistics' step calls
// the apply of the value at the same place in the other item, so each item's sums and outputs
// are those of stats() and apply().
template <typename L, bool kSilu>
void apply_stats(const GroupNormForwardParams& p, const Tiling& t, int64_t apply_begin, int64_t stats_begin,
                 int64_t count, const float* tab, float* partial) {
  constexpr bool kLow = L::kBytes == 2;
  const int64_t nc = p.batch * p.channels;
  const void* const x = p.x;
  void* const y = p.y;
  std::vector<float> totals(p.channels_last ? 2 * p.channels : 0);
  for (int64_t j = 0; j < count; ++j) {
    const Item ia = locate(p, t, apply_begin + j), is = locate(p, t, stats_begin + j);
    if (p.channels_last) {
      const int64_t first = is.n * p.spatial * p.channels;  // row s = 0 of the summed sample: the shifts
      const int64_t to_applied = (ia.n - is.n) * p.spatial * p.channels;
      const float* tm = tab + kM * nc + ia.n * p.channels;
      const float* tA = tab + kA * nc + ia.n * p.channels;
      const float* tB = tab + kB * nc + ia.n * p.channels;
      tile_sums<L>(p, t, is, x, nullptr, [&](__m512 v, __m512, __mmask16 m, int64_t c, int64_t offset, __m512& sa, __m512& sb) {
        add_shifted(v, L::load(at<L>(x, first + c), m), m, sa, sb);
        const int64_t i = offset + to_applied;
        L::store(at<L>(y, i), output_of<kSilu, kLow>(L::load(at<L>(x, i), m), F32::load(tm + c, m),
                                                     F32::load(tA + c, m), F32::load(tB + c, m)),
                 m);
      }, partial, totals.data(), to_applied);
      continue;
    }
    const int64_t ja = ia.n * p.channels + ia.c;
    const __m512 mean = splat(tab[kM * nc + ja]), a = splat(tab[kA * nc + ja]), b = splat(tab[kB * nc + ja]);
    const int64_t apply_at = ja * p.spatial + ia.s0;
    const void* row = at<L>(x, (is.n * p.channels + is.c) * p.spatial);
    const __m512 sh = _mm512_permutexvar_ps(_mm512_setzero_si512(), L::load(row, 1));
    row_sums<L>(at<L>(row, is.s0), nullptr, is.s1 - is.s0, [&](__m512 v, __m512, __mmask16 m, int64_t i, __m512& sa, __m512& sb) {
      add_shifted(v, sh, m, sa, sb);
      L::store(at<L>(y, apply_at + i), output_of<kSilu, kLow>(L::load(at<L>(x, apply_at + i), m), mean, a, b), m);
    }, partial_at(partial, t, p.channels, is.n, is.c, is.k));
  }
}

// dz from dy (times silu'(z), z recomputed from the centered x).
template <bool kSilu, bool kLow>
inline __m512 dz_of(__m512 dy, __m512 centered, __m512 a, __m512 b) {
  return kSilu ? _mm512_mul_ps(dy, silu_grad<kLow>(_mm512_fmadd_ps(centered, a, b))) : dy;
}

// Backward sums: sum dz and sum dz (x - M); with kKeep (SiLU only), dz also stored in keep.
template <typename L, bool kSilu, bool kKeep>
void grad_stats(const GroupNormBackwardParams& p, const Tiling& t, int64_t begin, int64_t end, const float* tab,
                float* partial, const DzStore& keep) {
  static_assert(kSilu || !kKeep);
  constexpr bool kLow = L::kBytes == 2;
  const int64_t nc = p.batch * p.channels;
  std::vector<float> totals(p.channels_last ? 2 * p.channels : 0);
  for (int64_t item = begin; item < end; ++item) {
    const Item it = locate(p, t, item);
    if (!p.channels_last) {
      const int64_t j = it.n * p.channels + it.c;
      const __m512 mean = splat(tab[kM * nc + j]), ta = splat(tab[kA * nc + j]), tb = splat(tab[kB * nc + j]);
      const int64_t base = j * p.spatial + it.s0;
      row_sums<L>(at<L>(p.x, base), at<L>(p.dy, base), it.s1 - it.s0,
                  [&](__m512 x, __m512 dy, __mmask16 m, int64_t i, __m512& a, __m512& b) {
                    const __m512 centered = _mm512_sub_ps(x, mean);
                    const __m512 dz = dz_of<kSilu, kLow>(dy, centered, ta, tb);  // 0 where masked (dy = 0)
                    if constexpr (kKeep) F32::store(keep.at + (base + i - keep.origin), dz, m);
                    a = _mm512_add_ps(a, dz);
                    b = _mm512_fmadd_ps(dz, centered, b);
                  },
                  partial_at(partial, t, p.channels, it.n, it.c, it.k));
    } else {
      const float* tm = tab + kM * nc + it.n * p.channels;
      const float* tA = tab + kA * nc + it.n * p.channels;
      const float* tB = tab + kB * nc + it.n * p.channels;
      tile_sums<L>(p, t, it, p.x, p.dy, [&](__m512 x, __m512 dy, __mmask16 m, int64_t c, int64_t offset, __m512& a, __m512& b) {
        const __m512 centered = _mm512_sub_ps(x, F32::load(tm + c, m));
        const __m512 dz = _mm512_maskz_mov_ps(
            m, dz_of<kSilu, kLow>(dy, centered, F32::load(tA + c, m), F32::load(tB + c, m)));
        if constexpr (kKeep) F32::store(keep.at + (offset - keep.origin), dz, m);
        a = _mm512_add_ps(a, dz);
        b = _mm512_fmadd_ps(dz, centered, b);
      }, partial, totals.data());
    }
  }
}

// dx = dz Ad + (x - M) Bd + Cd.
template <bool kSilu, bool kLow>
inline __m512 dx_from(__m512 x, __m512 dy, __m512 mean, __m512 a, __m512 b, __m512 ad, __m512 bd, __m512 cd) {
  const __m512 centered = _mm512_sub_ps(x, mean);
  return _mm512_fmadd_ps(dz_of<kSilu, kLow>(dy, centered, a, b), ad, _mm512_fmadd_ps(centered, bd, cd));
}

// With kKeep: dz read from keep (grad_stats left it there) instead of silu'(z) dy recomputed.
template <typename L, bool kSilu, bool kKeep>
void grad_apply(const GroupNormBackwardParams& p, const Tiling& t, int64_t begin, int64_t end, const float* tab,
                const DzStore& keep) {
  constexpr bool kLow = L::kBytes == 2;
  const int64_t nc = p.batch * p.channels;
  constexpr auto dx_of = dx_from<kSilu && !kKeep, kLow>;
  auto dy_or_dz = [&](int64_t i, __mmask16 m) {
    return kKeep ? F32::load(keep.at + (i - keep.origin), m) : L::load(at<L>(p.dy, i), m);
  };
  for (int64_t item = begin; item < end; ++item) {
    const Item it = locate(p, t, item);
    if (!p.channels_last) {
      const int64_t j = it.n * p.channels + it.c;
      const __m512 mean = splat(tab[kM * nc + j]), a = splat(tab[kA * nc + j]), b = splat(tab[kB * nc + j]);
      const __m512 ad = splat(tab[kAd * nc + j]), bd = splat(tab[kBd * nc + j]), cd = splat(tab[kCd * nc + j]);
      const int64_t base = j * p.spatial;
      for (int64_t s = it.s0; s < it.s1; s += 16) {
        const __mmask16 m = tail_mask(it.s1 - s);
        const __m512 dx = dx_of(L::load(at<L>(p.x, base + s), m), dy_or_dz(base + s, m), mean, a, b, ad, bd, cd);
        L::store(at<L>(p.dx, base + s), dx, m);
      }
    } else {
      const float* tabs[kTables];
      for (int k = 0; k < kTables; ++k) tabs[k] = tab + k * nc + it.n * p.channels;
      for_each_nhwc_block<2, kTables>(p, it, tabs, [&](int64_t i, __mmask16 m, const __m512 (&tv)[kTables]) {
        const __m512 dx = dx_of(L::load(at<L>(p.x, i), m), dy_or_dz(i, m), tv[kM], tv[kA], tv[kB],
                                tv[kAd], tv[kBd], tv[kCd]);
        L::store(at<L>(p.dx, i), dx, m);
      });
    }
  }
}

}  // namespace

template <Dtype D>
void group_norm_stats_avx512(const GroupNormForwardParams& p, const Tiling& t, int64_t begin, int64_t end, float* partial) {
  stats<Lanes<D, false>>(p, t, begin, end, partial);  // (loads only: no bf16 rounding)
}

// Calls fn.template operator()<L>() with the lanes of D (for bf16, with AVX512-BF16's
// rounding instruction where the CPU has it).
template <Dtype D, typename Fn>
void with_lanes(bool bf16_instructions, Fn&& fn) {
  if constexpr (D == Dtype::bf16) {
    if (bf16_instructions) return fn.template operator()<Lanes<D, true>>();
  }
  fn.template operator()<Lanes<D, false>>();
}

// Calls fn.template operator()<L, kSilu>() for the forward's run-time choices.
template <Dtype D, typename Fn>
void forward_variant(const GroupNormForwardParams& p, bool bf16_instructions, Fn&& fn) {
  with_lanes<D>(bf16_instructions, [&]<typename L>() {
    return p.silu ? fn.template operator()<L, true>() : fn.template operator()<L, false>();
  });
}

template <Dtype D>
void group_norm_apply_avx512(
    const GroupNormForwardParams& p, const Tiling& t, int64_t begin, int64_t end, const float* tables,
    bool bf16_instructions) {
  forward_variant<D>(p, bf16_instructions, [&]<typename L, bool kSilu>() { apply<L, kSilu>(p, t, begin, end, tables); });
}

template <Dtype D>
void group_norm_apply_stats_avx512(
    const GroupNormForwardParams& p, const Tiling& t, int64_t apply_begin, int64_t stats_begin, int64_t count,
    const float* tables, float* partial, bool bf16_instructions) {
  forward_variant<D>(p, bf16_instructions, [&]<typename L, bool kSilu>() {
    apply_stats<L, kSilu>(p, t, apply_begin, stats_begin, count, tables, partial);
  });
}

// Calls fn.template operator()<L, kSilu, kKeep>() for the backward's run-time choices.
template <Dtype D, typename Fn>
void backward_variant(const GroupNormBackwardParams& p, const DzStore& keep, bool bf16_instructions, Fn&& fn) {
  with_lanes<D>(bf16_instructions, [&]<typename L>() {
    if (!p.silu) return fn.template operator()<L, false, false>();
    return keep.at ? fn.template operator()<L, true, true>() : fn.template operator()<L, true, false>();
  });
}

template <Dtype D>
void group_norm_grad_stats_avx512(
    const GroupNormBackwardParams& p, const Tiling& t, int64_t begin, int64_t end, const float* tables, float* partial,
    const DzStore& keep) {
  // (loads only: no bf16 rounding, so one build of the pass)
  backward_variant<D>(p, keep, false, [&]<typename L, bool kSilu, bool kKeep>() {
    grad_stats<L, kSilu, kKeep>(p, t, begin, end, tables, partial, keep);
  });
}

template <Dtype D>
void group_norm_grad_apply_avx512(
    const GroupNormBackwardParams& p, const Tiling& t, int64_t begin, int64_t end, const float* tables,
    const DzStore& keep, bool bf16_instructions) {
  backward_variant<D>(p, keep, bf16_instructions, [&]<typename L, bool kSilu, bool kKeep>() {
    grad_apply<L, kSilu, kKeep>(p, t, begin, end, tables, keep);
  });
}

#define FASTARCH_GN_AVX512(D)                                                                                          \
  template void group_norm_stats_avx512<D>(const GroupNormForwardParams&, const Tiling&, int64_t, int64_t, float*);    \
  template void group_norm_apply_avx512<D>(const GroupNormForwardParams&, const Tiling&, int64_t, int64_t,             \
                                           const float*, bool);                                                        \
  template void group_norm_apply_stats_avx512<D>(const GroupNormForwardParams&, const Tiling&, int64_t, int64_t,       \
                                                 int64_t, const float*, float*, bool);                                 \
  template void group_norm_grad_stats_avx512<D>(const GroupNormBackwardParams&, const Tiling&, int64_t, int64_t,       \
                                                const float*, float*, const DzStore&);                                 \
  template void group_norm_grad_apply_avx512<D>(const GroupNormBackwardParams&, const Tiling&, int64_t, int64_t,       \
                                                const float*, const DzStore&, bool);

FASTARCH_GN_AVX512(Dtype::f32)
FASTARCH_GN_AVX512(Dtype::f16)
FASTARCH_GN_AVX512(Dtype::bf16)
#undef FASTARCH_GN_AVX512

}  // namespace fastarch::cpu::gn

#pragma GCC pop_options
