// What the portable CPU attention kernels (attention_{fwd,bwd,decode}_generic.cpp) are built of:
// conversions to and from fp32, an exp, lane-wise reductions (plain C++ loops shaped for the
// compiler's auto-vectorizer) and a small fp32 GEMM on register tiles of GCC vectors, for the
// target the build has: the baseline (SSE2 on x86-64, NEON on aarch64) or AVX2 + FMA
// (cpu/portable.h). Every product and sum is fp32, whatever the inputs.
//
// Its functions are compiled for the build's target (its own FASTARCH_PORTABLE_BEGIN, after its
// includes) and have internal linkage (an unnamed namespace): each build keeps its own copy, and
// neither's can stand in for the other's at link time.
//
// The build has no -ffast-math (and -ffp-contract=off), so GCC vectorizes no loop that reduces
// into one scalar (that would reorder the sum): the reductions (row max, row sum, dot products)
// run in partial lanes held in vectors, added up in a fixed order, and the products' sums over
// K run in order within each lane of a register tile.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "attention_common.h"
#include "cpu/portable.h"
#include "cpu/portable_math.h"

FASTARCH_PORTABLE_BEGIN

namespace fastarch::cpu::attention::generic {
namespace {

using namespace portable;

// Partial lanes of the reductions: a multiple of any vector width up to 512 bits of fp32.
constexpr int64_t kLanes = 16;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

// ----------------------------------------------------------------------------- conversions

// The C++ element type of T (what portable_math.h's load_f32 and store_f32 take).
template <Dtype T>
struct Elem {
  using type = float;
};
template <>
struct Elem<Dtype::bf16> {
  using type = c10::BFloat16;
};
template <>
struct Elem<Dtype::f16> {
  using type = c10::Half;
};

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

// ----------------------------------------------------------------------------- reductions

// The kLanes partial lanes of the reductions, in kLanes / kVecLanes vectors.
constexpr int kRedVecs = kLanes / kVecLanes;

// max of x[0, n) ignoring NaN (-inf when every value is -inf or NaN); n a multiple of kLanes.
inline float max_lanes(const float* __restrict x, int64_t n) {
  Vec acc[kRedVecs];
  for (int v = 0; v < kRedVecs; ++v) acc[v] = splat(-__builtin_inff());
  for (int64_t j = 0; j < n; j += kLanes)
    for (int v = 0; v < kRedVecs; ++v) {
      const Vec xv = load_vec(x + j + v * kVecLanes);
      acc[v] = xv > acc[v] ? xv : acc[v];  // (a NaN compares false: never taken)
    }
  float lane[kLanes];
  std::memcpy(lane, acc, sizeof lane);
  for (int h = kLanes / 2; h > 0; h /= 2)
    for (int l = 0; l < h; ++l) lane[l] = lane[l + h] > lane[l] ? lane[l + h] : lane[l];
  return lane[0];
}

// sum of x[0, n) (kLanes partial sums, then tree_sum: a fixed order); n a multiple of kLanes.
inline float sum_lanes(const float* __restrict x, int64_t n) {
  Vec acc[kRedVecs] = {};
  for (int64_t j = 0; j < n; j += kLanes)
    for (int v = 0; v < kRedVecs; ++v) acc[v] += load_vec(x + j + v * kVecLanes);
  return tree_sum(acc);
}

// ----------------------------------------------------------------------------- GEMM

// sum over d of a[d] b[d], n values: kVecLanes partial sums (fused multiply-adds in the AVX2
// build), the rest in order, then the lanes as a tree of halves.
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  Vec acc = {};
  int64_t d = 0;
  for (; d + kVecLanes <= n; d += kVecLanes) acc = madd(load_vec(a + d), load_vec(b + d), acc);
  if (d < n) {  // the rest into the lanes, in order
    float lane[kVecLanes];
    std::memcpy(lane, &acc, sizeof lane);
    for (int k = 0; d < n; ++d, ++k) lane[k] += a[d] * b[d];
    acc = load_vec(lane);
  }
  return tree_sum(acc);
}

// The register tile: kMR rows x kNR columns of C, two vectors a row: 6 x 16 in the AVX2 build
// (12 of its 16 ymm registers), 4 x 8 on the baseline (8 of 16). Each step of K loads two
// vectors of B and broadcasts kMR values of A.
constexpr int kNV = 2;
constexpr int kMR = kPortableBuild == Isa::avx2 ? 6 : 4;
constexpr int kNR = kNV * kVecLanes;

// Rows [0, MR) x columns [0, kNR) of C = A B, or C + A B (kAcc). The sum over K runs in order,
// as every row of C in every build.
template <int MR, bool kAcc>
inline void gemm_tile(int64_t K, const float* __restrict a, int64_t lda, const float* __restrict b, int64_t ldb,
                      float* __restrict c, int64_t ldc) {
  Vec acc[MR][kNV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < kNV; ++v) acc[r][v] = kAcc ? load_vec(c + r * ldc + kVecLanes * v) : Vec{};
  for (int64_t p = 0; p < K; ++p) {
    Vec bv[kNV];
    for (int v = 0; v < kNV; ++v) bv[v] = load_vec(b + p * ldb + kVecLanes * v);
    for (int r = 0; r < MR; ++r) {
      const Vec x = splat(a[r * lda + p]);
      for (int v = 0; v < kNV; ++v) acc[r][v] = madd(x, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < kNV; ++v) store_vec(c + r * ldc + kVecLanes * v, acc[r][v]);
}

// The last `left` rows (0 < left < kMR) as one tile of that many rows.
template <int R, bool kAcc>
inline void gemm_rows_left(int64_t left, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb,
                           float* c, int64_t ldc) {
  if constexpr (R > 0) {
    if (left == R) return gemm_tile<R, kAcc>(K, a, lda, b, ldb, c, ldc);
    gemm_rows_left<R - 1, kAcc>(left, K, a, lda, b, ldb, c, ldc);
  }
}

// Columns [0, kNR) of C (M rows): whole tiles, then the rows left over.
template <bool kAcc>
void gemm_panel(int64_t M, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                int64_t ldc) {
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR) gemm_tile<kMR, kAcc>(K, a + m * lda, lda, b, ldb, c + m * ldc, ldc);
  if (m < M) gemm_rows_left<kMR - 1, kAcc>(M - m, K, a + m * lda, lda, b, ldb, c + m * ldc, ldc);
}

// Columns [0, n) of C, n < kNR (a panel's remainder): one row at a time, C row += a * B row.
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
// lda, ldb, ldc); C must not overlap A or B. N a multiple of kNR (16 covers both builds) runs
// only register tiles.
template <bool kAcc>
inline void gemm_t(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                   int64_t ldc) {
  int64_t n = 0;
  for (; n + kNR <= N; n += kNR) gemm_panel<kAcc>(M, K, a, lda, b + n, ldb, c + n, ldc);
  if (n < N) gemm_narrow<kAcc>(M, N - n, K, a, lda, b + n, ldb, c + n, ldc);
}

// C (M x N) = A B, or C + A B (kAcc), with B packed in column panels (panel_index):
// columns [j kNR, (j + 1) kNR) of B are K rows of kNR values, contiguous, at b + j * panel_stride
// (panel_stride >= K kNR). N a multiple of kNR. Each tile then reads its B panel in order, where
// a row-major B of 128 or 64 floats a row had its K rows a power of two apart: they shared a
// few of L1's sets, which the A rows and C stores then evicted (Zen 4 at level avx2: the
// products alone 0-12% faster on panels, the attention's ratios to SDPA 1-23% higher in
// side-by-side runs; bench/portable_gemm.cpp, README). The same sums in the same order as gemm_t.
template <bool kAcc>
inline void gemm_panels(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b,
                        int64_t panel_stride, float* c, int64_t ldc) {
  for (int64_t n = 0; n < N; n += kNR) gemm_panel<kAcc>(M, K, a, lda, b + n / kNR * panel_stride, kNR, c + n, ldc);
}

// Where element (k, n) of a B packed in panels of panel_stride floats sits (gemm_panels).
inline int64_t panel_index(int64_t k, int64_t n, int64_t panel_stride) {
  return n / kNR * panel_stride + k * kNR + n % kNR;
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

// The online-softmax step of rows [0, rows) at once, as softmax_step_row does each: row r's
// logits at z + r * ldz, its state m[r], l[r] and accumulators o + r * ldo; a row with seen[r]
// false is left as it is. The rows' new maxima and rescale factors come first, in one pass over
// the rows that the compiler vectorizes (its exp included), then each row's exp and sum.
// base, alpha: scratch of `rows` floats.
inline void softmax_step_rows(float* __restrict z, int64_t ldz, const uint8_t* seen, int64_t rows, int64_t n,
                              float* __restrict m, float* __restrict l, float* __restrict o, int64_t ldo,
                              int64_t width, float* __restrict base, float* __restrict alpha) {
  for (int64_t r = 0; r < rows; ++r) base[r] = seen[r] ? max_lanes(z + r * ldz, n) : -__builtin_inff();
  for (int64_t r = 0; r < rows; ++r) {
    const float m_new = base[r] > m[r] ? base[r] : m[r];
    const float b = m_new == -__builtin_inff() ? 0.0f : m_new;
    alpha[r] = exp_f32(m[r] - b);  // 0 when m was -inf
    base[r] = b;
    m[r] = m_new;  // (an unseen row's max does not move)
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (!seen[r]) continue;
    float* __restrict zr = z + r * ldz;
    for (int64_t j = 0; j < n; ++j) zr[j] = exp_f32(zr[j] - base[r]);
    l[r] = l[r] * alpha[r] + sum_lanes(zr, n);
    if (alpha[r] != 1.0f)
      for (int64_t c = 0; c < width; ++c) o[r * ldo + c] *= alpha[r];
  }
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

}  // namespace
}  // namespace fastarch::cpu::attention::generic

FASTARCH_PORTABLE_END
