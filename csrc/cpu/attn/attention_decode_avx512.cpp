// AVX-512 attention decode: a few new queries against a key/value cache (fp32, fp16, bf16).
//
// Memory-bound: every valid cache entry of K and V is read once, straight from the cache (no
// packing pass, which would read it twice). Split-K: each (b, kv head) cache is cut into
// chunks that the threads take independently, so even one sequence keeps both cores
// streaming; each chunk computes, for all H/Hkv query heads x Sq queries of the kv head at
// once (GQA reads the cache once per group), a partial online softmax (m, l, o) in fp32;
// decode_combine merges the chunks' partials.
//
// Per key row: loaded once and multiplied into every query row of the group (bf16: vdpbf16ps
// on the raw pairs; fp16/fp32: widened to fp32, FMA); the 16 per-lane partial dot products of
// 16 keys are reduced together by a transpose tree (45 shuffles/adds for 16 keys instead of
// 16 horizontal sums), then scaled. Per value row: widened
// once, accumulated into the rows' o with the probability broadcast. exp: exp_accurate
// (1 ulp) for every dtype; one exp per 16 keys per row is not what limits a memory-bound
// loop.
//
// NaN (in q or a filled slot of k or v) reaches out and lse through exp, which keeps it
// (attention_common.h), and the chunks' l and o; decode_combine keeps a NaN max.
//
// No torch headers (see attention_common.h).
#include <cmath>
#include <cstdint>

#define FASTARCH_ATTENTION_AVX512 1
#include "attention_common.h"
#include "attention_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

namespace fastarch::cpu::attention {
namespace {

using namespace avx512;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

constexpr int kRowGroup = 8;  // query rows whose dot products share one widened key row
// Software prefetch distance, in cache rows: the hardware prefetcher alone left the loop
// waiting on its key loads (measured: a quarter of the time on the first use of each row).
constexpr int64_t kPrefetchKeys = 32;

// lane j of the result = the sum of the 16 lanes of v[j].
inline __m512 transpose_sum16(const __m512* v) {
  __m512 w[8], x[4];
  for (int i = 0; i < 8; ++i)  // lanes (a, b, a, b) per 128 bits: sums over 2 of their 4 elements
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // (keys 4i .. 4i+3) per 128 bits, each summed over its 128 bits
    const __m512d c = _mm512_castps_pd(w[2 * i]), d = _mm512_castps_pd(w[2 * i + 1]);
    x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)), _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
  }
  // across the four 128-bit parts: keys 4g .. 4g+3 end in part g
  const __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
  const __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, 0x88), _mm512_shuffle_f32x4(z01, z23, 0xDD));
}

struct Geometry {
  int64_t group, rows, d16, dv_pad;
  explicit Geometry(const DecodeParams& p)
      : group(p.H / p.Hkv), rows(p.H / p.Hkv * p.Sq), d16((p.D + 15) / 16 * 16), dv_pad((p.Dv + 15) / 16 * 16) {}
};

struct Scratch {
  float* q;        // rows x d16, fp32, zero padded
  uint16_t* qb;    // rows x d32, the bf16 rows as they are, zero padded (bf16 dot products)
  float* partial;  // rows x 16 x 16: per-lane partial dot products of 16 keys
  float* p;        // rows x 16 probabilities of 16 keys
  int64_t* lo;     // rows: visible keys [lo, hi) within the sequence
  int64_t* hi;
  Scratch(void* base, const Geometry& g) {
    char* c = static_cast<char*>(base);
    q = reinterpret_cast<float*>(c), c += align64(g.rows * g.d16 * 4);
    qb = reinterpret_cast<uint16_t*>(c), c += align64(g.rows * (g.d16 + 16) * 2);
    partial = reinterpret_cast<float*>(c), c += align64(g.rows * 256 * 4);
    p = reinterpret_cast<float*>(c), c += align64(g.rows * 16 * 4);
    lo = reinterpret_cast<int64_t*>(c), c += align64(g.rows * 8);
    hi = reinterpret_cast<int64_t*>(c), c += align64(g.rows * 8);
    bytes = c - static_cast<char*>(base);
  }
  int64_t bytes;
};

