// AVX-512 building blocks shared by the CPU kernels' *_avx512.cpp files and the attention
// kernels (attention_common.h): 16 values of a dtype <-> 16 fp32 lanes, exp and sigmoid. Include
// it only after `#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")`,
// that list exactly (it has no pragma of its own, so every includer compiles it with the same
// target and its inline functions stay identical).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "cpu/dtype.h"

namespace fastarch::cpu::avx512 {

enum class Elem { f32, f16, bf16 };

// ------------------------------------------------------------------ 16 values <-> 16 fp32 lanes

// Masked forms touch only the lanes in m (masked-off lanes load as 0.0, are never written); a
// full mask takes the plain instruction (folded away where m is a constant): on AMD's Zen 5
// masked loads from memory ran several times slower than plain ones (the rotary kernel's rows,
// every chunk loaded masked: 2.4x the time in bf16, 2x in fp32; masked stores measured alike).
// stream(): a non-temporal store of a whole chunk, aligned to its size. kBf16Insn: narrow bf16
// with vcvtneps2bf16 (AVX512-BF16), else by hand.
template <Elem E, bool kBf16Insn>
struct Lanes;

constexpr __mmask16 kAll = 0xFFFF;

template <bool kBf16Insn>
struct Lanes<Elem::f32, kBf16Insn> {
  static constexpr int64_t kBytes = 4;
  static __m512 load(const void* p) { return _mm512_loadu_ps(p); }
  static __m512 load(const void* p, __mmask16 m) { return m == kAll ? load(p) : _mm512_maskz_loadu_ps(m, p); }
  static void store(void* p, __m512 v) { _mm512_storeu_ps(p, v); }
  static void store(void* p, __m512 v, __mmask16 m) {
    if (m == kAll) {
      store(p, v);
    } else {
      _mm512_mask_storeu_ps(p, m, v);
    }
  }
  static void stream(void* p, __m512 v) { _mm512_stream_ps(static_cast<float*>(p), v); }
  static __m512 round(__m512 v) { return v; }  // (to the dtype and back)
};

inline __m512 widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

template <bool kBf16Insn>
inline __m256i narrow_bf16(__m512 v) {
  if constexpr (kBf16Insn) {
    return (__m256i)_mm512_cvtneps_pbh(v);  // NOLINT: vector cast
  } else {  // round to nearest even: add 0x7FFF plus the kept lsb, truncate; NaN made quiet
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
  }
}

// The 16-bit types: Convert supplies widen (16 x 16 bits -> fp32) and narrow (round to nearest
// even, as a cast does).
template <typename Convert>
struct Lanes16Bits {
  static constexpr int64_t kBytes = 2;
  static __m512 load(const void* p) { return Convert::widen(_mm256_loadu_si256(static_cast<const __m256i*>(p))); }
  static __m512 load(const void* p, __mmask16 m) {
    return m == kAll ? load(p) : Convert::widen(_mm256_maskz_loadu_epi16(m, p));
  }
  static void store(void* p, __m512 v) { _mm256_storeu_si256(static_cast<__m256i*>(p), Convert::narrow(v)); }
  static void store(void* p, __m512 v, __mmask16 m) {
    if (m == kAll) {
      store(p, v);
    } else {
      _mm256_mask_storeu_epi16(p, m, Convert::narrow(v));
    }
  }
  static void stream(void* p, __m512 v) { _mm256_stream_si256(static_cast<__m256i*>(p), Convert::narrow(v)); }
  static __m512 round(__m512 v) { return Convert::widen(Convert::narrow(v)); }
};

template <bool kBf16Insn>
struct Bf16Convert {
  static __m512 widen(__m256i h) { return widen_bf16(h); }
  static __m256i narrow(__m512 v) { return narrow_bf16<kBf16Insn>(v); }
};

struct F16Convert {
  static __m512 widen(__m256i h) { return _mm512_cvtph_ps(h); }
  static __m256i narrow(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
};

template <bool kBf16Insn>
struct Lanes<Elem::bf16, kBf16Insn> : Lanes16Bits<Bf16Convert<kBf16Insn>> {};
template <bool kBf16Insn>
struct Lanes<Elem::f16, kBf16Insn> : Lanes16Bits<F16Convert> {};

// The lanes of a row kernels' Dtype (cpu/dtype.h; f64 has none: those builds are portable only).
template <Dtype D, bool kBf16Insn>
using LanesOf = Lanes<D == Dtype::bf16 ? Elem::bf16 : D == Dtype::f16 ? Elem::f16 : Elem::f32, kBf16Insn>;

// ------------------------------------------------------------------ math

inline __m512 splat(float v) { return _mm512_set1_ps(v); }

// Polynomials are evaluated by Horner's rule from the highest coefficient.
template <int N>
inline __m512 horner(const float (&c)[N], __m512 x) {
  __m512 p = splat(c[N - 1]);
  for (int k = N - 2; k >= 0; --k) p = _mm512_fmadd_ps(p, x, splat(c[k]));
  return p;
}

// Each approximation comes in two precisions: kLow for 16-bit inputs and outputs (whose half
// ulp is 2e-3 for bf16 and 5e-4 for fp16), where a relative error near 1e-5 is invisible and
// fewer terms are cheaper; full precision for fp32.
//
// exp(x) = 2^(k/16) e^r. k/16 = x log2(e) rounded to a multiple of 1/16 (kSixteenths, below);
// r = x - (k/16) ln 2, |r| <= ln(2)/32, with ln 2 in two parts (x - (k/16) hi, by one fused
// multiply-add, is exact: small, and on the grid of x and of hi's 15 bits over 16) or, for
// kLow, one; 2^((k mod 16)/16) from a 16-entry table; e^r = 1 + r + r^2/2 + r^3/6 (truncation
// < 1e-8 relative), for kLow 1 + r + r^2/2 (1.7e-6); 2^floor(k/16) by vscalefps, which gives
// inf and 0 past fp32's range (x is clamped to [-150, 128] first, so that k stays finite;
// _mm512_min/max_ps(c, x) return x when x is NaN). Measured against exp in double on every
// float of [-150, 128]: fp32 within 1.08 ulp, kLow within 2.1e-6 relative. Eight
// multiply-class instructions where the former degree-7 polynomial took eleven: 3.2 against
// 4.3 ns per vector on one Zen 4 core, which issues one such 512-bit instruction per cycle.
alignas(64) inline constexpr float kExp2Sixteenths[16] = {
    1.0f, 1.0442737340927124f, 1.0905077457427979f, 1.1387885808944702f,
    1.1892070770263672f, 1.2418577671051025f, 1.2968395948410034f, 1.3542555570602417f,
    1.4142135381698608f, 1.4768261909484863f, 1.5422108173370361f, 1.610490322113037f,
    1.6817928552627563f, 1.7562521696090698f, 1.8340080976486206f, 1.9152065515518188f};

// Adding kSixteenths (1.5 * 2^19, whose ulp is 1/16) to y rounds it to a multiple of 1/16 and
// leaves (16 y) mod 16 in the sum's low mantissa bits; subtracting it back gives the rounded y.
constexpr float kSixteenths = 786432.0f;

// 2^(((16 y) mod 16) / 16) for m = y + kSixteenths, from the table (vpermps reads the low four
// bits of each index lane).
inline __m512 two_to_sixteenths(__m512 m) {
  return _mm512_permutexvar_ps(_mm512_castps_si512(m), _mm512_load_ps(kExp2Sixteenths));
}

template <bool kLow>
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(splat(-150.0f), _mm512_min_ps(splat(128.0f), x));
  const __m512 m = _mm512_fmadd_ps(x, splat(1.44269504088896341f), splat(kSixteenths));
  const __m512 k = _mm512_sub_ps(m, splat(kSixteenths));  // k/16
  __m512 r;
  if constexpr (kLow) {
    r = _mm512_fnmadd_ps(k, splat(0.693147180559945309f), x);
  } else {
    r = _mm512_fnmadd_ps(k, splat(0.693145751953125f), x);  // ln 2 = hi + lo, hi exact in 15 bits
    r = _mm512_fnmadd_ps(k, splat(1.42860682030941723212e-6f), r);
  }
  const __m512 t = two_to_sixteenths(m);
  const __m512 tr = _mm512_mul_ps(t, r);
  __m512 q = kLow ? splat(0.5f) : _mm512_fmadd_ps(r, splat(1.0f / 6), splat(0.5f));
  q = _mm512_fmadd_ps(q, r, splat(1.0f));  // e^r = 1 + r q
  return _mm512_scalef_ps(_mm512_fmadd_ps(tr, q, t), k);
}

// exp2_low(x) = 2^x to 1.8e-6 relative, for 16-bit results (bf16/fp16 attention's
// probabilities): k/16 = x rounded to a multiple of 1/16 by kSixteenths, as in exp_ps, f =
// x - k/16 (exact, |f| <= 1/32), 2^(k/16) from the same table, 2^f = 1 + f (ln 2 + f ln^2 2 / 2).
// Four multiply-class instructions. 2^x = 0 for x < -200 (and -inf), NaN stays NaN (the clamp's
// second operand).
inline __m512 exp2_low(__m512 x) {
  x = _mm512_max_ps(splat(-200.0f), x);
  const __m512 m = _mm512_add_ps(x, splat(kSixteenths));
  const __m512 k = _mm512_sub_ps(m, splat(kSixteenths));
  const __m512 f = _mm512_sub_ps(x, k);
  const __m512 t = two_to_sixteenths(m);
  const __m512 q = _mm512_fmadd_ps(f, splat(0.240226506959100712f), splat(0.693147180559945309f));
  return _mm512_scalef_ps(_mm512_fmadd_ps(_mm512_mul_ps(t, f), q, t), k);
}

// sigmoid(v) and 1 - sigmoid(v), each without cancellation: 1 - s = e s with e = exp(-v) where
// e < 1, the subtraction where s <= 1/2 (e there may be inf, and e s NaN).
struct Sigmoid {
  __m512 s, one_minus_s;
};
template <bool kLow>
inline Sigmoid sigmoid(__m512 v) {
  const __m512 e = exp_ps<kLow>(_mm512_sub_ps(_mm512_setzero_ps(), v));
  const __m512 s = _mm512_div_ps(splat(1.0f), _mm512_add_ps(splat(1.0f), e));
  const __mmask16 small = _mm512_cmp_ps_mask(e, splat(1.0f), _CMP_LT_OQ);
  return {s, _mm512_mask_blend_ps(small, _mm512_sub_ps(splat(1.0f), s), _mm512_mul_ps(e, s))};
}


}  // namespace fastarch::cpu::avx512
