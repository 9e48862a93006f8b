// AVX-512 build of the CPU linear layer on block-quantized weights (qlinear.h).
//
// Each W row is read front to back once per group of up to 8 rows of x: each 32 values of a
// block (a k-quant super-block: eight such chunks) are widened in registers to two vectors of 16
// fp32 values, exactly ggml's dequantized values (Q4_1's d * q + m as one fused multiply-add:
// d * q is exact, so its one rounding is ggml's rounding of the sum), then each row of x takes
// two fused multiply-adds. One or two rows of x keep two sets of accumulators (even and odd
// chunks) so that the additions overlap. The blocks
// are prefetched kPrefetchBytes ahead (see linear_cols.h). The sums of 16 output columns are
// kept and then finished by vector (qlinear_avx512.h).
//
// Compiled for AVX-512 through the target pragma below and called only after a run-time CPU
// check. No torch headers (no inline function of theirs may be emitted with AVX-512 code).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "qlinear.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

#include "cpu/avx512_math.h"
#include "qlinear_avx512.h"

namespace fastarch::cpu {
namespace {

constexpr int64_t kPrefetchBytes = 2048;


// 16 bytes of 4-bit values (byte j: value j low, value j + 16 high), each picked from ``levels``
// by its bits: values 0-15 in lo, 16-31 in hi (vpermps reads an index's low 4 bits only: the
// low nibble needs no mask).
__attribute__((always_inline)) inline void pick_nibbles(const uint8_t* qs, __m512 levels, __m512& lo, __m512& hi) {
  const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  lo = _mm512_permutexvar_ps(q, levels);
  hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), levels);
}

// The d (and m) of n blocks of 32 values from blk on, as fp32 pairs (f[2 i], f[2 i + 1]: block
// i's d and the 2 bytes after it, its m in Q4_1/Q5_1): what block_values reads.
template <Quant Q>
__attribute__((always_inline)) inline void block_factors(const uint8_t* blk, int n, float* f) {
  for (int i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, blk + i * quant_block_bytes(Q), 4);  // (every block is longer than 4 bytes)
    _mm_storel_pi(reinterpret_cast<__m64*>(f + 2 * i), _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(bits))));
  }
}

