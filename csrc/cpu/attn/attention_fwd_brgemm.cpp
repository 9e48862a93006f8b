// Flash-attention forward whose two matrix products per block run through oneDNN's brgemm
// (brgemm.h): bf16 on the AMX tiles on a CPU with AMX-BF16 (in AVX-512 code elsewhere), fp32
// (fp32 inputs, and fp16 ones widened as the register tiles widen them) in oneDNN's AVX-512
// code. The same algorithm as attention_fwd_avx512.cpp, whose comment says the numerics and the
// NaN contract (they are the same, exp and P's rounding chosen by dtype as there): per task
// BrgemmBlocks::fwd_m queries of one head, per key block of BrgemmBlocks::fwd_n keys S = Q K^T
// (brgemm), the masks and the online-softmax update fused in AVX-512 code, then
// O = alpha O + P V (O rescaled in place, then brgemm accumulating into it).
//
// B operands: brgemm takes bf16 B in oneDNN's "pack32" layout, which is the layout pack_b_bf16
// (attention_common.h) writes, and fp32 B row-major (pack_b_f32), so K^T and V blocks are
// packed by our own code once per block (cpublas::pack does the bf16 transform but only runs
// on AMX CPUs, and without the transpose K^T needs). Each product is split into column panels
// of at most kBrgemmPanel (64) columns, each packed with ld_b = its width.
#ifdef FASTARCH_WITH_AVX512
#include <cmath>
#include <cstdint>
#include <type_traits>

#define FASTARCH_ATTENTION_AVX512 1
#include "attention_common.h"
#include "attention_kernels.h"
#include "brgemm.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

namespace fastarch::cpu::attention {
namespace {

using namespace avx512;

constexpr int64_t kPanel = kBrgemmPanel;  // (BrgemmBlocks::fwd_n is a multiple: key blocks are whole panels)
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

// (BM, BN: the call's BrgemmBlocks::fwd_m and fwd_n; C: the compute type, bf16 bits or fp32)
template <typename C>
struct Scratch {
  C* q;          // BM x d_pad
  float* s;      // BM x BN scores (logits on the masked path)
  C* p;          // BM x BN probabilities
  float* o;      // BM x dv_pad accumulators
  float* m;      // BM running max (exponent units)
  float* l;      // BM running sum
  float* alpha;  // BM rescale factor of this step
  float* tmax;   // BM tile max
  uint32_t* drop_key;
  int64_t bytes;

