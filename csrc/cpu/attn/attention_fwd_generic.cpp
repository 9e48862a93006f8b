// Portable flash-attention forward (fp32, fp16, bf16 inputs; every product, statistic and
// accumulator in fp32): the kernel for CPUs without AVX-512 (aarch64, older x86) and for
// fastarch._C._set_cpu_isa("generic").
//
// One task = up to kFwdBlockMGeneric queries of one head. For each block of BN keys that some
// query of the task sees: S = Q K^T, the online-softmax step of every row (masks, max, rescale,
// exp, sum, dropout), then O += P V. The two products are attention_generic.h's register-tile
// GEMM, on K^T (D x BN) and V (BN x dv16) converted to fp32 once per call: the first task that
// needs a key block packs it for all (FwdPacking, as the AVX-512 forward does).
// Semantics, NaN included: attention_common.h, fastarch/ops/attn/reference.py.
#include <cmath>
#include <cstdint>

#include "attention_generic.h"
#include "attention_kernels.h"
#include "cpu/portable.h"

FASTARCH_PORTABLE_BEGIN

namespace fastarch::cpu::attention {
namespace {

using namespace generic;

constexpr int64_t BM = kFwdBlockMGeneric;
constexpr int64_t BN = kFwdBlockNGeneric;  // keys per step: a multiple of kLanes
constexpr float kInf = __builtin_inff();

// One thread's scratch, 64-byte aligned pieces.
struct Scratch {
  float* q;      // BM x D
  float* s;      // BM x BN: scores, logits, then probabilities
  float* o;      // BM x dv16 output accumulators
  float* m;      // BM running max
  float* l;      // BM running sum
  float* exp_base;  // BM: the step's exponent bases
  float* alpha;  // BM: the step's rescale factors
  uint8_t* seen;  // BM: whether the row sees a key of the block
  uint8_t* kpm;  // BN: key_padding_mask of the block's keys
  uint32_t* drop_key;  // BM dropout row keys
  int64_t bytes;

  Scratch(void* base, int64_t D, int64_t dv16) {
    char* c = static_cast<char*>(base);
    auto take = [&](int64_t n_bytes) {
      char* at = c;
      c += align64(n_bytes);
      return at;
    };
    q = reinterpret_cast<float*>(take(BM * D * 4));
    s = reinterpret_cast<float*>(take(BM * BN * 4));
    o = reinterpret_cast<float*>(take(BM * dv16 * 4));
    m = reinterpret_cast<float*>(take(BM * 4));
    l = reinterpret_cast<float*>(take(BM * 4));
    exp_base = reinterpret_cast<float*>(take(BM * 4));
    alpha = reinterpret_cast<float*>(take(BM * 4));
    seen = reinterpret_cast<uint8_t*>(take(BM));
    kpm = reinterpret_cast<uint8_t*>(take(BN));
    drop_key = reinterpret_cast<uint32_t*>(take(BM * 4));
    bytes = c - static_cast<char*>(base);
  }
};

// K^T (D x BN) and V (BN x dv16) of key block kb of sequence n, kv head hk, in fp32 at dst
// (FwdPacking's block: K^T then V), each in column panels of kNR for gemm_panels (panel_index),
// zero past the valid keys and past Dv.
template <Dtype T>
void pack_block(const AttentionParams& p, const FwdPacking& pk, int64_t n, int64_t hk, int64_t kb, float* dst) {
  const SeqSpan s = seq_span(p, n);
  const int64_t es = elem_size(T), D = p.D, Dv = p.Dv, dv16 = pk.dv_pad;
  const int64_t j0 = kb * BN, nk = min64(BN, s.sk - j0);
  float* kt = dst;
  float* v = dst + pk.k_block_elems;
  const int64_t kt_panel = D * kNR, v_panel = BN * kNR;
  for (int64_t j = 0; j < BN; ++j) {
    if (j >= nk) {
      for (int64_t d = 0; d < D; ++d) kt[panel_index(d, j, kt_panel)] = 0.0f;
      for (int64_t c = 0; c < dv16; ++c) v[panel_index(j, c, v_panel)] = 0.0f;
      continue;
    }
    const char* krow = row_ptr(p.k, p.k_stride, es, s.b, hk, s.k0 + j0 + j);
    for (int64_t d = 0; d < D; ++d) kt[panel_index(d, j, kt_panel)] = value_f32<T>(krow, d);
    const char* vrow = row_ptr(p.v, p.v_stride, es, s.b, hk, s.k0 + j0 + j);
    for (int64_t c = 0; c < dv16; c += kNR) {  // kNR columns at a time: one panel's row
      float* out = v + panel_index(j, c, v_panel);
      const int64_t valid = max64(min64(kNR, Dv - c), 0);
      to_f32<T>(vrow + c * es, valid, out);
      for (int64_t x = valid; x < kNR; ++x) out[x] = 0.0f;
    }
  }
}

template <Dtype T>
struct Task {
  const AttentionParams& p;
  const FwdPacking& pk;
  const Scratch& sc;
  SeqSpan s;
  int64_t n, h, hk, i0, rows, dv16;

