// AVX-512 flash-attention forward (fp32, fp16, bf16 inputs; fp32 statistics and accumulators).
//
// One task = kFwdBlockM queries of one head. For each key block of kFwdBlockN keys that some
// query of the task sees: S = Q K^T (GEMM tile), the online-softmax update of every row (tile
// max, rescale factor alpha, exp, row sum, dropout, P in the compute type), then
// O = alpha * O + P V (GEMM tile with alpha applied as O is loaded into registers). Key blocks
// outside the union of the rows' visible ranges are skipped; blocks inside every row's range,
// without masks, take the fast path (no mask math, the scale folded into the exp's FMA).
//
// Compute types: bf16 -> vdpbf16ps tiles (products exact, fp32 sums), P rounded to bf16;
// fp16 and fp32 -> fp32 FMA tiles (fp16 has no dot instruction here, and bf16 would lose 3
// bits of its mantissa). exp: fp32 uses exp_accurate (1.08 ulp) in natural units; bf16 and fp16
// use exp2_fast (relative error 1.8e-6, far below their rounding) on scores pre-scaled by
// log2(e), which saves a multiply and the two-step range reduction.
//
// NaN: a NaN score (from q, k or the mask) or value makes its query's out and lse NaN. No
// test in the loops: exp keeps NaN (attention_common.h), so the row's p, l and O become NaN
// even when a max reduction dropped it (masked_logits covers the one case where that would
// matter), and finish() reads that from l.
//
// No torch headers (see attention_common.h); the target pragma below covers the file.
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

constexpr int64_t BM = kFwdBlockM;
constexpr int64_t BN = kFwdBlockN;
constexpr int64_t kChunks = BN / 16;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

template <bool kBf16>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<true> {
  using type = uint16_t;  // bf16 bits
};

// One thread's scratch.
struct Scratch {
  void* q;       // BM x d_pad, compute type
  float* s;      // BM x BN scores (or logits, on the masked path)
  void* p;       // BM x BN probabilities, compute type
  float* o;      // BM x dv_pad accumulators
  float* m;      // BM running max (exponent units)
  float* l;      // BM running sum
  float* alpha;  // BM rescale factor of this step
  float* tmax;   // BM tile max
  uint32_t* drop_key;  // BM dropout row keys

  Scratch(void* base, int64_t d_pad, int64_t dv_pad) {
    char* c = static_cast<char*>(base);
    q = c, c += align64(BM * d_pad * 4);
    s = reinterpret_cast<float*>(c), c += align64(BM * BN * 4);
    p = c, c += align64(BM * BN * 4);
    o = reinterpret_cast<float*>(c), c += align64(BM * dv_pad * 4);
    m = reinterpret_cast<float*>(c), c += align64(BM * 4);
    l = reinterpret_cast<float*>(c), c += align64(BM * 4);
    alpha = reinterpret_cast<float*>(c), c += align64(BM * 4);
    tmax = reinterpret_cast<float*>(c), c += align64(BM * 4);
    drop_key = reinterpret_cast<uint32_t*>(c), c += align64(BM * 4);
    bytes = c - static_cast<char*>(base);
  }
  int64_t bytes;
};

// ----------------------------------------------------------------------------- packing

