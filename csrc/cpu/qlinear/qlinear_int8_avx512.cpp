// AVX-512 build of the quantized linear layer with x rounded to int8 (activations "int8",
// qlinear.h's Int8Rows), on CPUs with AVX512-VNNI: llama.cpp's arithmetic for its quantized
// dot products, exact in its integer part.
//
// Every format's value is a (u - o) or a u + b for a group of 16 or 32 values sharing a scale
// a (and a min b, or a fixed offset o), u an unsigned byte code: Q4_0 (u = q, o = 8), Q4_1 (q,
// b = m), Q5_0 (o = 16), Q5_1, Q8_0 (u = q + 128, o = 128), IQ4_NL (u = level + 128, o = 128),
// Q4_K and Q5_K (a = d sc, b = -dmin m), Q6_K (o = 32, groups of 16), IQ4_XS (as IQ4_NL). The
// kernels take 64 values at a time: a zmm of 64 codes in x's order (two blocks of 32, or two
// or four sub-blocks of a super-block) and the scale of each of its 16 lanes (4 values); one
// vpdpbusd multiplies the codes into a row's 64 int8 codes of x and sums each 4 products in
// int32, from minus o times the 4 codes' sum (Int8Rows::neg4, shifted: o is a power of 2), so
// the lane holds exactly sum (u - o) q. Each lane is then scaled by a times x's d and added
// into fp32 sums; a min's b times d sum q is added per lane (Q4_1, Q5_1) or per 32 values
// (Q4_K, Q5_K). Against the exact kernels (qlinear_avx512.cpp), which widen every value to
// fp32: ~2x fewer instructions per weight (4096 Q4_K rows of 1024 values, in cache: 2.0x on
// one Zen 5 core; the 32-value formats 1.1-1.5x, their pairs of blocks cost more shuffles).
//
// Compiled with the target of qlinear_avx512.cpp (cpu/avx512_math.h's rule) and AVX512-VNNI
// for the functions that multiply (FASTARCH_VNNI); called only where the CPU has it (cpu/isa.h, int8_products()).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "qlinear.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

#include "cpu/avx512_math.h"
#include "qlinear_avx512.h"
#include "qlinear_int8_x86.h"

#define FASTARCH_VNNI __attribute__((target("avx512vnni"), always_inline)) inline

namespace fastarch::cpu {
namespace {

constexpr int64_t kPrefetchBytes = 2048;

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

// R rows of x's 64 values at (the rows' pointers) + off times the chunk, into acc (lane mins
// into mins: a chain of their own).
template <Quant Q, int R>
FASTARCH_VNNI void chunk_rows(const Chunk& c, const XRows<R>& x, int off, __m512 (&acc)[R], __m512 (&mins)[R]) {
  constexpr int kShift = kOffsetShift<Q>;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    __m512i init = _mm512_setzero_si512();
    if constexpr (kShift >= 0) init = _mm512_slli_epi32(_mm512_loadu_si512(x.neg4[r] + off / 4), kShift);
    const __m512i dots = _mm512_dpbusd_epi32(init, c.codes, _mm512_loadu_si512(x.q[r] + off));
    const __m512 scale = _mm512_mul_ps(c.a, _mm512_loadu_ps(x.lane_d[r] + off / 4));
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), scale, acc[r]);
    if constexpr (kLaneMins<Q>) mins[r] = _mm512_fmadd_ps(c.b, _mm512_loadu_ps(x.sum4[r] + off / 4), mins[r]);
  }
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
    const __m512 a16 = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)))),
        _mm512_set1_ps(half_at(blk + 208)));
#pragma GCC unroll 2
    for (int n = 0; n < 2; ++n) {  // halves of 128 values: ql 64 bytes, qh 32
      const __m512i ql = _mm512_loadu_si512(blk + 64 * n);
      const __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * n)));
