// The portable CPU kernels' building blocks (cpu/portable.h), for the target of the build that
// includes them: an exp in fp32 written so that loops of it vectorize, and fp32 vectors (GCC
// vector types of one register: 8 lanes in the AVX2 build, 4 on the baseline) with loads,
// stores, conversions from and to the 16-bit types, a broadcast and a multiply-add that is fused
// in the AVX2 build.
//
// Like attention_generic.h, it opens its own FASTARCH_PORTABLE_BEGIN after its includes and
// gives its functions internal linkage, so that each build compiles and keeps its own copy.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include <type_traits>

#include "cpu/portable.h"
#if defined(__x86_64__)
#include <immintrin.h>  // (SSE2 on the baseline, AVX2 and FMA in its build)
#endif

FASTARCH_PORTABLE_BEGIN

namespace fastarch::cpu::portable {
namespace {

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

// a * b + c: fused (one rounding, vfmadd, vectorized with the loop around it) in the AVX2 build;
// a product and a sum on the baseline, which has no fused multiply-add.
inline float madd_f32(float a, float b, float c) {
#ifdef FASTARCH_PORTABLE_AVX2
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
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
  const float t = madd_f32(x, kLog2e, kShift);
  const float n = t - kShift;  // exact: round(x log2 e)
  uint32_t tb;
  std::memcpy(&tb, &t, 4);
  const uint32_t pow2_bits = (tb - 0x4B400000u + 127u) << 23;  // 2^n, n in [-126, 127]
  float pow2;
  std::memcpy(&pow2, &pow2_bits, 4);
  float r = madd_f32(n, -0.693359375f, x);  // ln2 high part: n * hi is exact
  r = madd_f32(n, 2.12194440e-4f, r);       // ln2 low part
  float y = 1.0f / 5040;
  y = madd_f32(y, r, 1.0f / 720);
  y = madd_f32(y, r, 1.0f / 120);
  y = madd_f32(y, r, 1.0f / 24);
  y = madd_f32(y, r, 1.0f / 6);
  y = madd_f32(y, r, 0.5f);
  y = madd_f32(y, r, 1.0f);
  y = madd_f32(y, r, 1.0f);
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

// ----------------------------------------------------------------------------- fp16 values

// fp16 <-> fp32 without branches (c10::Half's conversions branch per value, which keeps the
// loops around them scalar: ~8x slower than PyTorch's own fp16 kernels at level avx2). Both
// exact / round to nearest even, with inf and NaN kept; they rely on IEEE fp32 arithmetic with
// denormals.
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Selections by mask rather than ?:, which the compiler may turn into branches (and then
// leaves the loop scalar).
inline uint32_t all_ones_if(bool c) { return 0u - static_cast<uint32_t>(c); }
inline uint32_t select(bool c, uint32_t a, uint32_t b) { return (a & all_ones_if(c)) | (b & ~all_ones_if(c)); }

inline float half_to_float(uint16_t h) {
  const uint32_t magnitude = h & 0x7FFFu;
  // The fp16 exponent and mantissa placed in an fp32's, rebiased (127 - 15) by multiplying by
  // 2^112: exact for normal and subnormal halves alike.
  uint32_t u = float_bits(bits_float(magnitude << 13) * 0x1p112f);
  u |= all_ones_if(magnitude >= 0x7C00u) & 0x7F800000u;  // inf and NaN: the exponent all ones
  return bits_float(u | (uint32_t(h & 0x8000u) << 16));
}

inline uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // Below 2^-14 (fp16 subnormals): adding 0.5 makes the fp32 ulp 2^-24, fp16's subnormal
  // step, so the FPU rounds to nearest even and the low bits of the sum count the steps.
  const uint32_t small = float_bits(bits_float(a) + 0.5f) - 0x3F000000u;
  // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even; a
  // carry runs into the exponent, up to inf (0x7C00) from 65520 on.
  const uint32_t normal = (a + (uint32_t(15 - 127) << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  uint32_t h = select(a < 0x38800000u, small, normal);
  h = select(a >= 0x47800000u, 0x7C00u, h);  // 65536 and up: inf
  h = select(a > 0x7F800000u, 0x7E00u, h);   // NaN (quiet)
  return static_cast<uint16_t>(h | sign);
}

// One value of T (float, double, c10::BFloat16, c10::Half) in the accumulation type and back
// (rounded to nearest even, NaN kept), in code the loops around it vectorize: fp16 through the
// conversions above.
template <typename T>
inline auto widen(T v) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return half_to_float(v.x);
  } else if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return static_cast<float>(v);
  }
}
template <typename T, typename Acc>
inline T narrow(Acc v) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return c10::Half(float_to_half(v), c10::Half::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

// ----------------------------------------------------------------------------- vectors

// One register of fp32 lanes as a GCC vector type: 8 lanes (ymm) in the AVX2 build, 4 (SSE2 xmm
// or NEON q) on the baseline.
constexpr int kVecLanes = kPortableBuild == Isa::avx2 ? 8 : 4;
typedef float Vec __attribute__((vector_size(4 * kVecLanes)));

inline Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store_vec(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
// v in every lane: one broadcast (Vec{} + v would add, and turn -0 into +0).
inline Vec splat(float v) {
#ifdef FASTARCH_PORTABLE_AVX2
  return Vec{v, v, v, v, v, v, v, v};
#else
  return Vec{v, v, v, v};
#endif
}

// acc + a * b: one rounding (vfmadd) in the AVX2 build; a product and a sum on the baseline
// (no fused multiply-add there, and the build contracts nothing: -ffp-contract=off).
inline Vec madd(Vec a, Vec b, Vec acc) {
#ifdef FASTARCH_PORTABLE_AVX2
  return (Vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)acc);
#else
  return acc + a * b;
#endif
}

// The sum of the N * kVecLanes lanes of acc (N a power of two), as a tree of halves (lane l +=
// lane l + h, h = half the lanes, then a quarter, ...): a fixed order, the same in both builds.
// While h spans whole vectors the halves are vector additions (vector i += vector i + N / 2);
// within the last vector, the AVX2 build adds its 128-bit halves, then lanes 2-3 onto 0-1,
// then lane 1 onto 0, in registers (the tree's additions; a pass through memory cost the
// portable norms a tenth of their time in store-forwarding stalls).
template <int N>
inline float tree_sum(const Vec (&acc)[N]) {
  static_assert(N > 0 && (N & (N - 1)) == 0, "tree_sum: N must be a power of two");
  Vec v[N];
  for (int i = 0; i < N; ++i) v[i] = acc[i];
  for (int n = N; n > 1; n /= 2)
    for (int i = 0; i < n / 2; ++i) v[i] += v[i + n / 2];
#ifdef FASTARCH_PORTABLE_AVX2
  __m128 x = _mm_add_ps(_mm256_castps256_ps128((__m256)v[0]), _mm256_extractf128_ps((__m256)v[0], 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));  // lanes 0, 1 += lanes 2, 3
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));  // lane 0 += lane 1
  return _mm_cvtss_f32(x);
#else
  float lane[kVecLanes];
  std::memcpy(lane, &v[0], sizeof lane);
  for (int h = kVecLanes / 2; h > 0; h /= 2)
    for (int l = 0; l < h; ++l) lane[l] += lane[l + h];
  return lane[0];
#endif
}

// The lanes of one vector, as tree_sum adds them.
inline float tree_sum(Vec v) {
  const Vec one[1] = {v};
  return tree_sum(one);
}

// kVecLanes values of T (float, c10::BFloat16, c10::Half) as fp32, and back (rounded to nearest
// even, NaN kept: what a cast does).
typedef uint16_t Bits16 __attribute__((vector_size(2 * kVecLanes)));
typedef uint32_t Bits32 __attribute__((vector_size(4 * kVecLanes)));

template <typename T>
inline Vec load_f32(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load_vec(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
#ifdef FASTARCH_PORTABLE_AVX2
    // one widening load and a shift: GCC builds the vector code's widening below from two xmm
    // halves and an insert, which the AVX2 attention decode's profile showed as its hottest lines
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return (Vec)_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
#else
    Bits16 h;
    std::memcpy(&h, p, sizeof h);
    const Bits32 w = __builtin_convertvector(h, Bits32) << 16;
    Vec v;
    std::memcpy(&v, &w, sizeof v);
    return v;
#endif
  } else {
#ifdef FASTARCH_PORTABLE_AVX2
    return (Vec)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));  // F16C
#else
    float f[kVecLanes];
    for (int i = 0; i < kVecLanes; ++i) f[i] = static_cast<float>(p[i]);
    return load_vec(f);
#endif
  }
}