// Per-lane partial dot products of query rows r0 .. r0+RG with the keys j0 .. j0+nk (slots
// nk .. 15 get 0) into sc.partial. bf16 keys multiply the bf16 query pairs directly
// (vdpbf16ps: exact products, fp32 sums; no widening); fp16 and fp32 keys are widened and
// multiplied into the fp32 rows. Each key row is loaded once for the RG rows.
template <Dtype T, int RG>
void key_dots(const DecodeParams& p, const Geometry& g, const Scratch& sc, int64_t r0, const char* kbase,
              const char* vbase, int64_t j0, int64_t nk, bool prefetch) {
  const int64_t es = elem_size(T);
  const int64_t d32 = (p.D + 31) / 32 * 32;
  for (int64_t jj = 0; jj < 16; ++jj) {
    __m512 acc[RG];
    for (int r = 0; r < RG; ++r) acc[r] = _mm512_setzero_ps();
    if (jj < nk) {
      const char* krow = kbase + (j0 + jj) * p.k_stride[2] * es;
      if (prefetch) {  // the rows of the keys and values kPrefetchKeys ahead (L3/DRAM latency)
        for (int64_t d = 0; d < p.D * es; d += 64) _mm_prefetch(krow + kPrefetchKeys * p.k_stride[2] * es + d, _MM_HINT_T0);
        const char* vrow = vbase + (j0 + jj + kPrefetchKeys) * p.v_stride[2] * es;
        for (int64_t d = 0; d < p.Dv * es; d += 64) _mm_prefetch(vrow + d, _MM_HINT_T0);
      }
      if constexpr (T == Dtype::bf16) {
        for (int64_t d = 0; d < d32; d += 32) {
          // (a plain load for 32 whole dims: Zen 5 runs masked loads from memory several times slower)
          const __m512bh kv = (__m512bh)(p.D - d >= 32 ? _mm512_loadu_si512(krow + d * 2)
                                                        : _mm512_maskz_loadu_epi16((1u << (p.D - d)) - 1, krow + d * 2));
          for (int r = 0; r < RG; ++r)
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(sc.qb + (r0 + r) * d32 + d), kv);
        }
      } else {
        for (int64_t d = 0; d < g.d16; d += 16) {
          const __m512 kv = d + 16 < g.d16 ? load16<T>(krow + d * es) : load16<T>(krow + d * es, tail_mask(p.D - d));
          for (int r = 0; r < RG; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(sc.q + (r0 + r) * g.d16 + d), kv, acc[r]);
        }
      }
    }
    for (int r = 0; r < RG; ++r) _mm512_storeu_ps(sc.partial + ((r0 + r) * 16 + jj) * 16, acc[r]);
  }
}

// o (in the partials) of rows r0 .. r0+RG += p v over the keys j0 .. j0+nk: each value row
// widened once per 16 dims, up to RG x 4 accumulators in registers.
template <Dtype T, int RG>
void value_sums(const DecodeParams& p, const Geometry& g, const Scratch& sc, int64_t r0, const char* vbase, int64_t j0,
                int64_t nk, float* part) {
  const int64_t es = elem_size(T), item = 2 + g.dv_pad;
  for (int64_t d0 = 0; d0 < g.dv_pad; d0 += 64) {
    const int64_t dn = min64(4, (g.dv_pad - d0) / 16);
    __m512 acc[RG][4];
    for (int r = 0; r < RG; ++r)
      for (int dc = 0; dc < 4; ++dc)
        acc[r][dc] = dc < dn ? _mm512_loadu_ps(part + (r0 + r) * item + 2 + d0 + dc * 16) : _mm512_setzero_ps();
    for (int64_t jj = 0; jj < nk; ++jj) {
      const char* vrow = vbase + (j0 + jj) * p.v_stride[2] * es;
      __m512 vv[4];
      for (int dc = 0; dc < 4; ++dc) {
        const int64_t d = d0 + dc * 16;
        vv[dc] = dc >= dn ? _mm512_setzero_ps()
                          : (d + 16 <= p.Dv ? load16<T>(vrow + d * es) : load16<T>(vrow + d * es, tail_mask(p.Dv - d)));
      }
      for (int r = 0; r < RG; ++r) {
        const __m512 pj = _mm512_set1_ps(sc.p[(r0 + r) * 16 + jj]);
        for (int dc = 0; dc < 4; ++dc)
          if (dc < dn) acc[r][dc] = _mm512_fmadd_ps(pj, vv[dc], acc[r][dc]);
      }
    }
    for (int r = 0; r < RG; ++r)
      for (int dc = 0; dc < 4; ++dc)
        if (dc < dn) _mm512_storeu_ps(part + (r0 + r) * item + 2 + d0 + dc * 16, acc[r][dc]);
  }
}