#pragma GCC unroll 2
      for (int g = 0; g < 2; ++g) {  // value groups 2g, 2g + 1 (of 32): ql's low (g 0) or high nibbles
        const __m512i lo = _mm512_and_si512(g ? _mm512_srli_epi16(ql, 4) : ql, low4);
        // the 2 high bits to bits 4-5: qh bits 4g, 4g + 1 (first 32 values), 4g + 2, 4g + 3 (next)
        const __m512i t = g ? _mm512_mask_srli_epi16(h, 0xFFFF0000u, h, 2)
                            : _mm512_mask_slli_epi16(_mm512_slli_epi16(h, 4), 0xFFFF0000u, h, 2);
        const __m512i q = _mm512_ternarylogic_epi32(lo, t, _mm512_set1_epi8(0x30), 0xF8);
        const int s = 8 * n + 4 * g;  // the chunk's first group of 16
        const __m512i idx = _mm512_setr_epi32(s, s, s, s, s + 1, s + 1, s + 1, s + 1, s + 2, s + 2, s + 2, s + 2,
                                              s + 3, s + 3, s + 3, s + 3);
        fn(2 * n + g, Chunk{q, _mm512_permutexvar_ps(idx, a16), {}});
      }
    }
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

// The dot products of one W row (nb blocks) with R rows of x (rows m0 ..): sums[r].
template <Quant Q, int R>
FASTARCH_VNNI void row_dots(const uint8_t* w, int64_t nb, const Int8Rows& x, int64_t m0, float* sums) {
  constexpr int64_t kBytes = quant_block_bytes(Q), kValues = quant_block_values(Q);
  constexpr int kSets = R <= 2 ? 2 : 1;  // accumulator sets (alternate chunks), as the exact kernels
  __m512 acc[kSets][R], lane_mins[R];  // lane_mins: Q4_1/Q5_1's m d sum q
  __m256 mins[R];  // Q4_K/Q5_K: sum of dmin m times d sum q per 32 values (subtracted)
  for (int r = 0; r < R; ++r) {
    for (int s = 0; s < kSets; ++s) acc[s][r] = _mm512_setzero_ps();
    lane_mins[r] = _mm512_setzero_ps();
    mins[r] = _mm256_setzero_ps();
  }
  XRows<R> xr(x, m0);
  if constexpr (kValues == kQuantBlock) {
    int64_t b = 0;
    for (; b + 2 * kSets <= nb; b += 2 * kSets, xr.advance(64 * kSets)) {
#pragma GCC unroll 2
      for (int s = 0; s < kSets; ++s) {
        const uint8_t* blk = w + (b + 2 * s) * kBytes;
        _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchBytes, _MM_HINT_T0);
        chunk_rows<Q, R>(pair_chunk<Q>(blk, blk + kBytes), xr, 64 * s, acc[s], lane_mins);
      }
    }
    for (; b + 2 <= nb; b += 2, xr.advance(64)) chunk_rows<Q, R>(pair_chunk<Q>(w + b * kBytes, w + (b + 1) * kBytes), xr, 0, acc[0], lane_mins);
    if (b < nb) chunk_rows<Q, R>(pair_chunk<Q>(w + b * kBytes, kZeroBlock), xr, 0, acc[0], lane_mins);
  } else {
    for (int64_t b = 0; b < nb; ++b, xr.advance(kValues)) {
      const uint8_t* blk = w + b * kBytes;
#pragma GCC unroll 4
      for (int64_t line = 0; line < kBytes; line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchBytes + line, _MM_HINT_T0);
      }
      k_chunks<Q>(
          blk,
          [&](int p, const Chunk& c) __attribute__((target("avx512vnni"), always_inline)) {
            chunk_rows<Q, R>(c, xr, 64 * p, acc[p % kSets], lane_mins);
          },
          [&](__m256 dmin_m) __attribute__((target("avx512vnni"), always_inline)) {
            for (int r = 0; r < R; ++r) {
              mins[r] = _mm256_fmadd_ps(dmin_m, _mm256_loadu_ps(xr.sum32[r]), mins[r]);
            }
          });
    }
  }
  for (int r = 0; r < R; ++r) {
    __m512 s = acc[0][r];
    if constexpr (kSets == 2) s = _mm512_add_ps(s, acc[1][r]);
    if constexpr (kLaneMins<Q>) s = _mm512_add_ps(s, lane_mins[r]);
    if constexpr (Q == Quant::q4_k || Q == Quant::q5_k) s = _mm512_sub_ps(s, _mm512_zextps256_ps512(mins[r]));
    sums[r] = _mm512_reduce_add_ps(s);
  }
}