// v rounded to T (to nearest even, NaN kept: what a cast does) and kept as fp32 lanes: store_f32
// then load_f32 without the trip through memory (float: v). store_exact / stream_exact write
// such a v, which T holds exactly, with no rounding left to do; store_f32 / stream_f32 are
// round_to, then store_exact / stream_exact.
template <typename T>
inline Vec round_to(Vec v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
#ifdef FASTARCH_PORTABLE_AVX2
    const __m256i u = _mm256_castps_si256((__m256)v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
    const __m256i rounded = _mm256_and_si256(sum, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps((__m256)v, (__m256)v, _CMP_UNORD_Q));
    return (Vec)_mm256_castsi256_ps(_mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC00000), nan));
#else
    Bits32 u;
    std::memcpy(&u, &v, sizeof u);
    const Bits32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    const Bits32 nan = (Bits32)(v != v);  // all ones in a NaN lane
    const Bits32 bits = (rounded & ~nan) | (0x7FC00000u & nan);
    Vec out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
#endif
  } else {
#ifdef FASTARCH_PORTABLE_AVX2
    return (Vec)_mm256_cvtph_ps(_mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    float f[kVecLanes];
    store_vec(f, v);
    for (int i = 0; i < kVecLanes; ++i) f[i] = half_to_float(float_to_half(f[i]));
    return load_vec(f);
#endif
  }
}

