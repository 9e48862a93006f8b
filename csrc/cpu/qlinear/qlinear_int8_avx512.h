// The unpacking of GGUF blocks into unsigned byte codes that the AVX-512 int8 kernels share
// (qlinear_int8_avx512.cpp, a few rows of x; qlinear_int8_gemm_avx512.cpp, a prefill's many):
// every format's value is a (u - o) or a u + b for a group of 16 or 32 values sharing a scale a
// (and a min b, or a fixed offset o), u an unsigned byte code; a Chunk holds 64 codes in x's
// order with the scale (and min) of each of its 16 lanes of 4 values. Include after the
// target pragma of qlinear_avx512.cpp, cpu/avx512_math.h and qlinear_avx512.h (internal
// linkage: each file keeps its own copy).
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "qlinear.h"
#include "qlinear_int8_x86.h"  // iq4_xs_steps

#define FASTARCH_VNNI __attribute__((target("avx512vnni"), always_inline)) inline

namespace fastarch::cpu {
namespace {

// log2 of the offset o of a format whose values are a (u - o); -1 for those with a min b.
template <Quant Q>
constexpr int kOffsetShift = Q == Quant::q4_0 ? 3 : Q == Quant::q5_0 ? 4 : Q == Quant::q6_k ? 5
                           : Q == Quant::q8_0 || Q == Quant::iq4_nl || Q == Quant::iq4_xs ? 7 : -1;
// The formats with a min b per 32 values applied by lane (the 32-value Q4_1 and Q5_1).
template <Quant Q>
constexpr bool kLaneMins = Q == Quant::q4_1 || Q == Quant::q5_1;

// 64 codes (zmm bytes) with each lane's a, and b where the format has lane mins.
struct Chunk {
  __m512i codes;
  __m512 a, b;
};

// Lane l of 16 takes element lo for l < 8, else hi.
inline __m512i halves(int lo, int hi) {
  return _mm512_setr_epi32(lo, lo, lo, lo, lo, lo, lo, lo, hi, hi, hi, hi, hi, hi, hi, hi);
}

// [A, A, B, B] of two 16-byte runs of 4-bit values, each copy's low (A, B) or high nibbles
// (the second): a block's 32 values in order, then the other's.
__attribute__((always_inline)) inline __m512i nibble_pair(const uint8_t* a, const uint8_t* b) {
  const __m256i y = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a))),
                                            _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)), 1);
  __m512i z = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3), _mm512_castsi256_si512(y));
  z = _mm512_mask_srli_epi16(z, 0xFF00FF00u, z, 4);
  return _mm512_and_si512(z, _mm512_set1_epi8(0x0F));
}

// IQ4's 16 levels + 128 as codes, in each 128-bit lane (vpshufb's table).
inline __m512i iq4_codes() {
  alignas(16) int8_t t[16];
  for (int i = 0; i < 16; ++i) t[i] = static_cast<int8_t>(static_cast<int>(kIq4Levels[i]) + 128);
  return _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}

// Blocks A and B (of 32 values; B may be kZeroBlock) as one chunk.
alignas(64) constexpr uint8_t kZeroBlock[64] = {};

template <Quant Q>
__attribute__((always_inline)) inline Chunk pair_chunk(const uint8_t* A, const uint8_t* B) {
  constexpr bool kMin = kLaneMins<Q>, kFive = Q == Quant::q5_0 || Q == Quant::q5_1;
  Chunk c;
  uint32_t ha, hb;  // d (and m): the first 4 bytes
  std::memcpy(&ha, A, 4);
  std::memcpy(&hb, B, 4);
  const __m512 dm = _mm512_castps128_ps512(
      _mm_cvtph_ps(_mm_setr_epi32(static_cast<int>(ha), static_cast<int>(hb), 0, 0)));  // dA, mA, dB, mB
  c.a = _mm512_permutexvar_ps(halves(0, 2), dm);
  if constexpr (kMin) c.b = _mm512_permutexvar_ps(halves(1, 3), dm);
  if constexpr (Q == Quant::q8_0) {
    const __m512i q = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + 2))),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + 2)), 1);
    c.codes = _mm512_xor_si512(q, _mm512_set1_epi8(static_cast<char>(0x80)));
  } else {
    constexpr int kQs = (kMin ? 4 : 2) + (kFive ? 4 : 0);
    c.codes = nibble_pair(A + kQs, B + kQs);
    if constexpr (kFive) {  // bit j of each block's u32: value j's fifth bit
      uint32_t qa, qb;
      std::memcpy(&qa, A + kQs - 4, 4);
      std::memcpy(&qb, B + kQs - 4, 4);
      const __mmask64 fifth = _cvtu64_mask64(static_cast<uint64_t>(qa) | (static_cast<uint64_t>(qb) << 32));
      c.codes = _mm512_mask_add_epi8(c.codes, fifth, c.codes, _mm512_set1_epi8(16));
    } else if constexpr (Q == Quant::iq4_nl) {
      c.codes = _mm512_shuffle_epi8(iq4_codes(), c.codes);
    }
  }
  return c;
}