// Block blk's values 0-15 in lo, 16-31 in hi, as fp32, for the formats of 32-value blocks. The
// 4- and 5-bit formats build the block's 16 (32) levels in one (two) vectors and pick each value
// by its bits: against widening each value to fp32 and scaling it, 1.0-1.16x (Zen 5, 2 threads,
// SmolLM2's projections, in-process A/B). Two W rows at a time against one x row, or
// prefetching 1-8 KB ahead instead of 2, measured alike or slower.
//
// f: the block's d (and m, Q4_1/Q5_1) as fp32 in memory (block_factors): each product and sum
// takes its scalar from there in the instruction, where widening them in registers took three
// shuffles a block, the port the values' shuffles need (Q4_1, one row on one core, in cache:
// 1.12x; AMD EPYC Zen 4, scratch A/B). Exact: d q is exact, so d q + m rounds once, as ggml's.
template <Quant Q>
__attribute__((always_inline)) inline void block_values(const uint8_t* blk, const float* f, __m512& lo, __m512& hi) {
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  constexpr bool kOffset = Q == Quant::q4_1 || Q == Quant::q5_1;  // d, m (else d alone)
  auto levels_of = [&](__m512 q) __attribute__((always_inline)) {  // d q (+ m)
    const __m512 dq = _mm512_mul_ps(q, _mm512_set1_ps(f[0]));
    return kOffset ? _mm512_add_ps(dq, _mm512_set1_ps(f[1])) : dq;
  };
  if constexpr (Q == Quant::q8_0) {
    const __m512i q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
    const __m512i q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18)));
    lo = levels_of(_mm512_cvtepi32_ps(q0));
    hi = levels_of(_mm512_cvtepi32_ps(q1));
  } else if constexpr (Q == Quant::q4_0 || Q == Quant::q4_1 || Q == Quant::iq4_nl) {
    // the block's 16 levels (d q + m, d (q - 8), or d level[q]) in one vector, each value picked from it
    __m512 levels;
    if constexpr (Q == Quant::iq4_nl) {
      levels = levels_of(_mm512_loadu_ps(kIq4Levels));
    } else {
      levels = levels_of(kOffset ? iota : _mm512_sub_ps(iota, _mm512_set1_ps(8)));
    }
    pick_nibbles(blk + (kOffset ? 4 : 2), levels, lo, hi);
  } else if constexpr (Q == Quant::q5_0) {
    // the low 4 bits pick from 16 levels (q - 16) d; a set fifth bit adds 16 d (exact: the sum
    // is a multiple of d within 5 bits). 1.04x the two-vector pick of Q5_1 below (A/B, Zen 5).
    const uint8_t* head = blk + 2;
    uint32_t qh;
    std::memcpy(&qh, head, 4);
    const __m512 step = levels_of(_mm512_set1_ps(16));  // 16 d
    pick_nibbles(head + 4, levels_of(_mm512_sub_ps(iota, _mm512_set1_ps(16))), lo, hi);
    lo = _mm512_mask_add_ps(lo, static_cast<__mmask16>(qh), lo, step);
    hi = _mm512_mask_add_ps(hi, static_cast<__mmask16>(qh >> 16), hi, step);
  } else {  // Q5_1: the 32 levels q d + m (one rounding each) in two vectors; bit j of qh sets
            // value j's index bit 4
    const uint8_t* head = blk + 4;
    uint32_t qh;
    std::memcpy(&qh, head, 4);
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(head + 4)));
    const __m512 levels_lo = levels_of(iota);
    const __m512 levels_hi = levels_of(_mm512_add_ps(iota, _mm512_set1_ps(16)));
    const __m512i sixteen = _mm512_set1_epi32(16);
    const __m512i q_lo = _mm512_and_si512(q, _mm512_set1_epi32(15)), q_hi = _mm512_srli_epi32(q, 4);
    lo = _mm512_permutex2var_ps(levels_lo, _mm512_mask_or_epi32(q_lo, static_cast<__mmask16>(qh), q_lo, sixteen),
                                levels_hi);
    hi = _mm512_permutex2var_ps(levels_lo, _mm512_mask_or_epi32(q_hi, static_cast<__mmask16>(qh >> 16), q_hi, sixteen),
                                levels_hi);
  }
}

// A k-quant super-block's factors (exact products): Q4_K/Q5_K's d sc and dmin m per sub-block
// (k_scales), Q6_K's d sc per 16 values; IQ4_XS works out its own in k_chunks. row_dots makes
// them one block ahead of the block it multiplies: read back right after they were stored, the
// stores had not reached the cache yet (a 64-byte store does not forward to a 4-byte broadcast
// load on Zen 4) and every block waited for them. With the levels made as below, Q4_K at one
// row on one core, in cache, 14.1 -> 17.4 G values/s (AMD EPYC Zen 4, scratch A/B).
template <Quant Q>
__attribute__((always_inline)) inline void k_factors(const uint8_t* blk, float* s) {
  if constexpr (Q == Quant::q6_k) {
    const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)));
    _mm512_store_ps(s, _mm512_mul_ps(_mm512_cvtepi32_ps(sc), _mm512_set1_ps(half_at(blk + 208))));
  } else if constexpr (Q == Quant::q4_k || Q == Quant::q5_k) {
    k_scales(blk, s);
  }
}