template <Dtype T>
void pack_block(const AttentionParams& p, const FwdPacking& pk, int64_t n, int64_t hk, int64_t kb, void* dst) {
  const SeqSpan s = seq_span(p, n);
  const int64_t es = elem_size(T);
  const int64_t j0 = kb * BN, valid = min64(BN, s.sk - j0);
  const char* k = row_ptr(p.k, p.k_stride, es, s.b, hk, s.k0 + j0);
  const char* v = row_ptr(p.v, p.v_stride, es, s.b, hk, s.k0 + j0);
  if (pk.bf16_gemm) {
    uint16_t* kd = static_cast<uint16_t*>(dst);
    uint16_t* vd = kd + pk.k_block_elems;
    pack_b_bf16(reinterpret_cast<const uint16_t*>(k), p.k_stride[2], valid, p.D, true, pk.d_pad, BN, kd);
    pack_b_bf16(reinterpret_cast<const uint16_t*>(v), p.v_stride[2], valid, p.Dv, false, BN, pk.dv_pad, vd);
  } else {
    float* kd = static_cast<float*>(dst);
    float* vd = kd + pk.k_block_elems;
    pack_b_f32<T>(k, p.k_stride[2], valid, p.D, true, BN, kd);
    pack_b_f32<T>(v, p.v_stride[2], valid, p.Dv, false, pk.dv_pad, vd);
    for (int64_t j = valid; j < BN; ++j)
      for (int64_t c = 0; c < pk.dv_pad; ++c) vd[j * pk.dv_pad + c] = 0.0f;
  }
}

// ----------------------------------------------------------------------------- one task

template <Dtype T, bool kBf16, class E>
struct Task {
  using C = typename ComputeType<kBf16>::type;

  const AttentionParams& p;
  const FwdPacking& pk;
  Scratch& sc;
  SeqSpan s;
  int64_t h, hk, i0, rows;
  float c;     // scale in exponent units
  float unit;  // 1 or log2(e): the mask's factor

  // Q rows of the task into the scratch, in the compute type (zero padding for bf16's odd D).
  void load_q() {
    C* q = static_cast<C*>(sc.q);
    for (int64_t r = 0; r < rows; ++r)
      load_row<T>(row_ptr(p.q, p.q_stride, elem_size(T), s.b, h, s.q0 + i0 + r), p.D, pk.d_pad, q + r * pk.d_pad);
  }

  // Logits of row r over key block j0 (valid keys), into the scores row; -inf where the row
  // does not see the key. Returns the row's max (NaN when it sees a NaN score and nothing
  // larger than -inf: see the end).
  float masked_logits(int64_t r, int64_t j0, int64_t valid) {
    const KeyRange kr = visible_keys(p, s, i0 + r);
    const int64_t a = max64(kr.lo - j0, 0), e = min64(kr.hi - j0, valid);
    float* srow = sc.s + r * BN;
    const int64_t es = elem_size(T);
    const char* mrow = nullptr;
    if (p.attn_mask) {
      mrow = static_cast<const char*>(p.attn_mask) +
             (s.b * p.mask_stride[0] + h * p.mask_stride[1] + (s.q0 + i0 + r) * p.mask_stride[2] +
              (s.k0 + j0) * p.mask_stride[3]) * es;
    }
    const bool* kpm = p.key_padding_mask ? p.key_padding_mask + s.b * p.kpm_stride[0] + (s.k0 + j0) * p.kpm_stride[1]
                                         : nullptr;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    __mmask16 seen = 0;
    const __m512 vc = _mm512_set1_ps(c), vu = _mm512_set1_ps(unit);
    for (int64_t ch = 0; ch < kChunks; ++ch) {
      const int64_t base = ch * 16;
      // lanes base + l with a <= base + l < e
      __mmask16 vis = 0;
      if (e > base && a < base + 16) {
        const int64_t from = max64(a - base, 0), to = min64(e - base, 16);
        vis = __mmask16(((1u << to) - 1) & ~((1u << from) - 1));
      }
      if (kpm && vis) {
        if (p.kpm_stride[1] == 1) {
          vis &= _mm_test_epi8_mask(_mm_maskz_loadu_epi8(vis, kpm + base), _mm_set1_epi8(1));
        } else {
          for (int l = 0; l < 16; ++l)
            if (((vis >> l) & 1) && !kpm[(base + l) * p.kpm_stride[1]]) vis &= __mmask16(~(1u << l));
        }
      }
      __m512 z = _mm512_mul_ps(_mm512_loadu_ps(srow + base), vc);
      if (mrow && vis) {
        __m512 mv;
        if (p.mask_stride[3] == 1) {
          mv = load16<T>(mrow + base * es, vis);
        } else {
          alignas(64) float tmp[16];
          for (int l = 0; l < 16; ++l)
            tmp[l] = ((vis >> l) & 1) ? value_at<T>(mrow, (base + l) * p.mask_stride[3]) : 0.0f;
          mv = _mm512_load_ps(tmp);
        }
        z = add_mask(z, mv, vu);
        // a -inf entry masks the key even where the score is NaN (NaN + -inf would be NaN)
        vis &= _mm512_cmp_ps_mask(mv, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ);
      }
      z = _mm512_mask_blend_ps(vis, _mm512_set1_ps(-INFINITY), z);
      _mm512_storeu_ps(srow + base, z);
      mx = _mm512_max_ps(mx, z);
      seen |= vis;
    }
    const float row_max = reduce_max(mx);
    // vmaxps returns its second operand when one is NaN, so the max can lose a NaN score. Only
    // a row whose other visible scores are all -inf (never, for finite inputs) needs it: its
    // max would say "sees no key" and the row would stay 0. Look for the NaN there.
    if (row_max == -INFINITY && seen) {
      for (int64_t ch = 0; ch < kChunks; ++ch) {
        const __m512 z = _mm512_loadu_ps(srow + ch * 16);
        if (_mm512_cmp_ps_mask(z, z, _CMP_UNORD_Q)) return NAN;
      }
    }
    return row_max;
  }