// Q6_K: a super-block's 16 scales d sc (a group of 16 values each), and the codes u of its chunk
// c (values 64c .. 64c + 63; ql's bytes 64 (c / 2) .., their low nibbles for even c, high for
// odd, the 2 high bits from qh's bytes 128 + 32 (c / 2) ..: bits 2c' .. for the first 32
// values, 2c' + 2 .. for the next, c' = c % 2 times 2), and the lanes' groups (4 lanes each).
__attribute__((always_inline)) inline __m512 q6_scales(const uint8_t* blk) {
  return _mm512_mul_ps(
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)))),
      _mm512_set1_ps(half_at(blk + 208)));
}
__attribute__((always_inline)) inline __m512i q6_codes(const uint8_t* blk, int c) {
  const int n = c / 2, g = c % 2;
  const __m512i ql = _mm512_loadu_si512(blk + 64 * n);
  const __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * n)));
  const __m512i lo = _mm512_and_si512(g ? _mm512_srli_epi16(ql, 4) : ql, _mm512_set1_epi8(0x0F));
  // the 2 high bits to bits 4-5: qh bits 4g, 4g + 1 (first 32 values), 4g + 2, 4g + 3 (next)
  const __m512i t = g ? _mm512_mask_srli_epi16(h, 0xFFFF0000u, h, 2)
                      : _mm512_mask_slli_epi16(_mm512_slli_epi16(h, 4), 0xFFFF0000u, h, 2);
  return _mm512_ternarylogic_epi32(lo, t, _mm512_set1_epi8(0x30), 0xF8);
}
inline __m512i q6_groups(int c) {
  const int s = 4 * c;  // the chunk's first group of 16
  return _mm512_setr_epi32(s, s, s, s, s + 1, s + 1, s + 1, s + 1, s + 2, s + 2, s + 2, s + 2, s + 3, s + 3, s + 3, s + 3);
}

// A super-block's four chunks: fn(p, chunk) for values 64p .. 64p + 63; Q4_K and Q5_K also
// give mins(dmin m of the 8 sub-blocks) first.
template <Quant Q, typename Fn, typename Mins>
FASTARCH_VNNI void k_chunks(const uint8_t* blk, Fn&& fn, Mins&& mins) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  if constexpr (Q == Quant::q4_k || Q == Quant::q5_k) {
    alignas(64) float s[16];
    k_scales(blk, s);
    mins(_mm256_load_ps(s + 8));
    const __m512 a8 = _mm512_castps256_ps512(_mm256_load_ps(s));
    const uint8_t* qs = blk + (Q == Quant::q5_k ? 48 : 16);
    __m512i h = _mm512_setzero_si512();
    if constexpr (Q == Quant::q5_k) {  // upper half: bit 2p + 1 of qh[l] moved to 2p
      h = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16)));
      h = _mm512_mask_srli_epi16(h, 0xFFFF0000u, h, 1);
    }
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {  // sub-blocks 2p (low nibbles of 32 bytes) and 2p + 1 (high)
      __m512i q = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * p)));
      q = _mm512_and_si512(_mm512_mask_srli_epi16(q, 0xFFFF0000u, q, 4), low4);
      if constexpr (Q == Quant::q5_k) {  // bit 2p to bit 4: q | (t & 0x10)
        const __m512i t = p == 0 ? _mm512_slli_epi16(h, 4) : p == 1 ? _mm512_slli_epi16(h, 2)
                        : p == 2 ? h : _mm512_srli_epi16(h, 2);
        q = _mm512_ternarylogic_epi32(q, t, _mm512_set1_epi8(0x10), 0xF8);
      }
      fn(p, Chunk{q, _mm512_permutexvar_ps(halves(2 * p, 2 * p + 1), a8), {}});
    }
  } else if constexpr (Q == Quant::q6_k) {
    const __m512 a16 = q6_scales(blk);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) fn(c, Chunk{q6_codes(blk, c), _mm512_permutexvar_ps(q6_groups(c), a16), {}});
  } else {  // IQ4_XS: sub-block c's step d (ls_c - 32)
    const __m256 a8 = iq4_xs_steps(blk, half_at(blk));
    const __m512i table = iq4_codes();
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const uint8_t* qs = blk + 8 + 32 * p;
      fn(p, Chunk{_mm512_shuffle_epi8(table, nibble_pair(qs, qs + 16)),
                  _mm512_permutexvar_ps(halves(2 * p, 2 * p + 1), _mm512_castps256_ps512(a8)), {}});
    }
  }
}

}  // namespace
}  // namespace fastarch::cpu