// Output columns n0 .. n0 + cols - 1 of rows m0 .. m0 + R - 1: sums[row][column].
template <Quant Q, int R>
__attribute__((target("avx512vnni"))) void cols_dots(const QuantLinearParams& p, int64_t m0, int64_t n0, int cols,
                                                      float (*sums)[kQuantColChunk]) {
  const int64_t nb = p.in_features / quant_block_values(Q), row_bytes = nb * quant_block_bytes(Q);
  float col[R];
  for (int c = 0; c < cols; ++c) {
    row_dots<Q, R>(p.w + (n0 + c) * row_bytes, nb, *p.int8, m0, col);
    for (int r = 0; r < R; ++r) sums[r][c] = col[r];
  }
}

}  // namespace

template <Quant Q, Dtype D>
__attribute__((target("avx512vnni"))) void qlinear_int8_cols_avx512(const QuantLinearParams& p, int64_t begin,
                                                                     int64_t end) {
  using Dots = void (*)(const QuantLinearParams&, int64_t, int64_t, int, float (*)[kQuantColChunk]);
  static constexpr Dots kDots[kQuantRowGroup] = {cols_dots<Q, 1>, cols_dots<Q, 2>, cols_dots<Q, 3>, cols_dots<Q, 4>,
                                                 cols_dots<Q, 5>, cols_dots<Q, 6>, cols_dots<Q, 7>, cols_dots<Q, 8>};
  qlinear_cols<Q, D>(p, begin, end, [&](int64_t rows, int64_t m0, int64_t n0, int cols, float (*sums)[kQuantColChunk]) {
    kDots[rows - 1](p, m0, n0, cols, sums);
  });
}

// Per block of 32: the scale from max |x| (inf or NaN anywhere: d NaN, codes 0), the codes
// rounded to nearest even as torch.round, then the lanes' sums (vpdpbusd of ones and codes).
__attribute__((target("avx512vnni"))) void quantize_int8_rows_avx512(const float* x, int64_t rows, int64_t K,
                                                                      int64_t ldx, const Int8Rows& out) {
  const int64_t ld = out.ld, ld4 = ld / 4, ld32 = ld / 32;
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    int8_t* q = const_cast<int8_t*>(out.q) + r * ld;
    float* d = const_cast<float*>(out.d) + r * ld32;
    float* lane_d = const_cast<float*>(out.lane_d) + r * ld4;
    int32_t* neg4 = const_cast<int32_t*>(out.neg4) + r * ld4;
    float* sum4 = const_cast<float*>(out.sum4) + r * ld4;
    float* sum32 = const_cast<float*>(out.sum32) + r * ld32;
    for (int64_t b = 0; b < ld / 32; ++b) {
      __m512i codes = _mm512_setzero_si512();  // (16 lanes of 4 codes: this block's in the low 8)
      float scale = 0.0f;
      if (b < K / 32) {
        const __m512 v0 = _mm512_loadu_ps(xr + 32 * b), v1 = _mm512_loadu_ps(xr + 32 * b + 16);
        // QNaN, SNaN, +inf, -inf
        const bool finite = (_mm512_fpclass_ps_mask(v0, 0x99) | _mm512_fpclass_ps_mask(v1, 0x99)) == 0;
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        if (!finite) {
          scale = std::nanf("");
        } else if (amax > 0.0f) {
          const __m512 inv = _mm512_set1_ps(127.0f / amax);
          constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
          const __m512i q0 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v0, inv), kNearest));
          const __m512i q1 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v1, inv), kNearest));
          codes = _mm512_castsi128_si512(_mm512_cvtsepi32_epi8(q0));
          codes = _mm512_inserti32x4(codes, _mm512_cvtsepi32_epi8(q1), 1);
          scale = amax / 127.0f;
        }
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b), _mm512_castsi512_si256(codes));
      const __m256i s4 = _mm512_castsi512_si256(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, codes));
      store_block_sums(b, scale, s4, d, lane_d, neg4, sum4, sum32);
    }
  }
}

#define FASTARCH_QLINEAR_INT8_AVX512(Q)                                                          \
  template void qlinear_int8_cols_avx512<Q, Dtype::f32>(const QuantLinearParams&, int64_t, int64_t); \
  template void qlinear_int8_cols_avx512<Q, Dtype::f16>(const QuantLinearParams&, int64_t, int64_t); \
  template void qlinear_int8_cols_avx512<Q, Dtype::bf16>(const QuantLinearParams&, int64_t, int64_t);
FASTARCH_QUANTS(FASTARCH_QLINEAR_INT8_AVX512)
#undef FASTARCH_QLINEAR_INT8_AVX512

}  // namespace fastarch::cpu

#pragma GCC pop_options
