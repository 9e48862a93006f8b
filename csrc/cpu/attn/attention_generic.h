// What the portable CPU attention kernels (attention_{fwd,bwd,decode}_generic.cpp) are built of:
// conversions to and from fp32, an exp, lane-wise reductions and a small fp32 GEMM, all plain
// C++ loops shaped for the compiler's auto-vectorizer at whatever -march the build uses (SSE2
// on baseline x86-64, NEON on aarch64). Every product and sum is fp32, whatever the inputs.
//
// The build has no -ffast-math (and -ffp-contract=off), so GCC vectorizes no loop that reduces
// into one scalar (that would reorder the sum): the kernels compute elementwise over whole
// rows (axpy form: C row += a * B row), and the reductions they need (row max, row sum) run
// over kLanes partial lanes, each an elementwise update.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "attention_common.h"

namespace fastarch::cpu::attention::generic {

// Partial lanes of the reductions: a multiple of any vector width up to 512 bits of fp32.
constexpr int64_t kLanes = 16;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

// ----------------------------------------------------------------------------- conversions

// Element idx of an array of T as fp32.
template <Dtype T>
inline float value_f32(const void* base, int64_t idx) {
  if constexpr (T == Dtype::f32) {
    return static_cast<const float*>(base)[idx];
  } else if constexpr (T == Dtype::bf16) {
    const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(base)[idx]) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  } else {
    return static_cast<float>(static_cast<const c10::Half*>(base)[idx]);
  }
}

// dst[0, n) = src[0, n) as fp32.
template <Dtype T>
inline void to_f32(const void* src, int64_t n, float* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = value_f32<T>(src, i);
}

// dst[0, n) = src[0, n) rounded to T (to nearest even; NaN stays NaN).
template <Dtype T>
inline void from_f32(const float* __restrict src, int64_t n, void* dst) {
  if constexpr (T == Dtype::f32) {
    std::memcpy(dst, src, n * 4);
  } else if constexpr (T == Dtype::bf16) {
    auto* d = static_cast<c10::BFloat16*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = c10::BFloat16(src[i]);
  } else {
    auto* d = static_cast<c10::Half*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = c10::Half(src[i]);
  }
}

// ----------------------------------------------------------------------------- exp

// cond ? x : 0, as an and with a mask. GCC (its default -ftrapping-math) does not turn a select
// whose arm computes in floating point into branch-free code: it moves the arm's arithmetic
// into a branch (it could trap), and then vectorizes nothing of the loop around it. The mask
// keeps the arithmetic unconditional.
inline float keep_if(bool cond, float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits &= 0u - static_cast<uint32_t>(cond);
  std::memcpy(&x, &bits, 4);
  return x;
}

// exp(x) within 2 ulp of fp32 for -87 <= x <= 88; 0 for x < -87 (where the true value is below
// the smallest normal fp32, which a softmax probability next to its row's maximum 1 cannot
// tell from 0) and for -inf; +inf above 88; NaN for NaN.
// Cody-Waite: x = n ln2 + r, |r| <= ln2/2, with ln2 in two parts; degree-7 polynomial for e^r;
// 2^n built in the exponent bits. n = round(x log2 e) comes from adding 1.5 * 2^23, which
// leaves it in the low mantissa bits: no float -> int conversion (undefined for NaN) and no
// select with arithmetic in its arm, so loops of it vectorize on any target.
inline float exp_f32(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23, bits 0x4B400000
  const float t = x * kLog2e + kShift;
  const float n = t - kShift;  // exact: round(x log2 e)
  uint32_t tb;
  std::memcpy(&tb, &t, 4);
  const uint32_t pow2_bits = (tb - 0x4B400000u + 127u) << 23;  // 2^n, n in [-126, 127]
  float pow2;
  std::memcpy(&pow2, &pow2_bits, 4);
  float r = x - n * 0.693359375f;  // ln2 high part: n * hi is exact
  r = r - n * -2.12194440e-4f;     // ln2 low part
  float y = 1.0f / 5040;
  y = y * r + 1.0f / 720;
  y = y * r + 1.0f / 120;
  y = y * r + 1.0f / 24;
  y = y * r + 1.0f / 6;
  y = y * r + 0.5f;
  y = y * r + 1.0f;
  y = y * r + 1.0f;
  // x < -87: 0 (NaN compares false: stays NaN); x > 88: +inf
  uint32_t e;
  const float value = y * pow2;
  std::memcpy(&e, &value, 4);
  const uint32_t big = 0u - static_cast<uint32_t>(x > 88.0f);
  e = ((e & ~big) | (0x7F800000u & big)) & (0u - static_cast<uint32_t>(!(x < -87.0f)));
  float out;
  std::memcpy(&out, &e, 4);
  return out;
}

// ----------------------------------------------------------------------------- reductions

