// Portable attention decode: a few new queries against a key/value cache (fp32, fp16, bf16;
// fp32 math), for CPUs without AVX-512 and fastarch._C._set_cpu_isa("generic").
//
// The work plan of attention_kernels.h (split-K over chunks of the cache, partials combined
// afterwards). Within a chunk, the rows of a kv head's whole group (H/Hkv heads x Sq queries)
// go together, so each cache entry is read and converted once: per block of BN keys, K^T and V
// in fp32, S = Q K^T, the online-softmax step of each row, O += P V (the forward's steps,
// attention_generic.h).
#include <cmath>
#include <cstdint>

#include "attention_generic.h"
#include "attention_kernels.h"
#include "cpu/portable.h"

FASTARCH_PORTABLE_BEGIN

namespace fastarch::cpu::attention {
namespace {

using namespace generic;

constexpr int64_t BN = 64;  // keys per step: a multiple of kLanes
constexpr int64_t kDotRows = 4;
constexpr float kInf = __builtin_inff();

struct Geometry {
  int64_t group, rows, dv16, item;  // item: floats of one row's partial (m, l, o[dv16])
  explicit Geometry(const DecodeParams& p)
      : group(p.H / p.Hkv), rows(p.H / p.Hkv * p.Sq), dv16(round_up(p.Dv, kLanes)), item(2 + round_up(p.Dv, kLanes)) {}
};

struct Scratch {
  float* q;    // rows x D
  float* kt;   // D x BN
  float* v;    // BN x dv16
  float* s;    // rows x BN
  float* row;  // D: one converted key
  int64_t* lo;  // rows: visible keys [lo, hi) within the chunk
  int64_t* hi;
  int64_t bytes;

  Scratch(void* base, const DecodeParams& p, const Geometry& g) {
    char* c = static_cast<char*>(base);
    auto take = [&](int64_t n_bytes) {
      char* at = c;
      c += align64(n_bytes);
      return at;
    };
    q = reinterpret_cast<float*>(take(g.rows * p.D * 4));
    kt = reinterpret_cast<float*>(take(p.D * BN * 4));
    v = reinterpret_cast<float*>(take(BN * g.dv16 * 4));
    s = reinterpret_cast<float*>(take(g.rows * BN * 4));
    row = reinterpret_cast<float*>(take(p.D * 4));
    lo = reinterpret_cast<int64_t*>(take(g.rows * 8));
    hi = reinterpret_cast<int64_t*>(take(g.rows * 8));
    bytes = c - static_cast<char*>(base);
  }
};

// The online-softmax step of the block of keys [j0, j0 + nk) for rows [0, R): each row's
// scores in sc.s scaled, -inf outside its visible keys (and past nk), its partial (m, l, o)
// updated; a row that sees none of the block's keys gets probabilities 0.
inline void softmax_block(const DecodeParams& p, const Geometry& g, const Scratch& sc, int64_t R, int64_t j0,
                          int64_t nk, float* part) {
  for (int64_t r = 0; r < R; ++r) {
    float* z = sc.s + r * BN;
    float* pr = part + r * g.item;
    const int64_t a = max64(sc.lo[r] - j0, 0), e = min64(sc.hi[r] - j0, nk);
    if (a >= e) {
      for (int64_t j = 0; j < BN; ++j) z[j] = 0.0f;
      continue;
    }
    for (int64_t j = 0; j < nk; ++j) z[j] *= p.scale;
    for (int64_t j = 0; j < a; ++j) z[j] = -kInf;
    for (int64_t j = e; j < BN; ++j) z[j] = -kInf;
    softmax_step_row(z, BN, pr[0], pr[1], pr + 2, g.dv16);
  }
}

// out[i] = tree_sum of the i-th of four vectors. In the AVX2 build in vectors: each one's
// halves added (lane l + lane l + 4), the four transposed, and then (lanes 0 + 2) + (lanes
// 1 + 3) for all four at once: the tree's additions, in its order.
inline void tree_sums4(Vec a, Vec b, Vec c, Vec d, float* out) {
#ifdef FASTARCH_PORTABLE_AVX2
  const auto halves = [](Vec v) {
    return _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  };
  __m128 h0 = halves(a), h1 = halves(b), h2 = halves(c), h3 = halves(d);
  _MM_TRANSPOSE4_PS(h0, h1, h2, h3);  // h0: lane 0 of the four, h1: lane 1, ...
  _mm_storeu_ps(out, _mm_add_ps(_mm_add_ps(h0, h2), _mm_add_ps(h1, h3)));
#else
  out[0] = tree_sum(a), out[1] = tree_sum(b), out[2] = tree_sum(c), out[3] = tree_sum(d);
#endif
}

// Keys [0, KJ) (rows at k + j * k_stride elements) against R rows of q (R <= kDotRows),
// each score as dot() sums it: kVecLanes partial sums over whole vectors of D (fused in the
// AVX2 build), then the lanes as a tree of halves. Each key is read from the cache and widened
// one vector at a time, once for all R rows; the KJ keys' R x KJ sums are independent chains
// of multiply-adds, which keep the FMA units busy where one key's would wait on each other.
template <Dtype T, int R, int KJ>
inline void dot_keys(const float* __restrict q, int64_t D, const typename Elem<T>::type* k, int64_t k_stride,
                     float* __restrict s, int64_t lds) {
  Vec acc[R * KJ];
  for (int i = 0; i < R * KJ; ++i) acc[i] = Vec{};
  for (int64_t d = 0; d < D; d += kVecLanes) {
    Vec kv[KJ];
    for (int j = 0; j < KJ; ++j) kv[j] = load_f32(k + j * k_stride + d);
    for (int r = 0; r < R; ++r) {
      const Vec qv = load_vec(q + r * D + d);
      for (int j = 0; j < KJ; ++j) acc[r * KJ + j] = madd(qv, kv[j], acc[r * KJ + j]);
    }
  }
  int i = 0;
  for (; i + 4 <= R * KJ; i += 4) {
    float out[4];
    tree_sums4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3], out);
    for (int t = 0; t < 4; ++t) s[(i + t) / KJ * lds + (i + t) % KJ] = out[t];
  }
  for (; i < R * KJ; ++i) s[i / KJ * lds + i % KJ] = tree_sum(acc[i]);
}