template <Dtype T>
void run_chunk(const DecodeParams& p, const Geometry& g, Scratch& sc, int64_t b, int64_t hk, int64_t c0, int64_t c1,
               float* part) {
  const int64_t es = elem_size(T);
  const int64_t R = g.rows, item = 2 + g.dv_pad;
  // partial layout per row: m, l, o[dv_pad]
  for (int64_t r = 0; r < R; ++r) {
    float* pr = part + r * item;
    pr[0] = -INFINITY;
    pr[1] = 0.0f;
    for (int64_t d = 0; d < g.dv_pad; ++d) pr[2 + d] = 0.0f;
  }
  const int64_t n = p.cache_seqlens[b];
  c1 = min64(c1, n);
  if (c0 >= c1) return;
  // rows' key ranges, intersected with the chunk; the chunk's union of them
  int64_t first = c1, last = c0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = r % p.Sq;
    const KeyRange kr = visible_keys(i, p.Sq, n, p.window_left, p.causal ? 0 : -1);
    sc.lo[r] = max64(kr.lo, c0), sc.hi[r] = min64(kr.hi, c1);
    if (sc.hi[r] > sc.lo[r]) first = min64(first, sc.lo[r]), last = max64(last, sc.hi[r]);
  }
  if (first >= last) return;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t h = hk * g.group + r / p.Sq, i = r % p.Sq;
    const char* src = row_ptr(p.q, p.q_stride, es, b, h, i);
    for (int64_t d = 0; d < g.d16; d += 16) {
      const __mmask16 mk = d < p.D ? tail_mask(p.D - d) : __mmask16(0);
      _mm512_storeu_ps(sc.q + r * g.d16 + d, load16<T>(src + d * es, mk));
    }
    if constexpr (T == Dtype::bf16) {
      const int64_t d32 = (p.D + 31) / 32 * 32;
      for (int64_t d = 0; d < d32; d += 32) {
        const __mmask32 mk = p.D - d >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << (p.D - d)) - 1);
        _mm512_storeu_si512(sc.qb + r * d32 + d, _mm512_maskz_loadu_epi16(mk, src + d * 2));
      }
    }
  }
  const char* kbase = row_ptr(p.k_cache, p.k_stride, es, b, hk, 0);
  const char* vbase = row_ptr(p.v_cache, p.v_stride, es, b, hk, 0);

  for (int64_t j0 = first; j0 < last; j0 += 16) {
    const int64_t nk = min64(16, last - j0);
    for (int64_t r0 = 0; r0 < R; r0 += kRowGroup) {
      const bool pf = r0 == 0;
      switch (min64(kRowGroup, R - r0)) {
        case 1: key_dots<T, 1>(p, g, sc, r0, kbase, vbase, j0, nk, pf); break;
        case 2: key_dots<T, 2>(p, g, sc, r0, kbase, vbase, j0, nk, pf); break;
        case 3: key_dots<T, 3>(p, g, sc, r0, kbase, vbase, j0, nk, pf); break;
        case 4: key_dots<T, 4>(p, g, sc, r0, kbase, vbase, j0, nk, pf); break;
        case 5: key_dots<T, 5>(p, g, sc, r0, kbase, vbase, j0, nk, pf); break;
        case 6: key_dots<T, 6>(p, g, sc, r0, kbase, vbase, j0, nk, pf); break;
        case 7: key_dots<T, 7>(p, g, sc, r0, kbase, vbase, j0, nk, pf); break;
        default: key_dots<T, 8>(p, g, sc, r0, kbase, vbase, j0, nk, pf); break;
      }
    }
    // online softmax over these 16 keys, row by row
    for (int64_t r = 0; r < R; ++r) {
      float* pr = part + r * item;
      const int64_t a = max64(sc.lo[r] - j0, 0), e = min64(sc.hi[r] - j0, nk);
      if (a >= e) {
        _mm512_storeu_ps(sc.p + r * 16, _mm512_setzero_ps());
        continue;
      }
      const __mmask16 vis = __mmask16(((e >= 16 ? 0x10000u : (1u << e)) - 1) & ~((1u << a) - 1));
      __m512 partial[16];
      for (int jj = 0; jj < 16; ++jj) partial[jj] = _mm512_loadu_ps(sc.partial + (r * 16 + jj) * 16);
      const __m512 s = _mm512_mask_blend_ps(vis, _mm512_set1_ps(-INFINITY),
                                            _mm512_mul_ps(transpose_sum16(partial), _mm512_set1_ps(p.scale)));
      const float mold = pr[0];
      float smax = _mm512_reduce_max_ps(s);
      // the max can lose a NaN score (vmaxps keeps its second operand); that matters only when
      // the row's other visible scores are -inf (never, for finite inputs): m = -inf would
      // mark the chunk as seeing no key, and decode_combine would skip it
      if (smax == -INFINITY && _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q)) smax = NAN;
      const float mnew = mold > smax ? mold : smax;
      const __m512 pv = exp_accurate(_mm512_sub_ps(s, _mm512_set1_ps(mnew)));
      _mm512_storeu_ps(sc.p + r * 16, pv);
      const float alpha = mold == -INFINITY ? 0.0f : std::exp(mold - mnew);
      pr[0] = mnew;
      pr[1] = pr[1] * alpha + _mm512_reduce_add_ps(pv);
      if (alpha != 1.0f) {
        const __m512 va = _mm512_set1_ps(alpha);
        for (int64_t d = 0; d < g.dv_pad; d += 16) _mm512_storeu_ps(pr + 2 + d, _mm512_mul_ps(va, _mm512_loadu_ps(pr + 2 + d)));
      }
    }
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      switch (min64(4, R - r0)) {
        case 1: value_sums<T, 1>(p, g, sc, r0, vbase, j0, nk, part); break;
        case 2: value_sums<T, 2>(p, g, sc, r0, vbase, j0, nk, part); break;
        case 3: value_sums<T, 3>(p, g, sc, r0, vbase, j0, nk, part); break;
        default: value_sums<T, 4>(p, g, sc, r0, vbase, j0, nk, part); break;
      }
    }
  }
}

}  // namespace