#ifdef FASTARCH_PORTABLE_AVX2
// The bf16 bits of a v that bf16 holds exactly (round_to's), in one xmm: the high half of each
// lane, narrowed by packus in one instruction (GCC builds the vector code's narrowing from
// shuffles).
inline __m128i exact_bf16_bits(Vec v) {
  const __m256i high = _mm256_srli_epi32(_mm256_castps_si256((__m256)v), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
}
#endif

template <typename T>
inline void store_exact(T* p, Vec v) {
  if constexpr (std::is_same_v<T, float>) {
    store_vec(p, v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
#ifdef FASTARCH_PORTABLE_AVX2
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), exact_bf16_bits(v));
#else
    Bits32 u;
    std::memcpy(&u, &v, sizeof u);
    const Bits16 h = __builtin_convertvector(u >> 16, Bits16);
    std::memcpy(p, &h, sizeof h);
#endif
  } else {
#ifdef FASTARCH_PORTABLE_AVX2
    const __m128i h = _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // F16C
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
#else
    float f[kVecLanes];
    store_vec(f, v);
    for (int i = 0; i < kVecLanes; ++i) p[i] = static_cast<T>(f[i]);
#endif
  }
}

template <typename T>
inline void store_f32(T* p, Vec v) {
  store_exact(p, std::is_same_v<T, c10::Half> ? v : round_to<T>(v));  // (fp16: one rounding instruction)
}

// n values of T as fp32 into dst, and back: a vector at a time (load_f32 / store_f32: one F16C
// instruction per vector for fp16 in the AVX2 build), the tail value by value (widen / narrow).
template <typename T>
inline void widen_n(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kVecLanes <= n; i += kVecLanes) store_vec(dst + i, load_f32(src + i));
  for (; i < n; ++i) dst[i] = widen(src[i]);
}
template <typename T>
inline void narrow_n(const float* src, T* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kVecLanes <= n; i += kVecLanes) store_f32(dst + i, load_vec(src + i));
  for (; i < n; ++i) dst[i] = narrow<T>(src[i]);
}

// store_exact / store_f32 with a streaming (non-temporal) store where the build has one for T,
// for outputs too large to stay in cache (cpu/isa.h's stream_output): no read for ownership of
// the line, and the inputs stay cached. p aligned to the whole store (16 values' worth is
// enough); the writer calls stream_fence() before others read.
template <typename T>
inline void stream_exact(T* p, Vec v) {
#if defined(FASTARCH_PORTABLE_AVX2)
  if constexpr (std::is_same_v<T, float>) return _mm256_stream_ps(p, (__m256)v);
  if constexpr (std::is_same_v<T, c10::BFloat16>) return _mm_stream_si128(reinterpret_cast<__m128i*>(p), exact_bf16_bits(v));
#elif defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) return _mm_stream_ps(p, (__m128)v);
#endif
  store_exact(p, v);
}

template <typename T>
inline void stream_f32(T* p, Vec v) {
  stream_exact(p, std::is_same_v<T, c10::Half> ? v : round_to<T>(v));  // (as store_f32)
}

inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

}  // namespace
}  // namespace fastarch::cpu::portable

FASTARCH_PORTABLE_END