// o[r] += sum over j < nk of p[r][j] v[j] for R rows and the NV * kVecLanes columns from n, v's
// rows read from the cache and widened there (row j at v + j * v_stride elements): gemm_acc's
// register tile, whose sums run over j in order (the same bits), NV vectors wide.
template <Dtype T, int R, int NV>
inline void pv_panel(const float* __restrict p, int64_t ldp, int64_t nk, const typename Elem<T>::type* v,
                     int64_t v_stride, int64_t n, float* __restrict o, int64_t ldo) {
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = load_vec(o + r * ldo + n + c * kVecLanes);
  for (int64_t j = 0; j < nk; ++j) {
    Vec x[R];
    for (int r = 0; r < R; ++r) x[r] = splat(p[r * ldp + j]);
    for (int c = 0; c < NV; ++c) {  // (one vector of v at a time: R * NV + R + 1 registers)
      const Vec bv = load_f32(v + j * v_stride + n + c * kVecLanes);
      for (int r = 0; r < R; ++r) acc[r][c] = madd(x[r], bv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) store_vec(o + r * ldo + n + c * kVecLanes, acc[r][c]);
}

// The keys and panels a direct step takes at once for R rows: R * KJ score chains and R * NV
// accumulators of P V, about 8 either way (of the 16 vector registers).
template <int R>
constexpr int kKeysAtOnce = R <= 3 ? 4 : 2;
template <int R>
constexpr int kPanelVecs = R == 1 ? 8 : R == 2 ? 4 : kNV;

// run_chunk's loop over the keys for a group of R <= kDotRows rows whose D and Dv are whole
// vectors and panels (direct() below): the scores and P V read K and V where they lie in the
// cache, converting as they load, with no copy of either; the same sums as the copying loop.
template <Dtype T, int R>
void run_keys_direct(const DecodeParams& p, const Geometry& g, const Scratch& sc, int64_t b, int64_t hk, int64_t first,
                     int64_t last, float* part) {
  using E = typename Elem<T>::type;
  const int64_t es = elem_size(T), D = p.D;
  const int64_t k_stride = p.k_stride[2], v_stride = p.v_stride[2];
  for (int64_t j0 = first; j0 < last; j0 += BN) {
    const int64_t nk = min64(BN, last - j0);
    const E* k0 = reinterpret_cast<const E*>(row_ptr(p.k_cache, p.k_stride, es, b, hk, j0));
    constexpr int KJ = kKeysAtOnce<R>;
    int64_t j = 0;
    for (; j + KJ <= nk; j += KJ) dot_keys<T, R, KJ>(sc.q, D, k0 + j * k_stride, k_stride, sc.s + j, BN);
    for (; j < nk; ++j) dot_keys<T, R, 1>(sc.q, D, k0 + j * k_stride, k_stride, sc.s + j, BN);
    softmax_block(p, g, sc, R, j0, nk, part);
    const E* v0 = reinterpret_cast<const E*>(row_ptr(p.v_cache, p.v_stride, es, b, hk, j0));
    constexpr int NV = kPanelVecs<R>;
    int64_t n = 0;
    for (; n + NV * kVecLanes <= p.Dv; n += NV * kVecLanes) pv_panel<T, R, NV>(sc.s, BN, nk, v0, v_stride, n, part + 2, g.item);
    for (; n < p.Dv; n += kNR) pv_panel<T, R, kNV>(sc.s, BN, nk, v0, v_stride, n, part + 2, g.item);
  }
}

// Whether run_chunk reads K and V in place (run_keys_direct): a few rows, D whole vectors, Dv
// whole register-tile panels (64, 80, 96, 128, ...).
inline bool direct(const DecodeParams& p, const Geometry& g) {
  return g.rows <= kDotRows && p.D % kVecLanes == 0 && p.Dv % kNR == 0;
}

// Partials of the keys [c0, c1) of sequence b, kv head hk, for every row of the group.
template <Dtype T>
void run_chunk(const DecodeParams& p, const Geometry& g, const Scratch& sc, int64_t b, int64_t hk, int64_t c0,
               int64_t c1, float* part) {
  const int64_t es = elem_size(T), R = g.rows, D = p.D;
  for (int64_t r = 0; r < R; ++r) {
    float* pr = part + r * g.item;
    pr[0] = -kInf;
    pr[1] = 0.0f;
    for (int64_t c = 0; c < g.dv16; ++c) pr[2 + c] = 0.0f;
  }
  const int64_t n = p.cache_seqlens[b];
  c1 = min64(c1, n);
  if (c0 >= c1) return;
  int64_t first = c1, last = c0;  // the union of the rows' ranges within the chunk
  for (int64_t r = 0; r < R; ++r) {
    const KeyRange kr = visible_keys(r % p.Sq, p.Sq, n, p.window_left, p.causal ? 0 : -1);
    sc.lo[r] = max64(kr.lo, c0), sc.hi[r] = min64(kr.hi, c1);
    if (sc.hi[r] > sc.lo[r]) first = min64(first, sc.lo[r]), last = max64(last, sc.hi[r]);
  }
  if (first >= last) return;
  for (int64_t r = 0; r < R; ++r) {
    to_f32<T>(row_ptr(p.q, p.q_stride, es, b, hk * g.group + r / p.Sq, r % p.Sq), D, sc.q + r * D);
  }

  if (direct(p, g)) {
    switch (R) {
      case 1: return run_keys_direct<T, 1>(p, g, sc, b, hk, first, last, part);
      case 2: return run_keys_direct<T, 2>(p, g, sc, b, hk, first, last, part);
      case 3: return run_keys_direct<T, 3>(p, g, sc, b, hk, first, last, part);
      default: return run_keys_direct<T, 4>(p, g, sc, b, hk, first, last, part);
    }
  }
  // Few rows (a group of up to kDotRows heads at one query): each score a dot product of q's row
  // with the key's row, no transpose of the keys; more rows: S = Q K^T on register tiles.
  const bool dots = R <= kDotRows;
  for (int64_t j0 = first; j0 < last; j0 += BN) {
    const int64_t nk = min64(BN, last - j0);
    for (int64_t j = 0; j < BN; ++j) {
      if (j >= nk) {
        if (dots) {
          for (int64_t r = 0; r < R; ++r) sc.s[r * BN + j] = 0.0f;
        } else {
          for (int64_t d = 0; d < D; ++d) sc.kt[d * BN + j] = 0.0f;
        }
        continue;
      }
      to_f32<T>(row_ptr(p.k_cache, p.k_stride, es, b, hk, j0 + j), D, sc.row);
      if (dots) {
        for (int64_t r = 0; r < R; ++r) sc.s[r * BN + j] = dot(sc.q + r * D, sc.row, D);
      } else {
        for (int64_t d = 0; d < D; ++d) sc.kt[d * BN + j] = sc.row[d];
      }
      float* vrow = sc.v + j * g.dv16;
      to_f32<T>(row_ptr(p.v_cache, p.v_stride, es, b, hk, j0 + j), p.Dv, vrow);
      for (int64_t c = p.Dv; c < g.dv16; ++c) vrow[c] = 0.0f;
    }
    if (!dots) gemm(R, BN, D, sc.q, D, sc.kt, BN, sc.s, BN);
    softmax_block(p, g, sc, R, j0, nk, part);
    gemm_acc(R, g.dv16, nk, sc.s, BN, sc.v, g.dv16, part + 2, g.item);
  }
}

template <Dtype T>
void combine(const DecodeParams& p, const Geometry& g, int64_t chunks, int64_t bh, const float* partials, float* o) {
  const int64_t b = bh / p.Hkv, hk = bh % p.Hkv;
  const int64_t item_floats = g.rows * g.item;
  const float* first = partials + bh * chunks * item_floats;
  for (int64_t r = 0; r < g.rows; ++r) {
    const int64_t h = hk * g.group + r / p.Sq, i = r % p.Sq;
    float m = -kInf;  // the max over the chunks (never NaN: NaN scores show in l)
    for (int64_t c = 0; c < chunks; ++c) {
      const float mc = first[c * item_floats + r * g.item];
      m = mc > m ? mc : m;
    }
    const float base = m == -kInf ? 0.0f : m;
    float l = 0.0f;
    for (int64_t d = 0; d < g.dv16; ++d) o[d] = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) {
      const float* pr = first + c * item_floats + r * g.item;
      if (pr[0] == -kInf && pr[1] == 0.0f) continue;  // the chunk saw no key of this row
      const float w = exp_f32(pr[0] - base);  // (a chunk of NaN scores only: m -inf, l NaN)
      l += pr[1] * w;
      for (int64_t d = 0; d < g.dv16; ++d) o[d] += w * pr[2 + d];
    }
    p.lse[(b * p.H + h) * p.Sq + i] = l == 0.0f ? -kInf : m + std::log(l);
    const float inv = 1.0f / l;
    for (int64_t d = 0; d < p.Dv; ++d) o[d] = keep_if(l != 0.0f, o[d] * inv);
    from_f32<T>(o, p.Dv, row_ptr(p.out, p.out_stride, elem_size(T), b, h, i));
  }
}

}  // namespace

