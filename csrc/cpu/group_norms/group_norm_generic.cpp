// Portable build of the CPU group norm passes (for CPUs without AVX-512, and fp64), and the
// combine steps every build shares (per group, scalar fp64: a few values per channel).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/portable.h"
#include "cpu/portable_math.h"
#include "group_norm_rows.h"

FASTARCH_PORTABLE_BEGIN

namespace fastarch::cpu::gn {

#ifndef FASTARCH_PORTABLE_AVX2  // (make_tiling and the combine and table steps: in the baseline build only)
Tiling make_tiling(int64_t batch, int64_t channels, int64_t spatial, bool channels_last) {
  // ~16K elements per item: enough work that the items' bookkeeping is negligible, small enough
  // that one sample of a diffusion UNet (e.g. 256 channels x 32 x 32) makes 16+ items for the
  // cores to share. Fixed by the shape, never by the thread count (determinism).
  constexpr int64_t kItemElements = 16384;
  Tiling t{};
  // NHWC items hold at most 1024 rows, so that each channel's running sums (blocks of 16 rows)
  // take at most 64 block totals.
  t.chunk = channels_last ? std::clamp<int64_t>(kItemElements / std::max<int64_t>(channels, 1), 1, 1024) : kItemElements;
  t.chunk = std::min(t.chunk, std::max<int64_t>(spatial, 1));
  t.chunks = (spatial + t.chunk - 1) / t.chunk;
  t.items = channels_last ? batch * t.chunks : batch * channels * t.chunks;
  t.elements_per_item = channels_last ? t.chunk * channels : t.chunk;
  return t;
}
#endif

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

// Where item `item` lies. NCHW: channel c's positions [s0, s1) of sample n; NHWC: positions
// [s0, s1) of sample n, all channels (c = -1).
struct Item {
  int64_t n, c, k, s0, s1;
};
template <typename P>
Item locate(const P& p, const Tiling& t, int64_t item) {
  Item it{};
  if (p.channels_last) {
    it.n = item / t.chunks;
    it.c = -1;
    it.k = item % t.chunks;
  } else {
    it.n = item / (p.channels * t.chunks);
    it.c = (item / t.chunks) % p.channels;
    it.k = item % t.chunks;
  }
  it.s0 = it.k * t.chunk;
  it.s1 = std::min(p.spatial, it.s0 + t.chunk);
  return it;
}

// x[n, c, s] in either layout.
inline int64_t offset(int64_t n, int64_t c, int64_t s, int64_t channels, int64_t spatial, bool channels_last) {
  return channels_last ? (n * spatial + s) * channels + c : (n * channels + c) * spatial + s;
}

// exp in the accumulation type: fp32's is portable_math.h's exp_f32 (loops of it vectorize).
template <typename Acc>
Acc exp_acc(Acc x) {
  if constexpr (std::is_same_v<Acc, float>) {
    return portable::exp_f32(x);
  } else {
    return std::exp(x);
  }
}

template <typename Acc>
Acc silu(Acc z) {
  return z / (Acc(1) + exp_acc(-z));
}

// d silu(z) / dz = s (1 + z (1 - s)), 1 - s without cancellation (e s where e = exp(-z) < 1);
// both arms computed, the choice a select of bits for fp32 (a select whose arm computes keeps
// GCC from vectorizing the loop).
template <typename Acc>
Acc silu_grad(Acc z) {
  const Acc e = exp_acc(-z);
  const Acc s = Acc(1) / (Acc(1) + e);
  Acc one_minus_s;
  if constexpr (std::is_same_v<Acc, float>) {
    one_minus_s = portable::keep_if(e < 1.0f, e * s) + portable::keep_if(!(e < 1.0f), 1.0f - s);
  } else {
    one_minus_s = e < Acc(1) ? e * s : Acc(1) - s;
  }
  return s * (Acc(1) + z * one_minus_s);
}

template <typename T>
double value_or(const void* t, int64_t i, double absent) {
  return t ? static_cast<double>(static_cast<const T*>(t)[i]) : absent;
}

// Calls fn(offset of x[n, c, s], channel c) for every element of the item, channel-major for
// NCHW, position-major for NHWC (both in memory order).
template <typename P, typename Fn>
void for_each_element(const P& p, const Item& it, Fn fn) {
  if (!p.channels_last) {
    const int64_t base = (it.n * p.channels + it.c) * p.spatial;
    for (int64_t s = it.s0; s < it.s1; ++s) fn(base + s, it.c);
  } else {
    for (int64_t s = it.s0; s < it.s1; ++s) {
      const int64_t base = (it.n * p.spatial + s) * p.channels;
      for (int64_t c = 0; c < p.channels; ++c) fn(base + c, c);
    }
  }
}

// The item's two sums per channel, term(offset, c, a, b) adding to a and b, into
// partial[((n C + c) chunks + k) 2 + {0, 1}]. Summed in fp64, in blocks (8 interleaved partials
// over 64 positions for NCHW, 16 rows for NHWC) whose totals are then added: the items of fp64
// tensors (16-bit and fp32 ones take nchw_vec_sums and nhwc_sums, in fp32 lanes).
template <typename Acc, typename P, typename Term>
void item_sums(const P& p, const Tiling& t, const Item& it, Term term, std::vector<double>& inner, Acc* partial) {
  if (!p.channels_last) {
    constexpr int kLanes = 8;
    const int64_t base = (it.n * p.channels + it.c) * p.spatial;
    double total_a = 0, total_b = 0;
    for (int64_t b0 = it.s0; b0 < it.s1; b0 += 8 * kLanes) {
      double a[kLanes] = {}, b[kLanes] = {};
      const int64_t b1 = std::min(it.s1, b0 + 8 * kLanes);
      int64_t s = b0;  // position s adds into lane (s - b0) % kLanes (whole groups in a loop that vectorizes)
      for (; s + kLanes <= b1; s += kLanes)
        for (int k = 0; k < kLanes; ++k) term(base + s + k, it.c, a[k], b[k]);
      for (; s < b1; ++s) term(base + s, it.c, a[(s - b0) % kLanes], b[(s - b0) % kLanes]);
      for (int k = 0; k < kLanes; ++k) {
        total_a += a[k];
        total_b += b[k];
      }
    }
    Acc* out = partial + ((it.n * p.channels + it.c) * t.chunks + it.k) * 2;
    out[0] = static_cast<Acc>(total_a);
    out[1] = static_cast<Acc>(total_b);
    return;
  }
  constexpr int64_t kRows = 16;
  std::vector<double> total(2 * p.channels, 0.0);
  for (int64_t r0 = it.s0; r0 < it.s1; r0 += kRows) {
    std::fill(inner.begin(), inner.end(), 0.0);
    for (int64_t s = r0; s < std::min(it.s1, r0 + kRows); ++s) {
      const int64_t base = (it.n * p.spatial + s) * p.channels;
      for (int64_t c = 0; c < p.channels; ++c) term(base + c, c, inner[2 * c], inner[2 * c + 1]);
    }
    for (int64_t j = 0; j < 2 * p.channels; ++j) total[j] += inner[j];
  }
  for (int64_t c = 0; c < p.channels; ++c) {
    Acc* out = partial + ((it.n * p.channels + c) * t.chunks + it.k) * 2;
    out[0] = static_cast<Acc>(total[2 * c]);
    out[1] = static_cast<Acc>(total[2 * c + 1]);
  }
}

// The two sums of an NCHW item of a 16-bit or fp32 tensor, as item_sums orders them (blocks of
// 64 positions, lane k of a block taking the positions s with (s - block start) % 8 == k,
// block totals in fp64), in fp32 vector lanes: vec_term(s, a, b) adds positions [s, s + 8)
// into the kV vectors a and b (lane k: position s + k), value_term(s, a, b) one position into
// floats. (item_sums' per-value terms in fp64 ran at half PyTorch's speed in the AVX2 build:
// the compiler built their vectors element by element from scalar loads.)
constexpr int kNchwLanes = 8;
constexpr int kNchwVecs = kNchwLanes / portable::kVecLanes;

template <typename P, typename VecTerm, typename ValueTerm>
void nchw_vec_sums(const P& p, const Tiling& t, const Item& it, VecTerm vec_term, ValueTerm value_term, float* partial) {
  using portable::Vec;
  double total_a = 0, total_b = 0;
  for (int64_t b0 = it.s0; b0 < it.s1; b0 += 8 * kNchwLanes) {
    Vec a[kNchwVecs] = {}, b[kNchwVecs] = {};
    const int64_t b1 = std::min(it.s1, b0 + 8 * kNchwLanes);
    int64_t s = b0;
    for (; s + kNchwLanes <= b1; s += kNchwLanes) vec_term(s, a, b);
    float la[kNchwLanes], lb[kNchwLanes];
    std::memcpy(la, a, sizeof la);
    std::memcpy(lb, b, sizeof lb);
    for (; s < b1; ++s) value_term(s, la[(s - b0) % kNchwLanes], lb[(s - b0) % kNchwLanes]);
    for (int k = 0; k < kNchwLanes; ++k) {
      total_a += la[k];
      total_b += lb[k];
    }
  }
  float* out = partial + ((it.n * p.channels + it.c) * t.chunks + it.k) * 2;
  out[0] = static_cast<float>(total_a);
  out[1] = static_cast<float>(total_b);
}

// The forward's sums of d = x - x[n, c, 0] and d^2 over an NCHW item (16-bit or fp32).
template <typename T, typename P>
void nchw_shifted_sums(const P& p, const Tiling& t, const Item& it, const T* x, float* partial) {
  using portable::kVecLanes;
  using portable::Vec;
  const T* xc = x + (it.n * p.channels + it.c) * p.spatial;
  const float shift = static_cast<float>(xc[0]);
  const Vec vshift = portable::splat(shift);
  nchw_vec_sums(p, t, it, [&](int64_t s, Vec* a, Vec* b) {
    for (int v = 0; v < kNchwVecs; ++v) {
      const Vec d = portable::load_f32(xc + s + v * kVecLanes) - vshift;
      a[v] += d;
      b[v] += d * d;
    }
  }, [&](int64_t s, float& a, float& b) {
    const float d = static_cast<float>(xc[s]) - shift;
    a += d;
    b += d * d;
  }, partial);
}

// The two sums per channel of an NHWC item (16-bit or fp32), as the AVX-512 build sums them
// (a lane per channel): over blocks of kNhwcRows rows in registers, each block's sums then added
// to the item's fp32 totals (items hold at most 1024 rows: no running sum takes more than 128
// terms), kNhwcVecs channel vectors at a time (their sums are independent chains).
// vec_term(offset of x[n, s, c], c, a, b) adds the vector of channels from c at row s to a and
// b; value_term(offset, c, a, b) one channel's value (the channels past the last whole vector).
// totals: 2 C floats of scratch. (item_sums' per-value terms in fp64 made the AVX2 build's bf16
// forward 0.85x PyTorch's, and its fp16 passes a fifth of it, converting value by value.)
constexpr int64_t kNhwcRows = 8;
constexpr int kNhwcVecs = 4;

template <typename P, typename VecTerm, typename ValueTerm>
void nhwc_sums(const P& p, const Tiling& t, const Item& it, VecTerm vec_term, ValueTerm value_term, float* totals,
               float* partial) {
  using portable::kVecLanes;
  using portable::Vec;
  const int64_t C = p.channels;
  std::fill(totals, totals + 2 * C, 0.0f);
  // V vectors of channels from c over rows [r0, r1), added to the totals
  const auto block = [&]<int V>(int64_t r0, int64_t r1, int64_t c) {
    Vec a[V] = {}, b[V] = {};
    for (int64_t s = r0; s < r1; ++s) {
      const int64_t row = (it.n * p.spatial + s) * C;
      for (int v = 0; v < V; ++v) vec_term(row + c + v * kVecLanes, c + v * kVecLanes, a[v], b[v]);
    }
    for (int v = 0; v < V; ++v) {
      float* ta = totals + c + v * kVecLanes;
      portable::store_vec(ta, portable::load_vec(ta) + a[v]);
      portable::store_vec(ta + C, portable::load_vec(ta + C) + b[v]);
    }
  };
  const int64_t whole = C / kVecLanes * kVecLanes;
  for (int64_t r0 = it.s0; r0 < it.s1; r0 += kNhwcRows) {
    const int64_t r1 = std::min(it.s1, r0 + kNhwcRows);
    int64_t c = 0;
    for (; c + kNhwcVecs * kVecLanes <= whole; c += kNhwcVecs * kVecLanes)
      block.template operator()<kNhwcVecs>(r0, r1, c);
    for (; c < whole; c += kVecLanes) block.template operator()<1>(r0, r1, c);
    for (; c < C; ++c) {
      float a = 0, b = 0;
      for (int64_t s = r0; s < r1; ++s) value_term((it.n * p.spatial + s) * C + c, c, a, b);
      totals[c] += a;
      totals[C + c] += b;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    float* out = partial + ((it.n * C + c) * t.chunks + it.k) * 2;
    out[0] = totals[c];
    out[1] = totals[C + c];
  }
}

// The forward's sums of d = x - x[n, 0, c] and d^2 over an NHWC item (16-bit or fp32).
template <typename T, typename P>
void nhwc_shifted_sums(const P& p, const Tiling& t, const Item& it, const T* x, float* totals, float* partial) {
  using portable::Vec;
  const T* shifts = x + it.n * p.spatial * p.channels;  // row 0 of sample n
  nhwc_sums(p, t, it, [&](int64_t i, int64_t c, Vec& a, Vec& b) {
    const Vec d = portable::load_f32(x + i) - portable::load_f32(shifts + c);
    a += d;
    b = portable::madd(d, d, b);
  }, [&](int64_t i, int64_t c, float& a, float& b) {
    const float d = static_cast<float>(x[i]) - static_cast<float>(shifts[c]);
    a += d;
    b = portable::madd_f32(d, d, b);
  }, totals, partial);
}

// f over the lanes of z as floats (a loop the compiler vectorizes, exp included).
template <typename F>
inline portable::Vec map_lanes(portable::Vec z, F f) {
  float lanes[portable::kVecLanes];
  portable::store_vec(lanes, z);
  for (int k = 0; k < portable::kVecLanes; ++k) lanes[k] = f(lanes[k]);
  return portable::load_vec(lanes);
}

// The forward's output act((x - M) A + B), of a vector and of one value; the multiply-add fused
// in the AVX2 build, as in the AVX-512 one.
template <bool kSilu>
inline portable::Vec output_vec(portable::Vec x, portable::Vec m, portable::Vec a, portable::Vec b) {
  const portable::Vec z = portable::madd(x - m, a, b);
  return kSilu ? map_lanes(z, [](float v) { return silu(v); }) : z;
}
template <bool kSilu>
inline float output_value(float x, float m, float a, float b) {
  const float z = portable::madd_f32(x - m, a, b);
  return kSilu ? silu(z) : z;
}

// The forward's output over an item (16-bit or fp32) of either layout, a vector at a time: along
// the positions of its channel (NCHW), or along the channels of each row (NHWC), the tables'
// values loaded with them.
template <bool kSilu, typename T, typename P>
void apply_item(const P& p, const Item& it, const T* x, T* y, const float* tab) {
  using portable::kVecLanes;
  using portable::Vec;
  const int64_t C = p.channels, nc = p.batch * C;
  if (!p.channels_last) {
    const int64_t j = it.n * C + it.c, base = j * p.spatial;
    const float m = tab[kM * nc + j], a = tab[kA * nc + j], b = tab[kB * nc + j];
    const Vec vm = portable::splat(m), va = portable::splat(a), vb = portable::splat(b);
    int64_t s = it.s0;
    for (; s + kVecLanes <= it.s1; s += kVecLanes)
      portable::store_f32(y + base + s, output_vec<kSilu>(portable::load_f32(x + base + s), vm, va, vb));
    for (; s < it.s1; ++s) y[base + s] = static_cast<T>(output_value<kSilu>(static_cast<float>(x[base + s]), m, a, b));
    return;
  }
  const float* tm = tab + kM * nc + it.n * C;
  const float* ta = tab + kA * nc + it.n * C;
  const float* tb = tab + kB * nc + it.n * C;
  const int64_t whole = C / kVecLanes * kVecLanes;
  for (int64_t s = it.s0; s < it.s1; ++s) {
    const int64_t row = (it.n * p.spatial + s) * C;
    for (int64_t c = 0; c < whole; c += kVecLanes) {
      portable::store_f32(y + row + c, output_vec<kSilu>(portable::load_f32(x + row + c), portable::load_vec(tm + c),
                                                         portable::load_vec(ta + c), portable::load_vec(tb + c)));
    }
    for (int64_t c = whole; c < C; ++c)
      y[row + c] = static_cast<T>(output_value<kSilu>(static_cast<float>(x[row + c]), tm[c], ta[c], tb[c]));
  }
}

// The backward's dz and centered = x - M of a vector: dz = dy, times silu'(centered A + B) with
// SiLU (the same operations as nchw_grad_sums, so the same bits as the dz it keeps).
template <bool kSilu>
inline portable::Vec dz_vec(portable::Vec x, portable::Vec dy, portable::Vec m, portable::Vec a, portable::Vec b,
                            portable::Vec& centered) {
  centered = x - m;
  return kSilu ? dy * map_lanes(centered * a + b, [](float v) { return silu_grad(v); }) : dy;
}

// The NHWC backward sums of dz and dz (x - mean) per channel (16-bit or fp32); dz kept where
// keep is given (SiLU).
template <bool kSilu, typename T, typename P>
void nhwc_grad_sums(const P& p, const Tiling& t, const Item& it, const T* x, const T* dy, const float* tab,
                    float* totals, float* partial, const DzStore& keep) {
  using portable::Vec;
  const int64_t nc = p.batch * p.channels, j0 = it.n * p.channels;
  const float *tm = tab + kM * nc + j0, *ta = tab + kA * nc + j0, *tb = tab + kB * nc + j0;
  float* kept = kSilu && keep.at ? keep.at - keep.origin : nullptr;
  nhwc_sums(p, t, it, [&](int64_t i, int64_t c, Vec& a, Vec& b) {
    Vec centered;
    const Vec dz = dz_vec<kSilu>(portable::load_f32(x + i), portable::load_f32(dy + i), portable::load_vec(tm + c),
                                 portable::load_vec(ta + c), portable::load_vec(tb + c), centered);
    if (kept) portable::store_vec(kept + i, dz);
    a += dz;
    b = portable::madd(dz, centered, b);
  }, [&](int64_t i, int64_t c, float& a, float& b) {
    const float centered = static_cast<float>(x[i]) - tm[c];
    float dz = static_cast<float>(dy[i]);
    if constexpr (kSilu) dz *= silu_grad(centered * ta[c] + tb[c]);
    if (kept) kept[i] = dz;
    a += dz;
    b = portable::madd_f32(dz, centered, b);
  }, totals, partial);
}

// The backward's dx = dz Ad + centered Bd + Cd over an item (16-bit or fp32) of either layout, a
// vector at a time (as apply_item); dz as the statistics pass kept it (kKept) or recomputed.
template <bool kSilu, bool kKept, typename T, typename P>
void grad_apply_item(const P& p, const Item& it, const T* x, const T* dy, T* dx, const float* tab,
                     const DzStore& keep) {
  using portable::kVecLanes;
  using portable::Vec;
  const int64_t C = p.channels, nc = p.batch * C;
  const float* kept = kKept ? keep.at - keep.origin : nullptr;
  // positions [i, i + kVecLanes) with the tables' values v[k] (kM .. kCd) of their channels
  const auto vec = [&](int64_t i, const Vec (&v)[kTables]) {
    Vec centered;
    Vec dz = dz_vec<kSilu && !kKept>(portable::load_f32(x + i), portable::load_f32(dy + i), v[kM], v[kA], v[kB],
                                     centered);
    if constexpr (kKept) dz = portable::load_vec(kept + i);
    portable::store_f32(dx + i, portable::madd(dz, v[kAd], portable::madd(centered, v[kBd], v[kCd])));
  };
  const auto value = [&](int64_t i, int64_t j) {
    const float centered = static_cast<float>(x[i]) - tab[kM * nc + j];
    float dz = static_cast<float>(dy[i]);
    if constexpr (kKept) {
      dz = kept[i];
    } else if constexpr (kSilu) {
      dz *= silu_grad(centered * tab[kA * nc + j] + tab[kB * nc + j]);
    }
    dx[i] = static_cast<T>(portable::madd_f32(dz, tab[kAd * nc + j],
                                              portable::madd_f32(centered, tab[kBd * nc + j], tab[kCd * nc + j])));
  };
  Vec v[kTables];
  if (!p.channels_last) {
    const int64_t j = it.n * C + it.c, base = j * p.spatial;
    for (int k = 0; k < kTables; ++k) v[k] = portable::splat(tab[k * nc + j]);
    int64_t s = it.s0;
    for (; s + kVecLanes <= it.s1; s += kVecLanes) vec(base + s, v);
    for (; s < it.s1; ++s) value(base + s, j);
    return;
  }
  const int64_t whole = C / kVecLanes * kVecLanes;
  for (int64_t s = it.s0; s < it.s1; ++s) {
    const int64_t row = (it.n * p.spatial + s) * C;
    for (int64_t c = 0; c < whole; c += kVecLanes) {
      for (int k = 0; k < kTables; ++k) v[k] = portable::load_vec(tab + k * nc + it.n * C + c);
      vec(row + c, v);
    }
    for (int64_t c = whole; c < C; ++c) value(row + c, it.n * C + c);
  }
}

// The backward's sums of dz and dz (x - mean) over an NCHW item (16-bit or fp32), dz = dy, or
// dy silu'(z) with SiLU: x and dy widened a vector at a time, silu' over eight lanes of floats
// (a loop the compiler vectorizes, exp included); dz also stored in keep where given (SiLU).
template <bool kSilu, typename T, typename P>
void nchw_grad_sums(const P& p, const Tiling& t, const Item& it, const T* x, const T* dy, const float* tab,
                    float* partial, const DzStore& keep) {
  using portable::kVecLanes;
  using portable::Vec;
  const int64_t nc = p.batch * p.channels, j = it.n * p.channels + it.c;
  const T* xc = x + j * p.spatial;
  const T* dyc = dy + j * p.spatial;
  float* kept = kSilu && keep.at ? keep.at + (j * p.spatial - keep.origin) : nullptr;
  const float m = tab[kM * nc + j], ka = tab[kA * nc + j], kb = tab[kB * nc + j];
  const Vec vm = portable::splat(m), va = portable::splat(ka), vb = portable::splat(kb);
  nchw_vec_sums(p, t, it, [&](int64_t s, Vec* a, Vec* b) {
    Vec centered[kNchwVecs], dz[kNchwVecs];
    for (int v = 0; v < kNchwVecs; ++v) {
      centered[v] = portable::load_f32(xc + s + v * kVecLanes) - vm;
      dz[v] = portable::load_f32(dyc + s + v * kVecLanes);
    }
    if constexpr (kSilu) {
      float z[kNchwLanes], g[kNchwLanes];
      for (int v = 0; v < kNchwVecs; ++v) portable::store_vec(z + v * kVecLanes, centered[v] * va + vb);
      for (int k = 0; k < kNchwLanes; ++k) g[k] = silu_grad(z[k]);
      for (int v = 0; v < kNchwVecs; ++v) dz[v] *= portable::load_vec(g + v * kVecLanes);
      if (kept) {
        for (int v = 0; v < kNchwVecs; ++v) portable::store_vec(kept + s + v * kVecLanes, dz[v]);
      }
    }
    for (int v = 0; v < kNchwVecs; ++v) {
      a[v] += dz[v];
      b[v] += dz[v] * centered[v];
    }
  }, [&](int64_t s, float& a, float& b) {
    const float centered = static_cast<float>(xc[s]) - m;
    float dz = static_cast<float>(dyc[s]);
    if constexpr (kSilu) {
      dz *= silu_grad(centered * ka + kb);
      if (kept) kept[s] = dz;
    }
    a += dz;
    b += dz * centered;
  }, partial);
}

// Calls pass(with_silu, kept), the backward case as compile-time flags (a loop per case: a
// condition in it keeps it scalar): kept, dz in keep (SiLU, fp32 sums, keep given).
template <typename Acc, typename Pass>
void backward_case(const GroupNormBackwardParams& p, const DzStore& keep, Pass pass) {
  if (!p.silu) return pass(std::false_type{}, std::false_type{});
  if constexpr (std::is_same_v<Acc, float>) {
    if (keep.at) return pass(std::true_type{}, std::true_type{});
  }
  pass(std::true_type{}, std::false_type{});
}

}  // namespace

template <Isa I, Dtype D>
void group_norm_stats_generic(const GroupNormForwardParams& p, const Tiling& t, int64_t begin, int64_t end, void* partial) {
  using T = typename Types<D>::T;
  using Acc = typename Types<D>::Acc;
  const T* x = static_cast<const T*>(p.x);
  std::vector<double> inner(2 * p.channels);
  std::vector<float> totals(p.channels_last ? 2 * p.channels : 0);
  for (int64_t item = begin; item < end; ++item) {
    const Item it = locate(p, t, item);
    if constexpr (std::is_same_v<Acc, float>) {
      p.channels_last ? nhwc_shifted_sums(p, t, it, x, totals.data(), static_cast<float*>(partial))
                      : nchw_shifted_sums(p, t, it, x, static_cast<float*>(partial));
      continue;
    }
    item_sums<Acc>(p, t, it, [&](int64_t i, int64_t c, double& a, double& b) {
      const double d = static_cast<double>(x[i]) - static_cast<double>(x[offset(it.n, c, 0, p.channels, p.spatial, p.channels_last)]);
      a += d;
      b += d * d;
    }, inner, static_cast<Acc*>(partial));
  }
}

template <Isa I, Dtype D>
void group_norm_apply_generic(const GroupNormForwardParams& p, const Tiling& t, int64_t begin, int64_t end, const void* tables) {
  using T = typename Types<D>::T;
  using Acc = typename Types<D>::Acc;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const Acc* tab = static_cast<const Acc*>(tables);
  const int64_t nc = p.batch * p.channels;
  for (int64_t item = begin; item < end; ++item) {
    const Item it = locate(p, t, item);
    if constexpr (std::is_same_v<Acc, float>) {
      p.silu ? apply_item<true>(p, it, x, y, tab) : apply_item<false>(p, it, x, y, tab);
      continue;
    }
    const auto apply = [&](auto with_silu) {  // (a loop per case: a condition in it keeps it scalar)
      for_each_element(p, it, [&](int64_t i, int64_t c) {
        const int64_t j = it.n * p.channels + c;
        const Acc z = (static_cast<Acc>(x[i]) - tab[kM * nc + j]) * tab[kA * nc + j] + tab[kB * nc + j];
        y[i] = static_cast<T>(with_silu ? silu(z) : z);
      });
    };
    p.silu ? apply(std::true_type{}) : apply(std::false_type{});
  }
}

template <Isa I, Dtype D>
void group_norm_grad_stats_generic(
    const GroupNormBackwardParams& p, const Tiling& t, int64_t begin, int64_t end, const void* tables, void* partial,
    const DzStore& keep) {
  using T = typename Types<D>::T;
  using Acc = typename Types<D>::Acc;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const Acc* tab = static_cast<const Acc*>(tables);
  const int64_t nc = p.batch * p.channels;
  std::vector<double> inner(2 * p.channels);
  std::vector<float> totals(p.channels_last ? 2 * p.channels : 0);
  for (int64_t item = begin; item < end; ++item) {
    const Item it = locate(p, t, item);
    if constexpr (std::is_same_v<Acc, float>) {
      float* out = static_cast<float*>(partial);
      if (!p.channels_last) {
        p.silu ? nchw_grad_sums<true>(p, t, it, x, dy, tab, out, keep)
               : nchw_grad_sums<false>(p, t, it, x, dy, tab, out, keep);
      } else {
        p.silu ? nhwc_grad_sums<true>(p, t, it, x, dy, tab, totals.data(), out, keep)
               : nhwc_grad_sums<false>(p, t, it, x, dy, tab, totals.data(), out, keep);
      }
      continue;
    }
    const auto sums = [&](auto with_silu, auto kept) {
      item_sums<Acc>(p, t, it, [&](int64_t i, int64_t c, double& a, double& b) {
        const int64_t j = it.n * p.channels + c;
        const Acc centered = static_cast<Acc>(x[i]) - tab[kM * nc + j];
        Acc dz = static_cast<Acc>(dy[i]);
        if (with_silu) dz *= silu_grad(centered * tab[kA * nc + j] + tab[kB * nc + j]);
        if constexpr (decltype(kept)::value) keep.at[i - keep.origin] = dz;
        a += dz;
        b += static_cast<double>(dz) * centered;
      }, inner, static_cast<Acc*>(partial));
    };
    backward_case<Acc>(p, keep, sums);
  }
}

template <Isa I, Dtype D>
void group_norm_grad_apply_generic(
    const GroupNormBackwardParams& p, const Tiling& t, int64_t begin, int64_t end, const void* tables,
    const DzStore& keep) {
  using T = typename Types<D>::T;
  using Acc = typename Types<D>::Acc;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  const Acc* tab = static_cast<const Acc*>(tables);
  const int64_t nc = p.batch * p.channels;
  for (int64_t item = begin; item < end; ++item) {
    const Item it = locate(p, t, item);
    if constexpr (std::is_same_v<Acc, float>) {
      backward_case<Acc>(p, keep, [&](auto with_silu, auto kept) {
        grad_apply_item<decltype(with_silu)::value, decltype(kept)::value>(p, it, x, dy, dx, tab, keep);
      });
      continue;
    }
    const auto apply = [&](auto with_silu, auto kept) {
      for_each_element(p, it, [&](int64_t i, int64_t c) {
        const int64_t j = it.n * p.channels + c;
        const Acc centered = static_cast<Acc>(x[i]) - tab[kM * nc + j];
        Acc dz = static_cast<Acc>(dy[i]);
        if constexpr (decltype(kept)::value) {
          dz = keep.at[i - keep.origin];  // as grad_stats left it
        } else if (with_silu) {
          dz *= silu_grad(centered * tab[kA * nc + j] + tab[kB * nc + j]);
        }
        dx[i] = static_cast<T>(dz * tab[kAd * nc + j] + centered * tab[kBd * nc + j] + tab[kCd * nc + j]);
      });
    };
    backward_case<Acc>(p, keep, apply);
  }
}

#ifndef FASTARCH_PORTABLE_AVX2
namespace {

// The forward tables of group (n, g) from its mean and rstd.
template <Dtype D, typename P>
void fill_tables(const P& p, int64_t n, int64_t g, double mean, double rstd, void* tables) {
  using T = typename Types<D>::T;
  using Acc = typename Types<D>::Acc;
  Acc* tab = static_cast<Acc*>(tables);
  const int64_t nc = p.batch * p.channels, cg = p.channels / p.groups;
  for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
    const int64_t j = n * p.channels + c;
    const double one_plus_scale = 1 + value_or<T>(p.scale, j, 0);
    tab[kM * nc + j] = static_cast<Acc>(mean);
    tab[kA * nc + j] = static_cast<Acc>(rstd * value_or<T>(p.weight, c, 1) * one_plus_scale);
    tab[kB * nc + j] = static_cast<Acc>(value_or<T>(p.bias, c, 0) * one_plus_scale + value_or<T>(p.shift, j, 0));
  }
}

}  // namespace