  // The online-softmax step of key block j0 for rows [r0, r1): P (compute type), alpha, and m,
  // l updated. fast: every row sees every key of the block, no masks, scale > 0.
  void softmax_step(int64_t j0, int64_t valid, bool fast, int64_t r0, int64_t r1) {
    // pass 1: tile maxima
    if (fast) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* srow = sc.s + r * BN;
        __m512 mx = _mm512_loadu_ps(srow);
        for (int64_t ch = 1; ch < kChunks; ++ch) mx = _mm512_max_ps(mx, _mm512_loadu_ps(srow + ch * 16));
        sc.tmax[r] = reduce_max(mx) * c;  // c > 0: max(s c) = c max(s), rounding included
      }
    } else {
      for (int64_t r = r0; r < r1; ++r) sc.tmax[r] = masked_logits(r, j0, valid);
    }
    // pass 2: new maxima and rescale factors, 16 rows at a time
    for (int64_t r = r0; r < r1; r += 16) {
      const __mmask16 mk = tail_mask(r1 - r);
      const __m512 mold = _mm512_maskz_loadu_ps(mk, sc.m + r);
      const __m512 mnew = _mm512_max_ps(mold, _mm512_maskz_loadu_ps(mk, sc.tmax + r));
      const __mmask16 none = _mm512_cmp_ps_mask(mnew, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ);
      // exp(-inf - finite) = 0; rows that have seen nothing yet keep alpha = 1 (and O = 0)
      const __m512 alpha = _mm512_mask_blend_ps(none, E::exp(_mm512_sub_ps(mold, mnew)), _mm512_set1_ps(1.0f));
      _mm512_mask_storeu_ps(sc.alpha + r, mk, alpha);
      _mm512_mask_storeu_ps(sc.m + r, mk, mnew);
    }
    // pass 3: probabilities, row sums
    C* pm = static_cast<C*>(sc.p);
    const __m512 vc = _mm512_set1_ps(c);
    for (int64_t r = r0; r < r1; ++r) {
      const float* srow = sc.s + r * BN;
      C* prow = pm + r * BN;
      const float mr = sc.m[r];
      if (mr == -INFINITY) {
        for (int64_t j = 0; j < BN; ++j) prow[j] = 0;
        continue;  // l stays 0
      }
      const __m512 vm = _mm512_set1_ps(mr);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t ch = 0; ch < kChunks; ++ch) {
        const __m512 sv = _mm512_loadu_ps(srow + ch * 16);
        __m512 pv = E::exp(fast ? _mm512_fmsub_ps(sv, vc, vm) : _mm512_sub_ps(sv, vm));
        sum = _mm512_add_ps(sum, pv);
        if (p.dropout) pv = _mm512_maskz_mov_ps(dropout_keep16(sc.drop_key[r], s.k0 + j0 + ch * 16, p.dropout_threshold), pv);
        if constexpr (kBf16) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(prow + ch * 16), f32_to_bf16(pv));
        } else {
          _mm512_storeu_ps(prow + ch * 16, pv);
        }
      }
      sc.l[r] = sc.l[r] * sc.alpha[r] + reduce_add(sum);
    }
  }

  void finish() {
    const int64_t es = elem_size(T);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = s.q0 + i0 + r;
      // l: 0 for a query that sees no key (out 0, lse -inf), NaN once a NaN reached its
      // scores (exp keeps it) or its values: then out and lse are NaN
      const float l = sc.l[r];
      const bool none = l == 0.0f;
      const float m = E::kLog2 ? sc.m[r] * kLn2 : sc.m[r];
      p.lse[(s.b * p.H + h) * p.Sq + i] = none ? -INFINITY : m + std::log(l);
      const __m512 inv = _mm512_set1_ps(none ? 0.0f : (p.dropout ? p.dropout_scale : 1.0f) / l);
      // zeros, not o * 0: o of a query that sees no key holds 0 * v of the tile's keys, NaN if a v is
      const __mmask16 keep = none ? __mmask16(0) : __mmask16(0xFFFF);
      char* orow = row_ptr(p.out, p.out_stride, es, s.b, h, i);
      const float* o = sc.o + r * pk.dv_pad;
      for (int64_t d = 0; d < p.Dv; d += 16) {
        store16<T>(orow + d * es, _mm512_maskz_mul_ps(keep, _mm512_loadu_ps(o + d), inv), tail_mask(p.Dv - d));
      }
    }
  }

  // Key block kb of this task's (sequence, kv head), global index g, packed by whichever task
  // needs it first; a task that finds it being packed waits (a few microseconds).
  void ensure_packed(int64_t g, int64_t kb, C* dst) {
    int32_t* state = pk.block_state + g;
    if (__atomic_load_n(state, __ATOMIC_ACQUIRE) == 2) return;
    int32_t expected = 0;
    if (__atomic_compare_exchange_n(state, &expected, 1, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
      pack_block<T>(p, pk, seq_index, hk, kb, dst);
      __atomic_store_n(state, 2, __ATOMIC_RELEASE);
      return;
    }
    while (__atomic_load_n(state, __ATOMIC_ACQUIRE) != 2) _mm_pause();
  }

  // The rows [r0, r1) of this task that may see a key of [j0, j1) (each row's visible range
  // moves right with the row, so those rows are contiguous), widened to whole kTileM-row tiles of
  // the products; r0 == r1 when none does. Rows outside see none of the block: their state is
  // what the step would leave it (alpha 1, P 0), so the step skips them (on the diagonal of a
  // causal task, most of its rows for the first blocks it reaches).
  void rows_seeing(int64_t j0, int64_t j1, int64_t& r0, int64_t& r1) const {
    r0 = 0;
    while (r0 < rows && visible_keys(p, s, i0 + r0).hi <= j0) ++r0;
    r1 = rows;
    while (r1 > r0 && visible_keys(p, s, i0 + r1 - 1).lo >= j1) --r1;
    if (r0 == r1) return;
    r0 = r0 / kTileM * kTileM;
    r1 = rows - (rows - r1) / kTileM * kTileM;
  }

  void run() {
    load_q();
    for (int64_t r = 0; r < rows; ++r) {
      sc.m[r] = -INFINITY;
      sc.l[r] = 0.0f;
      if (p.dropout) sc.drop_key[r] = dropout_row_key(p.seed, dropout_row(p, s.b, h, s.q0 + i0 + r));
    }
    for (int64_t x = 0; x < rows * pk.dv_pad; ++x) sc.o[x] = 0.0f;
    const KeyRange first = visible_keys(p, s, i0), last = visible_keys(p, s, i0 + rows - 1);
    if (last.hi > first.lo) {
      const int64_t nblk = (s.sk + BN - 1) / BN;
      const int64_t block0 = pk.seq_block0[seq_index] * p.Hkv + hk * nblk;
      const C* blocks = static_cast<const C*>(pk.packed) + block0 * (pk.k_block_elems + pk.v_block_elems);
      const bool plain = !p.attn_mask && !p.key_padding_mask && c > 0;
      for (int64_t kb = first.lo / BN; kb < (last.hi + BN - 1) / BN; ++kb) {
        const int64_t j0 = kb * BN, valid = min64(BN, s.sk - j0);
        const C* kblk = blocks + kb * (pk.k_block_elems + pk.v_block_elems);
        ensure_packed(block0 + kb, kb, const_cast<C*>(kblk));
        const C* vblk = kblk + pk.k_block_elems;
        int64_t r0, r1;
        rows_seeing(j0, j0 + valid, r0, r1);
        if (r0 == r1) continue;
        gemm<kBf16>(r1 - r0, BN, pk.d_pad, static_cast<const C*>(sc.q) + r0 * pk.d_pad, pk.d_pad, kblk,
                    sc.s + r0 * BN, BN, false, nullptr);
        // every row sees keys j0 .. j0 + BN: the last row's lo and the first row's hi bound all rows
        const bool fast = plain && valid == BN && last.lo <= j0 && first.hi >= j0 + BN;
        softmax_step(j0, valid, fast, r0, r1);
        gemm<kBf16>(r1 - r0, pk.dv_pad, BN, static_cast<const C*>(sc.p) + r0 * BN, BN, vblk, sc.o + r0 * pk.dv_pad,
                    pk.dv_pad, true, sc.alpha + r0);
      }
    }
    finish();
  }

  int64_t seq_index;
};

