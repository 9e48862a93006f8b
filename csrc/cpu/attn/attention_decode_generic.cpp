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
    for (int64_t r = 0; r < R; ++r) {
      float* z = sc.s + r * BN;
      float* pr = part + r * g.item;
      const int64_t a = max64(sc.lo[r] - j0, 0), e = min64(sc.hi[r] - j0, nk);
      if (a >= e) {
        for (int64_t j = 0; j < BN; ++j) z[j] = 0.0f;
        continue;
      }
      for (int64_t j = 0; j < BN; ++j) z[j] *= p.scale;
      for (int64_t j = 0; j < a; ++j) z[j] = -kInf;
      for (int64_t j = e; j < BN; ++j) z[j] = -kInf;
      softmax_step_row(z, BN, pr[0], pr[1], pr + 2, g.dv16);
    }
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