// A k-quant super-block's 256 values as eight chunks of 32: fn(c, lo, hi) with values 32c ..
// 32c + 15 in lo and the next 16 in hi; s: the block's k_factors. Q4_K/Q5_K pick each value
// from its sub-block's 16 (32) levels as the 32-value formats do (the levels d sc q - dmin m
// as a product and a difference: d sc q is exact, so the difference's one rounding is the fused
// form's; the product and the difference each take their scalar from memory in the instruction,
// where the fused form needed one of them broadcast first); Q6_K's 64 levels are not worth
// building, so its 6-bit values are assembled as bytes, widened and scaled by their 16 values' d sc.
template <Quant Q, typename Fn>
__attribute__((always_inline)) inline void k_chunks(const uint8_t* blk, const float* s, Fn&& fn) {
  if constexpr (Q == Quant::iq4_xs) {  // sub-block c: 16 bytes as IQ4_NL's, its step d (ls - 32)
    const float d = half_at(blk);
    uint16_t high;
    std::memcpy(&high, blk + 2, 2);
    const __m512 table = _mm512_loadu_ps(kIq4Levels);
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const int ls = ((blk[4 + c / 2] >> (4 * (c % 2))) & 0x0F) | (((high >> (2 * c)) & 3) << 4);
      const __m512 levels = _mm512_mul_ps(table, _mm512_set1_ps(d * static_cast<float>(ls - 32)));  // (exact)
      __m512 lo, hi;
      pick_nibbles(blk + 8 + 16 * c, levels, lo, hi);
      fn(c, lo, hi);
    }
  } else if constexpr (Q == Quant::q6_k) {
    const float* ds = s;
    const __m256i low4 = _mm256_set1_epi8(0x0F), high2 = _mm256_set1_epi8(0x30), bias = _mm256_set1_epi8(32);
#pragma GCC unroll 2
    for (int n = 0; n < 2; ++n) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * n));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * n + 32));
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * n));
      // value 32g + l of this half: ql low (g 0, 1) or high (g 2, 3) nibble, bits 2g, 2g + 1 of qh
      const __m256i q[4] = {
          _mm256_or_si256(_mm256_and_si256(a, low4), _mm256_and_si256(_mm256_slli_epi16(h, 4), high2)),
          _mm256_or_si256(_mm256_and_si256(b, low4), _mm256_and_si256(_mm256_slli_epi16(h, 2), high2)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), low4), _mm256_and_si256(h, high2)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), low4),
                          _mm256_and_si256(_mm256_srli_epi16(h, 2), high2)),
      };
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        const int c = 4 * n + g;
        const __m256i v = _mm256_sub_epi8(q[g], bias);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
        fn(c, _mm512_mul_ps(lo, _mm512_set1_ps(ds[2 * c])), _mm512_mul_ps(hi, _mm512_set1_ps(ds[2 * c + 1])));
      }
    }
  } else {
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 iota16 = _mm512_add_ps(iota, _mm512_set1_ps(16));
    const __m512i fifteen = _mm512_set1_epi32(15), sixteen = _mm512_set1_epi32(16);
    const uint8_t* qs = blk + (Q == Quant::q5_k ? 48 : 16);
    const __m128i qh_lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16));  // (Q5_K)
    const __m128i qh_hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 32));
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const __m512i q0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 32 * p)));
      const __m512i q1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 32 * p + 16)));
#pragma GCC unroll 2
      for (int half = 0; half < 2; ++half) {  // sub-block 2p: low nibbles; 2p + 1: high
        const int c = 2 * p + half;
        __m512i i0 = half ? _mm512_srli_epi32(q0, 4) : q0, i1 = half ? _mm512_srli_epi32(q1, 4) : q1;
        const __m512 levels =  // d sc q - dmin m, q < 16
            _mm512_sub_ps(_mm512_mul_ps(iota, _mm512_set1_ps(s[c])), _mm512_set1_ps(s[8 + c]));
        if constexpr (Q == Quant::q4_k) {
          fn(c, _mm512_permutexvar_ps(i0, levels), _mm512_permutexvar_ps(i1, levels));
        } else {
          const __m512 levels_hi = _mm512_sub_ps(_mm512_mul_ps(iota16, _mm512_set1_ps(s[c])), _mm512_set1_ps(s[8 + c]));
          const __m128i bit = _mm_set1_epi8(static_cast<char>(1 << c));
          if (!half) {
            i0 = _mm512_and_si512(i0, fifteen);
            i1 = _mm512_and_si512(i1, fifteen);
          }
          i0 = _mm512_mask_or_epi32(i0, _mm_test_epi8_mask(qh_lo, bit), i0, sixteen);
          i1 = _mm512_mask_or_epi32(i1, _mm_test_epi8_mask(qh_hi, bit), i1, sixteen);
          fn(c, _mm512_permutex2var_ps(levels, i0, levels_hi), _mm512_permutex2var_ps(levels, i1, levels_hi));
        }
      }
    }
  }
}