template <Dtype T, bool kBf16, class E>
void run_tasks(const AttentionParams& p, const FwdPacking& pk, const FwdTask* tasks, int64_t num_tasks, int64_t* next,
               Scratch& sc) {
  const float unit = E::kLog2 ? kLog2e : 1.0f;
  for (;;) {
    const int64_t t = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED);
    if (t >= num_tasks) break;
    const FwdTask& task = tasks[t];
    const SeqSpan s = seq_span(p, task.seq);
    const int64_t i0 = int64_t{task.qblock} * BM;
    Task<T, kBf16, E> w{p, pk, sc, s, task.head, task.head / (p.H / p.Hkv), i0, min64(BM, s.sq - i0),
                        p.scale * unit, unit, task.seq};
    w.run();
  }
}

}  // namespace


int64_t fwd_scratch_bytes(const AttentionParams& p, const FwdPacking& pk) {
  (void)p;
  return Scratch(nullptr, pk.d_pad, pk.dv_pad).bytes + 64;
}

void fwd_run_avx512(const AttentionParams& p, const FwdPacking& pk, const FwdTask* tasks, int64_t num_tasks,
                    int64_t* next, void* scratch) {
  char* base = static_cast<char*>(scratch);
  base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
  Scratch sc(base, pk.d_pad, pk.dv_pad);
  switch (p.dtype) {
    case Dtype::f32:
      run_tasks<Dtype::f32, false, ExpAccurate>(p, pk, tasks, num_tasks, next, sc);
      break;
    case Dtype::f16:
      run_tasks<Dtype::f16, false, ExpFast>(p, pk, tasks, num_tasks, next, sc);
      break;
    case Dtype::bf16:  // (the glue requires AVX512-BF16 for bf16: pk.bf16_gemm)
      run_tasks<Dtype::bf16, true, ExpFast>(p, pk, tasks, num_tasks, next, sc);
      break;
  }
}

}  // namespace fastarch::cpu::attention

#pragma GCC pop_options