  Scratch(void* base, int64_t d_pad, int64_t dv_pad, int64_t BM, int64_t BN) {
    char* c = static_cast<char*>(base);
    q = reinterpret_cast<C*>(c), c += align64(BM * d_pad * sizeof(C));
    s = reinterpret_cast<float*>(c), c += align64(BM * BN * 4);
    p = reinterpret_cast<C*>(c), c += align64(BM * BN * sizeof(C));
    o = reinterpret_cast<float*>(c), c += align64(BM * dv_pad * 4);
    m = reinterpret_cast<float*>(c), c += align64(BM * 4);
    l = reinterpret_cast<float*>(c), c += align64(BM * 4);
    alpha = reinterpret_cast<float*>(c), c += align64(BM * 4);
    tmax = reinterpret_cast<float*>(c), c += align64(BM * 4);
    drop_key = reinterpret_cast<uint32_t*>(c), c += align64(BM * 4);
    bytes = c - static_cast<char*>(base);
  }
};

// Width of V's column panel that starts at column c0 (dv_pad is a multiple of 16).
inline int64_t panel_width(int64_t dv_pad, int64_t c0) { return min64(kPanel, dv_pad - c0); }

// The products in the compute type: C (M x N, fp32, ldc) (+)= A (M x K, lda) B (a panel).
inline void product(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ld_b, int64_t ldc, bool add_c,
                    const uint16_t* a, const uint16_t* b, float* c) {
  brgemm_bf16(M, N, K, lda, ld_b, ldc, add_c, a, b, c);
}
inline void product(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ld_b, int64_t ldc, bool add_c,
                    const float* a, const float* b, float* c) {
  brgemm_f32(M, N, K, lda, ld_b, ldc, add_c, a, b, c);
}

// Key block kb (of BN keys) of sequence n, kv head hk: K^T as BN / kPanel panels (d_pad x kPanel
// each), then V as panels of its columns (BN x width each); keys past the sequence's end are zero.
template <Dtype T, typename C>
void pack_block(const AttentionParams& p, const FwdPacking& pk, int64_t BN, int64_t n, int64_t hk, int64_t kb,
                C* dst) {
  const SeqSpan s = seq_span(p, n);
  const int64_t es = elem_size(T), j0 = kb * BN, valid = min64(BN, s.sk - j0);
  const char* k = row_ptr(p.k, p.k_stride, es, s.b, hk, s.k0 + j0);
  const char* v = row_ptr(p.v, p.v_stride, es, s.b, hk, s.k0 + j0);
  C* vd = dst + pk.k_block_elems;
  for (int64_t j = 0; j < BN; j += kPanel) {
    const int64_t rows = max64(0, min64(kPanel, valid - j));
    const char* kj = k + j * p.k_stride[2] * es;
    if constexpr (sizeof(C) == 2) {
      pack_b_bf16(reinterpret_cast<const uint16_t*>(kj), p.k_stride[2], rows, p.D, true, pk.d_pad, kPanel,
                  dst + j * pk.d_pad);
    } else {
      pack_b_f32<T>(kj, p.k_stride[2], rows, p.D, true, kPanel, dst + j * pk.d_pad);
    }
  }
  for (int64_t c0 = 0; c0 < pk.dv_pad; c0 += kPanel) {
    const int64_t w = panel_width(pk.dv_pad, c0), cols = min64(w, p.Dv - c0);
    if constexpr (sizeof(C) == 2) {
      pack_b_bf16(reinterpret_cast<const uint16_t*>(v) + c0, p.v_stride[2], valid, cols, false, BN, w, vd + c0 * BN);
    } else {
      C* panel = vd + c0 * BN;
      pack_b_f32<T>(v + c0 * es, p.v_stride[2], valid, cols, false, w, panel);
      for (int64_t x = valid * w; x < BN * w; ++x) panel[x] = 0.0f;  // (pack_b_f32 pads no rows)
    }
  }
}

template <Dtype T, bool kBf16, class E>
struct Task {
  using C = std::conditional_t<kBf16, uint16_t, float>;

  const AttentionParams& p;
  const FwdPacking& pk;
  Scratch<C>& sc;
  SeqSpan s;
  int64_t h, hk, i0, rows;
  float c;     // scale in exponent units
  float unit;  // 1 or log2(e): the mask's factor
  int64_t seq_index;
  int64_t BN;       // keys per block
  int64_t kChunks;  // BN / 16

  void load_q() {
    for (int64_t r = 0; r < rows; ++r)
      load_row<T>(row_ptr(p.q, p.q_stride, elem_size(T), s.b, h, s.q0 + i0 + r), p.D, pk.d_pad, sc.q + r * pk.d_pad);
  }

  // Logits of row r over key block j0 into its scores row, -inf where the row does not see the
  // key; returns the row's max (NaN when a NaN score hides behind -inf maxima).
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
      __mmask16 vis = 0;
      if (e > base && a < base + 16) {
        const int64_t from = max64(a - base, 0), to = min64(e - base, 16);
        vis = __mmask16(((1u << to) - 1) & ~((1u << from) - 1));
      }
      if (kpm && vis) {
        for (int l = 0; l < 16; ++l)
          if (((vis >> l) & 1) && !kpm[(base + l) * p.kpm_stride[1]]) vis &= __mmask16(~(1u << l));
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
        vis &= _mm512_cmp_ps_mask(mv, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ);
      }
      z = _mm512_mask_blend_ps(vis, _mm512_set1_ps(-INFINITY), z);
      _mm512_storeu_ps(srow + base, z);
      mx = _mm512_max_ps(mx, z);
      seen |= vis;
    }
    const float row_max = reduce_max(mx);
    if (row_max == -INFINITY && seen) {
      for (int64_t ch = 0; ch < kChunks; ++ch) {
        const __m512 z = _mm512_loadu_ps(srow + ch * 16);
        if (_mm512_cmp_ps_mask(z, z, _CMP_UNORD_Q)) return NAN;
      }
    }
    return row_max;
  }