// max of x[0, n) ignoring NaN (-inf when every value is -inf or NaN); n a multiple of kLanes.
inline float max_lanes(const float* __restrict x, int64_t n) {
  float lane[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = -__builtin_inff();
  for (int64_t j = 0; j < n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = x[j + l] > lane[l] ? x[j + l] : lane[l];
  float m = lane[0];
  for (int64_t l = 1; l < kLanes; ++l) m = lane[l] > m ? lane[l] : m;
  return m;
}

// sum of x[0, n) (in kLanes partial sums: a fixed order); n a multiple of kLanes.
inline float sum_lanes(const float* __restrict x, int64_t n) {
  float lane[kLanes] = {};
  for (int64_t j = 0; j < n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += x[j + l];
  float s = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) s += lane[l];
  return s;
}

// ----------------------------------------------------------------------------- GEMM

// Columns [0, NR) of C (M rows) = A B, or C + A B (kAcc), row by row: a row's NR accumulators
// stay in registers through the whole K loop (the fully unrolled loop over them is what the
// compiler vectorizes) and every row reads the same B panel from L1. The sum over K runs in
// order. NR = 32: 8 vector accumulators of 4 lanes (SSE2, NEON) leave room for B and the
// products in 16 registers; with the accumulators in memory instead (C row += a * B row, the
// textbook vectorizable loop) a load and a store go with every multiply-add, measured 1.4x
// slower on SSE2, and narrower panels (16) lose half their speed with some -march choices
// (GCC 12 then vectorizes across rows or not at all).
// (Not inlined: inside a large caller GCC 12 keeps the accumulators on the stack.)
template <int NR, bool kAcc>
[[gnu::noinline]] void gemm_panel(int64_t M, int64_t K, const float* __restrict a, int64_t lda, const float* __restrict b,
                       int64_t ldb, float* __restrict c, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    float acc[NR];
    for (int j = 0; j < NR; ++j) acc[j] = kAcc ? c[m * ldc + j] : 0.0f;
    const float* am = a + m * lda;
    for (int64_t p = 0; p < K; ++p) {
      const float x = am[p];
      const float* __restrict bp = b + p * ldb;
      for (int j = 0; j < NR; ++j) acc[j] += x * bp[j];
    }
    for (int j = 0; j < NR; ++j) c[m * ldc + j] = acc[j];
  }
}

// Columns [0, n) of C, n < 32 (a panel's remainder): one row at a time, C row += a * B row.
template <bool kAcc>
inline void gemm_narrow(int64_t M, int64_t n, int64_t K, const float* __restrict a, int64_t lda,
                        const float* __restrict b, int64_t ldb, float* __restrict c, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    float* __restrict cm = c + m * ldc;
    if (!kAcc)
      for (int64_t j = 0; j < n; ++j) cm[j] = 0.0f;
    for (int64_t p = 0; p < K; ++p) {
      const float x = a[m * lda + p];
      const float* __restrict bp = b + p * ldb;
      for (int64_t j = 0; j < n; ++j) cm[j] += x * bp[j];
    }
  }
}

// C (M x N) = A (M x K) B (K x N), or C + A B (kAcc); all fp32 and row-major (leading dims
// lda, ldb, ldc); C must not overlap A or B. N a multiple of 32 runs only full panels.
template <bool kAcc>
inline void gemm_t(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                   int64_t ldc) {
  int64_t n = 0;
  for (; n + 32 <= N; n += 32) gemm_panel<32, kAcc>(M, K, a, lda, b + n, ldb, c + n, ldc);
  if (n < N) gemm_narrow<kAcc>(M, N - n, K, a, lda, b + n, ldb, c + n, ldc);
}

inline void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                 int64_t ldc) {
  gemm_t<false>(M, N, K, a, lda, b, ldb, c, ldc);
}
inline void gemm_acc(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb,
                     float* c, int64_t ldc) {
  gemm_t<true>(M, N, K, a, lda, b, ldb, c, ldc);
}

// ----------------------------------------------------------------------------- online softmax

// One row's online-softmax step over a block of n logits z (n a multiple of kLanes; -inf where
// the row does not see the key): z becomes exp(z - m_new), the running sum l and the row's
// output accumulators o[0, width) are rescaled to the new running max m_new, and m = m_new.
// The max ignores NaN, so a NaN logit reaches l (and through the probabilities o) as NaN: the
// row's output and lse come out NaN in every column (the NaN contract). A row that has seen
// only -inf keeps m = -inf, l = 0 (the exponent base is then 0, not -inf - -inf).
inline void softmax_step_row(float* __restrict z, int64_t n, float& m, float& l, float* __restrict o, int64_t width) {
  const float tmax = max_lanes(z, n);
  const float m_new = tmax > m ? tmax : m;
  const float base = m_new == -__builtin_inff() ? 0.0f : m_new;
  const float alpha = exp_f32(m - base);  // 0 when m was -inf
  for (int64_t j = 0; j < n; ++j) z[j] = exp_f32(z[j] - base);
  l = l * alpha + sum_lanes(z, n);
  m = m_new;
  if (alpha != 1.0f)
    for (int64_t c = 0; c < width; ++c) o[c] *= alpha;
}

// ----------------------------------------------------------------------------- dropout

// x[j] = 0 where dropout drops probability (row, col0 + j), j < n (row_key = dropout_row_key).
inline void dropout_zero(float* __restrict x, int64_t n, uint32_t row_key, int64_t col0, uint32_t threshold) {
  const uint32_t c0 = static_cast<uint32_t>(col0);
  for (int64_t j = 0; j < n; ++j) {
    const bool keep = mix32(row_key ^ (c0 + static_cast<uint32_t>(j))) >= threshold;
    x[j] = keep_if(keep, x[j]);
  }
}

}  // namespace fastarch::cpu::attention::generic