// The dot products of one W row (nb blocks) with R rows of x (row stride ldx): sums[r].
template <Quant Q, int R>
void row_dots(const uint8_t* w, int64_t nb, const float* x, int64_t ldx, float* sums) {
  constexpr int64_t kBytes = quant_block_bytes(Q), kValues = quant_block_values(Q);
  constexpr int kSets = R <= 2 ? 2 : 1;  // accumulator sets (alternate chunks of 32 values)
  __m512 acc[kSets][R][2];
  for (int s = 0; s < kSets; ++s)
    for (int r = 0; r < R; ++r) acc[s][r][0] = acc[s][r][1] = _mm512_setzero_ps();
  auto fma_rows = [&](__m512 (&a)[R][2], const float* xb, __m512 lo, __m512 hi) __attribute__((always_inline)) {
    for (int r = 0; r < R; ++r) {
      a[r][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb + r * ldx), a[r][0]);
      a[r][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + r * ldx + 16), a[r][1]);
    }
  };
  if constexpr (kValues == kQuantBlock) {
    // the blocks' factors 8 blocks at a time, one group ahead of the blocks they scale (as
    // k_factors below: read back right after their stores, they had stalled every block)
    constexpr int kGroup = 8;
    alignas(64) float factors[2][2 * kGroup];
    auto block = [&](int64_t b, const float* f, __m512 (&a)[R][2]) __attribute__((always_inline)) {
      const uint8_t* blk = w + b * kBytes;
      _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchBytes, _MM_HINT_T0);
      __m512 lo, hi;
      block_values<Q>(blk, f, lo, hi);
      fma_rows(a, x + b * kQuantBlock, lo, hi);
    };
    const int64_t groups = nb / kGroup;
    if (groups > 0) block_factors<Q>(w, kGroup, factors[0]);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t b = g * kGroup;
      if (g + 1 < groups) block_factors<Q>(w + (b + kGroup) * kBytes, kGroup, factors[(g + 1) % 2]);
      const float* f = factors[g % 2];
#pragma GCC unroll 8
      for (int i = 0; i < kGroup; ++i) block(b + i, f + 2 * i, acc[kSets == 2 ? i % 2 : 0]);
    }
    for (int64_t b = groups * kGroup; b < nb; ++b) {
      alignas(16) float f[2];
      block_factors<Q>(w + b * kBytes, 1, f);
      block(b, f, acc[0]);
    }
  } else {
    alignas(64) float factors[2][16];  // this block's k_factors and the next's
    if (nb > 0) k_factors<Q>(w, factors[0]);
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = w + b * kBytes;
#pragma GCC unroll 4
      for (int64_t line = 0; line < kBytes; line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchBytes + line, _MM_HINT_T0);
      }
      if (b + 1 < nb) k_factors<Q>(blk + kBytes, factors[(b + 1) % 2]);
      const float* xb = x + b * kValues;
      k_chunks<Q>(blk, factors[b % 2], [&](int c, __m512 lo, __m512 hi) __attribute__((always_inline)) {
        fma_rows(acc[c % kSets], xb + c * kQuantBlock, lo, hi);
      });
    }
  }
  for (int r = 0; r < R; ++r) {
    __m512 s = _mm512_add_ps(acc[0][r][0], acc[0][r][1]);
    if constexpr (kSets == 2) s = _mm512_add_ps(s, _mm512_add_ps(acc[1][r][0], acc[1][r][1]));
    sums[r] = _mm512_reduce_add_ps(s);
  }
}