template <Dtype D>
void group_norm_combine(const GroupNormForwardParams& p, const Tiling& t, int64_t begin, int64_t end, const void* partial, void* tables) {
  using T = typename Types<D>::T;
  using Acc = typename Types<D>::Acc;
  const T* x = static_cast<const T*>(p.x);
  const Acc* part = static_cast<const Acc*>(partial);
  const int64_t cg = p.channels / p.groups;
  const double s = static_cast<double>(p.spatial);
  // (on the stack for up to 64 channels a group: the cache-unit schedule calls this once per
  // group, and two heap allocations there cost as much as a small group's sums)
  constexpr int64_t kStack = 64;
  double stack_mean[kStack], stack_m2[kStack];
  std::vector<double> heap(cg > kStack ? 2 * cg : 0);
  double* channel_mean = cg > kStack ? heap.data() : stack_mean;
  double* channel_m2 = cg > kStack ? heap.data() + cg : stack_m2;
  for (int64_t ng = begin; ng < end; ++ng) {
    const int64_t n = ng / p.groups, g = ng % p.groups;
    // Per channel: its mean and sum of squared deviations from the shifted sums, then Chan's
    // merge of the channels (all of S values): M2 = sum M2_c + S sum (mean_c - mean)^2.
    double mean = 0;
    for (int64_t j = 0; j < cg; ++j) {
      const int64_t c = g * cg + j;
      const Acc* q = part + (n * p.channels + c) * t.chunks * 2;
      double sum = 0, sumsq = 0;
      for (int64_t k = 0; k < t.chunks; ++k) {
        sum += q[2 * k];
        sumsq += q[2 * k + 1];
      }
      const double shift = static_cast<double>(x[offset(n, c, 0, p.channels, p.spatial, p.channels_last)]);
      channel_mean[j] = shift + sum / s;
      const double m2 = sumsq - sum * (sum / s);
      channel_m2[j] = m2 < 0 ? 0 : m2;  // (rounding; NaN stays NaN)
      mean += channel_mean[j];
    }
    mean /= static_cast<double>(cg);
    double m2 = 0;
    for (int64_t j = 0; j < cg; ++j) {
      const double d = channel_mean[j] - mean;
      m2 += channel_m2[j] + s * d * d;
    }
    const double var = m2 / (s * static_cast<double>(cg));
    // A group whose mean square overflows the statistics' dtype has no statistics: NaN (as the
    // reference), never rstd = 0 and y = bias.
    const double limit = static_cast<double>(std::numeric_limits<Acc>::max());
    const bool finite = std::isfinite(mean * mean + var) && mean * mean + var <= limit;
    const double rstd = finite ? 1.0 / std::sqrt(var + p.eps) : std::numeric_limits<double>::quiet_NaN();
    static_cast<Acc*>(p.mean)[ng] = static_cast<Acc>(mean);
    static_cast<Acc*>(p.rstd)[ng] = static_cast<Acc>(rstd);
    fill_tables<D>(p, n, g, static_cast<Acc>(mean), static_cast<Acc>(rstd), tables);
  }
}