  // The packed K^T and V of key block kb (global index g), packed by whichever task needs it
  // first; a task that finds it being packed waits (microseconds).
  const float* packed(int64_t kb) {
    const int64_t blocks = pk.seq_block0[n + 1] - pk.seq_block0[n];
    const int64_t g = pk.seq_block0[n] * p.Hkv + hk * blocks + kb;
    float* dst = static_cast<float*>(pk.packed) + g * (pk.k_block_elems + pk.v_block_elems);
    int32_t* state = pk.block_state + g;
    if (__atomic_load_n(state, __ATOMIC_ACQUIRE) == 2) return dst;
    int32_t expected = 0;
    if (__atomic_compare_exchange_n(state, &expected, 1, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
      pack_block<T>(p, pk, n, hk, kb, dst);
      __atomic_store_n(state, 2, __ATOMIC_RELEASE);
      return dst;
    }
    while (__atomic_load_n(state, __ATOMIC_ACQUIRE) != 2) {
    }
    return dst;
  }

  // The padding-mask bits of keys j0 .. j0 + nk.
  void load_padding_mask(int64_t j0, int64_t nk) {
    const bool* kpm = p.key_padding_mask + s.b * p.kpm_stride[0];
    for (int64_t j = 0; j < nk; ++j) sc.kpm[j] = kpm[(s.k0 + j0 + j) * p.kpm_stride[1]];
  }

  // Row r's logits over keys j0 .. j0 + nk into its scores row: scale * s (+ attn_mask), -inf
  // where the query does not see the key (replaced, not added: a NaN score of a key the query
  // does not see stays out). Returns whether it sees any key of the block.
  bool logits(int64_t r, int64_t j0, int64_t nk) {
    const KeyRange kr = visible_keys(p, s, i0 + r);
    const int64_t a = max64(kr.lo - j0, 0), e = min64(kr.hi - j0, nk);
    float* z = sc.s + r * BN;
    if (a >= e) return false;
    for (int64_t j = 0; j < BN; ++j) z[j] *= p.scale;
    if (p.attn_mask) {
      const int64_t es = elem_size(T);
      const char* mrow = static_cast<const char*>(p.attn_mask) +
                         (s.b * p.mask_stride[0] + h * p.mask_stride[1] + (s.q0 + i0 + r) * p.mask_stride[2] +
                          (s.k0 + j0) * p.mask_stride[3]) * es;
      for (int64_t j = a; j < e; ++j) {
        const float m = value_f32<T>(mrow, j * p.mask_stride[3]);
        z[j] = m == -kInf ? -kInf : z[j] + m;  // a -inf entry hides the key, even from a NaN score
      }
    }
    for (int64_t j = 0; j < a; ++j) z[j] = -kInf;
    for (int64_t j = e; j < BN; ++j) z[j] = -kInf;
    if (p.key_padding_mask)
      for (int64_t j = a; j < e; ++j) z[j] = sc.kpm[j] ? z[j] : -kInf;
    return true;
  }

  void run() {
    const int64_t es = elem_size(T), D = p.D;
    for (int64_t r = 0; r < rows; ++r) {
      to_f32<T>(row_ptr(p.q, p.q_stride, es, s.b, h, s.q0 + i0 + r), D, sc.q + r * D);
      sc.m[r] = -kInf;
      sc.l[r] = 0.0f;
      if (p.dropout) sc.drop_key[r] = dropout_row_key(p.seed, dropout_row(p, s.b, h, s.q0 + i0 + r));
    }
    for (int64_t x = 0; x < rows * dv16; ++x) sc.o[x] = 0.0f;

    // the rows' visible ranges only move right as the query grows: their union is first..last
    const KeyRange first = visible_keys(p, s, i0), last = visible_keys(p, s, i0 + rows - 1);
    for (int64_t j0 = first.lo / BN * BN; j0 < last.hi; j0 += BN) {
      const int64_t nk = min64(BN, s.sk - j0);
      const float* kt = packed(j0 / BN);
      if (p.key_padding_mask) load_padding_mask(j0, nk);
      gemm_panels<false>(rows, BN, D, sc.q, D, kt, D * kNR, sc.s, BN);
      for (int64_t r = 0; r < rows; ++r) {
        sc.seen[r] = logits(r, j0, nk);
        if (!sc.seen[r])
          for (int64_t j = 0; j < BN; ++j) sc.s[r * BN + j] = 0.0f;  // this block adds nothing to the row
      }
      softmax_step_rows(sc.s, BN, sc.seen, rows, BN, sc.m, sc.l, sc.o, dv16, dv16, sc.exp_base, sc.alpha);
      if (p.dropout) {
        for (int64_t r = 0; r < rows; ++r)
          if (sc.seen[r]) dropout_zero(sc.s + r * BN, BN, sc.drop_key[r], s.k0 + j0, p.dropout_threshold);
      }
      gemm_panels<true>(rows, dv16, nk, sc.s, BN, kt + pk.k_block_elems, BN * kNR, sc.o, dv16);
    }

    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = s.q0 + i0 + r;
      const float l = sc.l[r];
      // l == 0: the query sees no key (out 0, lse -inf); l NaN: a NaN score (out, lse NaN)
      p.lse[(s.b * p.H + h) * p.Sq + i] = l == 0.0f ? -kInf : sc.m[r] + std::log(l);
      const float inv = (p.dropout ? p.dropout_scale : 1.0f) / l;
      float* o = sc.o + r * dv16;
      for (int64_t c = 0; c < p.Dv; ++c) o[c] = keep_if(l != 0.0f, o[c] * inv);
      from_f32<T>(o, p.Dv, row_ptr(p.out, p.out_stride, es, s.b, h, i));
    }
  }
};

template <Dtype T>
void run_tasks(const AttentionParams& p, const FwdPacking& pk, const FwdTask* tasks, int64_t num_tasks, int64_t* next,
               const Scratch& sc) {
  for (;;) {
    const int64_t t = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED);
    if (t >= num_tasks) break;
    const FwdTask& task = tasks[t];
    const SeqSpan s = seq_span(p, task.seq);
    const int64_t i0 = int64_t{task.qblock} * BM;
    Task<T>{p,      pk, sc, s, task.seq, task.head, task.head / (p.H / p.Hkv), i0, min64(BM, s.sq - i0),
            pk.dv_pad}
        .run();
  }
}

}  // namespace

template <>
int64_t fwd_scratch_bytes_generic<kPortableBuild>(const AttentionParams& p) {
  return Scratch(nullptr, p.D, round_up(p.Dv, kLanes)).bytes + 64;
}

template <>
void fwd_run_generic<kPortableBuild>(const AttentionParams& p, const FwdPacking& pk, const FwdTask* tasks,
                                     int64_t num_tasks, int64_t* next, void* scratch) {
  char* base = static_cast<char*>(scratch);
  base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
  const Scratch sc(base, p.D, pk.dv_pad);
  FASTARCH_DTYPE_DISPATCH(p.dtype, run_tasks, p, pk, tasks, num_tasks, next, sc)
}

}  // namespace fastarch::cpu::attention

FASTARCH_PORTABLE_END