template <>
int64_t decode_item_floats_generic<kPortableBuild>(const DecodeParams& p) {
  const Geometry g(p);
  return g.rows * g.item;
}

template <>
int64_t decode_scratch_bytes_generic<kPortableBuild>(const DecodeParams& p) {
  const Geometry g(p);
  return Scratch(nullptr, p, g).bytes + 64;
}

template <>
void decode_chunks_generic<kPortableBuild>(const DecodeParams& p, int64_t chunk_len, int64_t chunks, int64_t begin, int64_t end,
                           float* partials, void* scratch) {
  const Geometry g(p);
  char* base = static_cast<char*>(scratch);
  base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
  const Scratch sc(base, p, g);
  const int64_t item_floats = g.rows * g.item;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t c = t % chunks, bh = t / chunks;
    const int64_t b = bh / p.Hkv, hk = bh % p.Hkv;
    float* part = partials + t * item_floats;
    const int64_t c0 = c * chunk_len, c1 = c0 + chunk_len;
    FASTARCH_DTYPE_DISPATCH(p.dtype, run_chunk, p, g, sc, b, hk, c0, c1, part)
  }
}

template <>
void decode_combine_generic<kPortableBuild>(const DecodeParams& p, int64_t chunks, int64_t begin, int64_t end, const float* partials) {
  const Geometry g(p);
  // one output row in fp32 (the stack: dv16 <= 512)
  float o[512 + kLanes];
  for (int64_t bh = begin; bh < end; ++bh) {
    FASTARCH_DTYPE_DISPATCH(p.dtype, combine, p, g, chunks, bh, partials, o)
  }
}

}  // namespace fastarch::cpu::attention

FASTARCH_PORTABLE_END