template <Dtype D>
void group_norm_tables_from_stats(const GroupNormBackwardParams& p, int64_t begin, int64_t end, void* tables) {
  using Acc = typename Types<D>::Acc;
  for (int64_t ng = begin; ng < end; ++ng) {
    fill_tables<D>(p, ng / p.groups, ng % p.groups, static_cast<const Acc*>(p.mean)[ng],
                   static_cast<const Acc*>(p.rstd)[ng], tables);
  }
}

template <Dtype D>
void group_norm_combine_grad(
    const GroupNormBackwardParams& p, const Tiling& t, int64_t begin, int64_t end, const void* partial, void* tables,
    double* dweight_terms, double* dbias_terms) {
  using T = typename Types<D>::T;
  using Acc = typename Types<D>::Acc;
  const Acc* part = static_cast<const Acc*>(partial);
  Acc* tab = static_cast<Acc*>(tables);
  const int64_t nc = p.batch * p.channels, cg = p.channels / p.groups;
  const double count = static_cast<double>(p.spatial) * static_cast<double>(cg);
  for (int64_t ng = begin; ng < end; ++ng) {
    const int64_t n = ng / p.groups, g = ng % p.groups;
    const double rstd = static_cast<const Acc*>(p.rstd)[ng];
    // Per channel: P1 = sum dz, P2 = sum dz xhat. du = dz (1 + scale), dxhat = du w.
    double dxhat_sum = 0, dxhat_xhat_sum = 0;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
      const int64_t j = n * p.channels + c;
      const Acc* q = part + j * t.chunks * 2;
      double p1 = 0, p2 = 0;
      for (int64_t k = 0; k < t.chunks; ++k) {
        p1 += q[2 * k];
        p2 += q[2 * k + 1];
      }
      p2 *= rstd;
      const double w = value_or<T>(p.weight, c, 1), one_plus_scale = 1 + value_or<T>(p.scale, j, 0);
      if (p.dshift) static_cast<T*>(p.dshift)[j] = static_cast<T>(static_cast<Acc>(p1));
      if (p.dscale) static_cast<T*>(p.dscale)[j] = static_cast<T>(static_cast<Acc>(w * p2 + value_or<T>(p.bias, c, 0) * p1));
      if (dweight_terms) dweight_terms[j] = one_plus_scale * p2;
      if (dbias_terms) dbias_terms[j] = one_plus_scale * p1;
      dxhat_sum += w * one_plus_scale * p1;
      dxhat_xhat_sum += w * one_plus_scale * p2;
    }
    // dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), xhat = (x - M) rstd.
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
      const int64_t j = n * p.channels + c;
      const double w = value_or<T>(p.weight, c, 1), one_plus_scale = 1 + value_or<T>(p.scale, j, 0);
      tab[kAd * nc + j] = static_cast<Acc>(rstd * one_plus_scale * w);
      tab[kBd * nc + j] = static_cast<Acc>(-rstd * rstd * (dxhat_xhat_sum / count));
      tab[kCd * nc + j] = static_cast<Acc>(-rstd * (dxhat_sum / count));
    }
  }
}