template <Quant Q>
void rows_dots(int64_t rows, const uint8_t* w, int64_t nb, const float* x, int64_t ldx, float* sums) {
  switch (rows) {
    case 1: return row_dots<Q, 1>(w, nb, x, ldx, sums);
    case 2: return row_dots<Q, 2>(w, nb, x, ldx, sums);
    case 3: return row_dots<Q, 3>(w, nb, x, ldx, sums);
    case 4: return row_dots<Q, 4>(w, nb, x, ldx, sums);
    case 5: return row_dots<Q, 5>(w, nb, x, ldx, sums);
    case 6: return row_dots<Q, 6>(w, nb, x, ldx, sums);
    case 7: return row_dots<Q, 7>(w, nb, x, ldx, sums);
    default: return row_dots<Q, 8>(w, nb, x, ldx, sums);
  }
}

}  // namespace

template <Quant Q, Dtype D>
void qlinear_cols_avx512(const QuantLinearParams& p, int64_t begin, int64_t end) {
  const int64_t nb = p.in_features / quant_block_values(Q), row_bytes = nb * quant_block_bytes(Q);
  qlinear_cols<Q, D>(p, begin, end, [&](int64_t rows, int64_t m0, int64_t n0, int cols, float (*sums)[kQuantColChunk]) {
    float col[kQuantRowGroup];
    for (int c = 0; c < cols; ++c) {
      rows_dots<Q>(rows, p.w + (n0 + c) * row_bytes, nb, p.x + m0 * p.ldx, p.ldx, col);
      for (int64_t m = 0; m < rows; ++m) sums[m][c] = col[m];
    }
  });
}

template <Quant Q>
void dequantize_rows_avx512(const uint8_t* w, int64_t in_features, int64_t begin, int64_t end, float* out) {
  constexpr int64_t kValues = quant_block_values(Q), kBytes = quant_block_bytes(Q);
  const int64_t nb = in_features / kValues;
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* row = w + n * nb * kBytes;
    float* dst = out + (n - begin) * in_features;
    for (int64_t b = 0; b < nb; ++b) {
      float* values = dst + b * kValues;
      if constexpr (kValues == kQuantBlock) {
        __m512 lo, hi;
        alignas(16) float f[2];
        block_factors<Q>(row + b * kBytes, 1, f);
        block_values<Q>(row + b * kBytes, f, lo, hi);
        _mm512_storeu_ps(values, lo);
        _mm512_storeu_ps(values + 16, hi);
      } else {
        alignas(64) float factors[16];
        k_factors<Q>(row + b * kBytes, factors);
        k_chunks<Q>(row + b * kBytes, factors, [&](int c, __m512 lo, __m512 hi) __attribute__((always_inline)) {
          _mm512_storeu_ps(values + c * kQuantBlock, lo);
          _mm512_storeu_ps(values + c * kQuantBlock + 16, hi);
        });
      }
    }
  }
}

#define FASTARCH_QLINEAR_AVX512(Q)                                                                     \
  template void qlinear_cols_avx512<Q, Dtype::f32>(const QuantLinearParams&, int64_t, int64_t);         \
  template void qlinear_cols_avx512<Q, Dtype::f16>(const QuantLinearParams&, int64_t, int64_t);         \
  template void qlinear_cols_avx512<Q, Dtype::bf16>(const QuantLinearParams&, int64_t, int64_t);        \
  template void dequantize_rows_avx512<Q>(const uint8_t*, int64_t, int64_t, int64_t, float*);
FASTARCH_QUANTS(FASTARCH_QLINEAR_AVX512)
#undef FASTARCH_QLINEAR_AVX512

}  // namespace fastarch::cpu

#pragma GCC pop_options