  // P (compute type), alpha, m and l of key block j0; O rescaled by alpha. fast: every row sees
  // every key of the block, no masks, scale > 0.
  void softmax_step(int64_t j0, int64_t valid, bool fast) {
    if (fast) {
      for (int64_t r = 0; r < rows; ++r) {
        const float* srow = sc.s + r * BN;
        __m512 mx = _mm512_loadu_ps(srow);
        for (int64_t ch = 1; ch < kChunks; ++ch) mx = _mm512_max_ps(mx, _mm512_loadu_ps(srow + ch * 16));
        sc.tmax[r] = reduce_max(mx) * c;
      }
    } else {
      for (int64_t r = 0; r < rows; ++r) sc.tmax[r] = masked_logits(r, j0, valid);
    }
    for (int64_t r = 0; r < rows; r += 16) {
      const __mmask16 mk = tail_mask(rows - r);
      const __m512 mold = _mm512_maskz_loadu_ps(mk, sc.m + r);
      const __m512 mnew = _mm512_max_ps(mold, _mm512_maskz_loadu_ps(mk, sc.tmax + r));
      const __mmask16 none = _mm512_cmp_ps_mask(mnew, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ);
      const __m512 alpha = _mm512_mask_blend_ps(none, E::exp(_mm512_sub_ps(mold, mnew)), _mm512_set1_ps(1.0f));
      _mm512_mask_storeu_ps(sc.alpha + r, mk, alpha);
      _mm512_mask_storeu_ps(sc.m + r, mk, mnew);
    }
    const __m512 vc = _mm512_set1_ps(c);
    for (int64_t r = 0; r < rows; ++r) {
      const float* srow = sc.s + r * BN;
      C* prow = sc.p + r * BN;
      const float mr = sc.m[r];
      if (mr == -INFINITY) {
        for (int64_t j = 0; j < BN; ++j) prow[j] = 0;
        continue;  // l and O stay 0
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
      const float alpha = sc.alpha[r];
      sc.l[r] = sc.l[r] * alpha + reduce_add(sum);
      if (alpha != 1.0f) {  // (NaN alpha too: a NaN row stays NaN)
        float* orow = sc.o + r * pk.dv_pad;
        const __m512 va = _mm512_set1_ps(alpha);
        for (int64_t d = 0; d < pk.dv_pad; d += 16) _mm512_storeu_ps(orow + d, _mm512_mul_ps(va, _mm512_loadu_ps(orow + d)));
      }
    }
  }

  void finish() {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = s.q0 + i0 + r;
      const float l = sc.l[r];
      const bool none = l == 0.0f;
      const float m = E::kLog2 ? sc.m[r] * kLn2 : sc.m[r];
      p.lse[(s.b * p.H + h) * p.Sq + i] = none ? -INFINITY : m + std::log(l);
      const __m512 inv = _mm512_set1_ps(none ? 0.0f : (p.dropout ? p.dropout_scale : 1.0f) / l);
      const __mmask16 keep = none ? __mmask16(0) : __mmask16(0xFFFF);
      const int64_t es = elem_size(T);
      char* orow = row_ptr(p.out, p.out_stride, es, s.b, h, i);
      const float* o = sc.o + r * pk.dv_pad;
      for (int64_t d = 0; d < p.Dv; d += 16) {
        store16<T>(orow + d * es, _mm512_maskz_mul_ps(keep, _mm512_loadu_ps(o + d), inv), tail_mask(p.Dv - d));
      }
    }
  }