template <Dtype D>
void group_norm_weight_grads(const GroupNormBackwardParams& p, const double* dweight_terms, const double* dbias_terms) {
  using T = typename Types<D>::T;
  using Acc = typename Types<D>::Acc;
  for (int64_t c = 0; c < p.channels; ++c) {
    double dw = 0, db = 0;
    for (int64_t n = 0; n < p.batch; ++n) {
      if (dweight_terms) dw += dweight_terms[n * p.channels + c];
      if (dbias_terms) db += dbias_terms[n * p.channels + c];
    }
    if (p.dweight) static_cast<T*>(p.dweight)[c] = static_cast<T>(static_cast<Acc>(dw));
    if (p.dbias) static_cast<T*>(p.dbias)[c] = static_cast<T>(static_cast<Acc>(db));
  }
}

#define FASTARCH_GN_INSTANCES(D)                                                                                   \
  template void group_norm_combine<D>(const GroupNormForwardParams&, const Tiling&, int64_t, int64_t, const void*, \
                                      void*);                                                                      \
  template void group_norm_tables_from_stats<D>(const GroupNormBackwardParams&, int64_t, int64_t, void*);          \
  template void group_norm_combine_grad<D>(const GroupNormBackwardParams&, const Tiling&, int64_t, int64_t,        \
                                           const void*, void*, double*, double*);                                  \
  template void group_norm_weight_grads<D>(const GroupNormBackwardParams&, const double*, const double*);