int64_t decode_item_floats(const DecodeParams& p) {
  const Geometry g(p);
  return g.rows * (2 + g.dv_pad);
}

int64_t decode_scratch_bytes(const DecodeParams& p) { return Scratch(nullptr, Geometry(p)).bytes + 64; }

void decode_chunks_avx512(const DecodeParams& p, int64_t chunk_len, int64_t chunks, int64_t begin, int64_t end,
                          float* partials, void* scratch) {
  const Geometry g(p);
  char* base = static_cast<char*>(scratch);
  base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
  Scratch sc(base, g);
  const int64_t item_floats = decode_item_floats(p);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t c = t % chunks, bh = t / chunks;
    const int64_t b = bh / p.Hkv, hk = bh % p.Hkv;
    float* part = partials + t * item_floats;
    const int64_t c0 = c * chunk_len, c1 = c0 + chunk_len;
    FASTARCH_DTYPE_DISPATCH(p.dtype, run_chunk, p, g, sc, b, hk, c0, c1, part)
  }
}

void decode_combine_avx512(const DecodeParams& p, int64_t chunks, int64_t begin, int64_t end, const float* partials) {
  const Geometry g(p);
  const int64_t item_floats = decode_item_floats(p), row_floats = 2 + g.dv_pad;
  const int64_t es = elem_size(p.dtype);
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / p.Hkv, hk = bh % p.Hkv;
    const float* first = partials + bh * chunks * item_floats;
    for (int64_t r = 0; r < g.rows; ++r) {
      const int64_t h = hk * g.group + r / p.Sq, i = r % p.Sq;
      // The chunks' max, NaN if any chunk's is: `m > mc ? m : mc` drops a NaN m, and a later
      // chunk without keys (-inf) would then make the row look as if it saw none (out 0).
      float m = -INFINITY;
      for (int64_t c = 0; c < chunks; ++c) {
        const float mc = first[c * item_floats + r * row_floats];
        if (m == m && !(mc <= m)) m = mc;
      }
      char* orow = row_ptr(p.out, p.out_stride, es, b, h, i);
      if (m == -INFINITY) {  // sees no key
        p.lse[(b * p.H + h) * p.Sq + i] = -INFINITY;
        for (int64_t d = 0; d < p.Dv; d += 16) {
          switch (p.dtype) {
            case Dtype::f32: store16<Dtype::f32>(orow + d * es, _mm512_setzero_ps(), tail_mask(p.Dv - d)); break;
            case Dtype::f16: store16<Dtype::f16>(orow + d * es, _mm512_setzero_ps(), tail_mask(p.Dv - d)); break;
            case Dtype::bf16: store16<Dtype::bf16>(orow + d * es, _mm512_setzero_ps(), tail_mask(p.Dv - d)); break;
          }
        }
        continue;
      }
      float l = 0.0f;
      for (int64_t d0 = 0; d0 < g.dv_pad; d0 += 16) {
        __m512 o = _mm512_setzero_ps();
        float lsum = 0.0f;
        for (int64_t c = 0; c < chunks; ++c) {
          const float* pr = first + c * item_floats + r * row_floats;
          if (pr[0] == -INFINITY) continue;
          const float w = std::exp(pr[0] - m);
          lsum += pr[1] * w;
          o = _mm512_fmadd_ps(_mm512_set1_ps(w), _mm512_loadu_ps(pr + 2 + d0), o);
        }
        l = lsum;
        o = _mm512_mul_ps(o, _mm512_set1_ps(1.0f / lsum));
        if (d0 < p.Dv) {
          switch (p.dtype) {
            case Dtype::f32: store16<Dtype::f32>(orow + d0 * es, o, tail_mask(p.Dv - d0)); break;
            case Dtype::f16: store16<Dtype::f16>(orow + d0 * es, o, tail_mask(p.Dv - d0)); break;
            case Dtype::bf16: store16<Dtype::bf16>(orow + d0 * es, o, tail_mask(p.Dv - d0)); break;
          }
        }
      }
      p.lse[(b * p.H + h) * p.Sq + i] = m + std::log(l);
    }
  }
}

}  // namespace fastarch::cpu::attention

#pragma GCC pop_options