  void ensure_packed(int64_t g, int64_t kb, C* dst) {
    int32_t* state = pk.block_state + g;
    if (__atomic_load_n(state, __ATOMIC_ACQUIRE) == 2) return;
    int32_t expected = 0;
    if (__atomic_compare_exchange_n(state, &expected, 1, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
      pack_block<T>(p, pk, BN, seq_index, hk, kb, dst);
      __atomic_store_n(state, 2, __ATOMIC_RELEASE);
      return;
    }
    while (__atomic_load_n(state, __ATOMIC_ACQUIRE) != 2) _mm_pause();
  }

  void run() {
    load_q();
    for (int64_t r = 0; r < rows; ++r) {
      sc.m[r] = -INFINITY;
      sc.l[r] = 0.0f;
      if (p.dropout) sc.drop_key[r] = dropout_row_key(p.seed, dropout_row(p, s.b, h, s.q0 + i0 + r));
    }
    for (int64_t x = 0; x < rows * pk.dv_pad; x += 16) _mm512_storeu_ps(sc.o + x, _mm512_setzero_ps());
    const KeyRange first = visible_keys(p, s, i0), last = visible_keys(p, s, i0 + rows - 1);
    if (last.hi > first.lo) {
      const int64_t nblk = (s.sk + BN - 1) / BN;
      const int64_t block0 = pk.seq_block0[seq_index] * p.Hkv + hk * nblk;
      C* blocks = static_cast<C*>(pk.packed) + block0 * (pk.k_block_elems + pk.v_block_elems);
      const bool plain = !p.attn_mask && !p.key_padding_mask && c > 0;
      for (int64_t kb = first.lo / BN; kb < (last.hi + BN - 1) / BN; ++kb) {
        const int64_t j0 = kb * BN, valid = min64(BN, s.sk - j0);
        C* kblk = blocks + kb * (pk.k_block_elems + pk.v_block_elems);
        ensure_packed(block0 + kb, kb, kblk);
        const C* vblk = kblk + pk.k_block_elems;
        // S = Q K^T, one panel of kPanel keys at a time (panels wholly past the sequence's end
        // hold zeros: their scores are masked below, or outside every row's range)
        for (int64_t j = 0; j < BN; j += kPanel)
          product(rows, kPanel, pk.d_pad, pk.d_pad, kPanel, BN, false, sc.q, kblk + j * pk.d_pad, sc.s + j);
        const bool fast = plain && valid == BN && last.lo <= j0 && first.hi >= j0 + BN;
        softmax_step(j0, valid, fast);
        for (int64_t c0 = 0; c0 < pk.dv_pad; c0 += kPanel) {
          const int64_t w = panel_width(pk.dv_pad, c0);
          product(rows, w, BN, BN, w, pk.dv_pad, true, sc.p, vblk + c0 * BN, sc.o + c0);
        }
      }
    }
    finish();
  }
};

template <Dtype T, bool kBf16, class E>
void run_tasks(const AttentionParams& p, const FwdPacking& pk, const BrgemmBlocks& blocks, const FwdTask* tasks,
               int64_t num_tasks, int64_t* next, void* base) {
  using C = typename Task<T, kBf16, E>::C;
  const int64_t BM = blocks.fwd_m, BN = blocks.fwd_n;
  const float unit = E::kLog2 ? kLog2e : 1.0f;
  Scratch<C> sc(base, pk.d_pad, pk.dv_pad, BM, BN);
  for (;;) {
    const int64_t t = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED);
    if (t >= num_tasks) break;
    const FwdTask& task = tasks[t];
    const SeqSpan s = seq_span(p, task.seq);
    const int64_t i0 = int64_t{task.qblock} * BM;
    Task<T, kBf16, E> w{p, pk, sc, s, task.head, task.head / (p.H / p.Hkv), i0, min64(BM, s.sq - i0),
                        p.scale * unit, unit, task.seq, BN, BN / 16};
    w.run();
  }
}

}  // namespace

int64_t fwd_scratch_bytes_brgemm(const FwdPacking& pk, const BrgemmBlocks& blocks) {
  // (the larger of the two compute types' scratch)
  return Scratch<float>(nullptr, pk.d_pad, pk.dv_pad, blocks.fwd_m, blocks.fwd_n).bytes + 64;
}

void fwd_run_brgemm(const AttentionParams& p, const FwdPacking& pk, const BrgemmBlocks& blocks, const FwdTask* tasks,
                    int64_t num_tasks, int64_t* next, void* scratch) {
  char* base = static_cast<char*>(scratch);
  base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
  switch (p.dtype) {
    case Dtype::f32:
      run_tasks<Dtype::f32, false, ExpAccurate>(p, pk, blocks, tasks, num_tasks, next, base);
      break;
    case Dtype::f16:
      run_tasks<Dtype::f16, false, ExpFast>(p, pk, blocks, tasks, num_tasks, next, base);
      break;
    case Dtype::bf16:
      run_tasks<Dtype::bf16, true, ExpFast>(p, pk, blocks, tasks, num_tasks, next, base);
      break;
  }
  brgemm_release();  // this thread's tile configuration (AMX), before the pool runs other work on it
}

}  // namespace fastarch::cpu::attention

#pragma GCC pop_options
#endif  // FASTARCH_WITH_AVX512