FASTARCH_GN_INSTANCES(Dtype::f32)
FASTARCH_GN_INSTANCES(Dtype::f64)
FASTARCH_GN_INSTANCES(Dtype::f16)
FASTARCH_GN_INSTANCES(Dtype::bf16)
#undef FASTARCH_GN_INSTANCES
#endif  // FASTARCH_PORTABLE_AVX2

#define FASTARCH_GN_KERNELS(D)                                                                                      \
  template void group_norm_stats_generic<kPortableBuild, D>(const GroupNormForwardParams&, const Tiling&, int64_t, \
                                                            int64_t, void*);                                       \
  template void group_norm_apply_generic<kPortableBuild, D>(const GroupNormForwardParams&, const Tiling&, int64_t, \
                                                            int64_t, const void*);                                 \
  template void group_norm_grad_stats_generic<kPortableBuild, D>(const GroupNormBackwardParams&, const Tiling&,    \
                                                                 int64_t, int64_t, const void*, void*,             \
                                                                 const DzStore&);                                  \
  template void group_norm_grad_apply_generic<kPortableBuild, D>(const GroupNormBackwardParams&, const Tiling&,    \
                                                                 int64_t, int64_t, const void*, const DzStore&);

FASTARCH_GN_KERNELS(Dtype::f32)
FASTARCH_GN_KERNELS(Dtype::f64)
FASTARCH_GN_KERNELS(Dtype::f16)
FASTARCH_GN_KERNELS(Dtype::bf16)
#undef FASTARCH_GN_KERNELS

}  // namespace fastarch::cpu::gn

FASTARCH_PORTABLE_END
