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
// Q4_K, Q5_K and Q6_K (most of a Q4_K_M file's bytes, and its head) have paths of their own
// (k4_block, k6_block): a row's scales times x's d once per super-block rather than per chunk,
// Q4_K/Q5_K's codes multiplied in the order one 64-byte load holds them (x's codes stored in
// that order, Int8Rows::k_pairs), Q6_K's offset 32 as one product per super-block with x's
// sums per 16 codes. On one Zen 4 core, a 1024 x 2048 weight in cache: Q4_K 1.37x, Q6_K
// 1.2-1.3x the shared chunk loop; decode's weights from memory on 2 cores, 1.05-1.3x.
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
#include "qlinear_int8_avx512.h"
#include "qlinear_int8_x86.h"

namespace fastarch::cpu {
namespace {

// The blocks are prefetched this far ahead, non-temporally: a decode step streams each weight
// once, and with the T0 hint it pushed the small ops between the products (norms, rotary, the
// activation, the step's Python) out of L2. SmolLM2-135M Q4_1 decode steps, AMD EPYC Zen 4, 2
// threads: 1.01-1.12x T0's in three side-by-side pairs. The exact kernels (qlinear_avx512.cpp)
// keep T0: NTA measured 0.89-0.99x there.
constexpr int64_t kPrefetchBytes = 2048;

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

// Bytes with bit a set in the low 32, bit b in the high 32.
inline __m512i bit_pair(int a, int b) {
  return _mm512_inserti64x4(_mm512_set1_epi8(static_cast<char>(1 << a)), _mm256_set1_epi8(static_cast<char>(1 << b)), 1);
}

// A Q4_K or Q5_K super-block's 256 values times R rows of x whose codes come in k_pairs order
// (Int8Rows): each 64-byte load of the 4-bit codes is two chunks, its low nibbles (sub-blocks
// 4h and 4h + 2) and its high (4h + 1, 4h + 3), multiplied as they lie; each row's scales a
// times x's d once per super-block (no per-chunk product of the two), the mins' term as before.
template <Quant Q, int R, int kSets>
FASTARCH_VNNI void k4_block(const uint8_t* blk, const XRows<R>& x, __m512 (&acc)[kSets][R], __m256 (&mins)[R]) {
  alignas(64) float s[16];
  k_scales(blk, s);  // d sc (sub-blocks 0-7), dmin m
  const __m256 a8 = _mm256_load_ps(s), m8 = _mm256_load_ps(s + 8);
  __m512 scale[R];
  for (int r = 0; r < R; ++r) {
    scale[r] = _mm512_castps256_ps512(_mm256_mul_ps(a8, _mm256_loadu_ps(x.d[r])));
    mins[r] = _mm256_fmadd_ps(m8, _mm256_loadu_ps(x.sum32[r]), mins[r]);
  }
  const __m512i low4 = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16);
  const uint8_t* qs = blk + (Q == Quant::q5_k ? 48 : 16);
  __m512i qh = _mm512_setzero_si512();  // Q5_K: bit j of byte l: sub-block j's value l's fifth bit
  if constexpr (Q == Quant::q5_k) qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16)));
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const __m512i v = _mm512_loadu_si512(qs + 64 * h);
    __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    if constexpr (Q == Quant::q5_k) {
      lo = _mm512_mask_add_epi8(lo, _mm512_test_epi8_mask(qh, bit_pair(4 * h, 4 * h + 2)), lo, sixteen);
      hi = _mm512_mask_add_epi8(hi, _mm512_test_epi8_mask(qh, bit_pair(4 * h + 1, 4 * h + 3)), hi, sixteen);
    }
    const __m512i lo_idx = halves(4 * h, 4 * h + 2), hi_idx = halves(4 * h + 1, 4 * h + 3);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int8_t* xq = x.q[r] + 128 * h;
      const __m512i dl = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xq));
      const __m512i dh = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, _mm512_loadu_si512(xq + 64));
      acc[0][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dl), _mm512_permutexvar_ps(lo_idx, scale[r]), acc[0][r]);
      acc[kSets - 1][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dh), _mm512_permutexvar_ps(hi_idx, scale[r]), acc[kSets - 1][r]);
    }
  }
}

// A Q6_K super-block's 256 values times R rows of x: per row its 16 scales times x's d once
// per super-block, each chunk's sums of u q scaled as they come; the offset (u - 32) as
// 32 times the scaled sums of x's codes per group (offsets, subtracted at the end), one
// product per super-block where the int32 sums had started from -32 sum q per chunk.
template <int R, int kSets>
FASTARCH_VNNI void k6_block(const uint8_t* blk, const XRows<R>& x, __m512 (&acc)[kSets][R], __m512 (&offsets)[R]) {
  const __m512 a16 = q6_scales(blk);
  const __m512i pairs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  __m512 scale[R];
  for (int r = 0; r < R; ++r) {
    scale[r] = _mm512_mul_ps(a16, _mm512_permutexvar_ps(pairs, _mm512_castps256_ps512(_mm256_loadu_ps(x.d[r]))));
    offsets[r] = _mm512_fmadd_ps(scale[r], _mm512_loadu_ps(x.sum16[r]), offsets[r]);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512i codes = q6_codes(blk, c), groups = q6_groups(c);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, _mm512_loadu_si512(x.q[r] + 64 * c));
      acc[c % kSets][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_permutexvar_ps(groups, scale[r]),
                                          acc[c % kSets][r]);
    }
  }
}

// The dot products of one W row (nb blocks) with R rows of x (rows m0 ..): lanes[r], whose 16
// lanes sum to row r's (cols_dots reduces 16 W rows' lanes together).
template <Quant Q, int R>
FASTARCH_VNNI void row_dots(const uint8_t* w, int64_t nb, const Int8Rows& x, int64_t m0, __m512 (&lanes)[R]) {
  constexpr int64_t kBytes = quant_block_bytes(Q), kValues = quant_block_values(Q);
  constexpr int kSets = R <= 2 ? 2 : 1;  // accumulator sets (alternate chunks), as the exact kernels
  __m512 acc[kSets][R], lane_mins[R];  // lane_mins: Q4_1/Q5_1's m d sum q
  __m256 mins[R];  // Q4_K/Q5_K: sum of dmin m times d sum q per 32 values (subtracted)
  __m512 offsets[R];  // Q6_K: sum of a d sum q per 16 values (32 times it subtracted)
  for (int r = 0; r < R; ++r) {
    offsets[r] = _mm512_setzero_ps();
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
        _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchBytes, _MM_HINT_NTA);
        chunk_rows<Q, R>(pair_chunk<Q>(blk, blk + kBytes), xr, 64 * s, acc[s], lane_mins);
      }
    }
    for (; b + 2 <= nb; b += 2, xr.advance(64)) chunk_rows<Q, R>(pair_chunk<Q>(w + b * kBytes, w + (b + 1) * kBytes), xr, 0, acc[0], lane_mins);
    if (b < nb) chunk_rows<Q, R>(pair_chunk<Q>(w + b * kBytes, kZeroBlock), xr, 0, acc[0], lane_mins);
  } else {  // super-blocks of 256 values
    for (int64_t b = 0; b < nb; ++b, xr.advance(kValues)) {
      const uint8_t* blk = w + b * kBytes;
#pragma GCC unroll 4
      for (int64_t line = 0; line < kBytes; line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchBytes + line, _MM_HINT_NTA);
      }
      if constexpr (Q == Quant::q6_k) {
        k6_block<R, kSets>(blk, xr, acc, offsets);
      } else if constexpr (Q == Quant::q4_k || Q == Quant::q5_k) {
        k4_block<Q, R, kSets>(blk, xr, acc, mins);
      } else {  // IQ4_XS: the shared chunks (no mins)
        k_chunks<Q>(
            blk,
            [&](int p, const Chunk& c) __attribute__((target("avx512vnni"), always_inline)) {
              chunk_rows<Q, R>(c, xr, 64 * p, acc[p % kSets], lane_mins);
            },
            [](__m256) __attribute__((target("avx512vnni"), always_inline)) {});
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    __m512 s = acc[0][r];
    if constexpr (kSets == 2) s = _mm512_add_ps(s, acc[1][r]);
    if constexpr (kLaneMins<Q>) s = _mm512_add_ps(s, lane_mins[r]);
    if constexpr (Q == Quant::q4_k || Q == Quant::q5_k) s = _mm512_sub_ps(s, _mm512_zextps256_ps512(mins[r]));
    if constexpr (Q == Quant::q6_k) s = _mm512_fnmadd_ps(_mm512_set1_ps(32.0f), offsets[r], s);
    lanes[r] = s;
  }
}

// Lane c: the sum of v[c]'s 16 lanes. A tree of in-lane unpacks and shuffles, then of 128-bit
// quarters: 45 instructions for 16 sums, where reducing each vector alone is a chain of 8.
inline __m512 column_sums(const __m512 (&v)[kQuantColChunk]) {
  __m512 pairs[8], quads[4], eights[2];
  for (int i = 0; i < 8; ++i) {  // per 128 bits: v[2i] 0+2, v[2i+1] 0+2, v[2i] 1+3, v[2i+1] 1+3
    const __m512 a = v[2 * i], b = v[2 * i + 1];
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  for (int i = 0; i < 4; ++i) {  // per 128 bits: the sums of columns 4i .. 4i + 3
    const __m512 a = pairs[2 * i], b = pairs[2 * i + 1];
    quads[i] = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
  }
  for (int i = 0; i < 2; ++i) {  // quarters: quads[2i]'s 0+1, 2+3, quads[2i+1]'s 0+1, 2+3
    const __m512 a = quads[2 * i], b = quads[2 * i + 1];
    eights[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(eights[0], eights[1], 0x88),
                       _mm512_shuffle_f32x4(eights[0], eights[1], 0xDD));
}

// Output columns n0 .. n0 + cols - 1 of rows m0 .. m0 + R - 1: sums[row][column].
template <Quant Q, int R>
__attribute__((target("avx512vnni"))) void cols_dots(const QuantLinearParams& p, int64_t m0, int64_t n0, int cols,
                                                      float (*sums)[kQuantColChunk]) {
  const int64_t nb = p.in_features / quant_block_values(Q), row_bytes = nb * quant_block_bytes(Q);
  __m512 lanes[R][kQuantColChunk];
  for (int c = 0; c < cols; ++c) {
    __m512 col[R];
    row_dots<Q, R>(p.w + (n0 + c) * row_bytes, nb, *p.int8, m0, col);
    for (int r = 0; r < R; ++r) lanes[r][c] = col[r];
  }
  for (int r = 0; r < R; ++r) {
    for (int c = cols; c < kQuantColChunk; ++c) lanes[r][c] = _mm512_setzero_ps();
    _mm512_store_ps(sums[r], column_sums(lanes[r]));
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
    float* sum16 = const_cast<float*>(out.sum16) + r * ld32 * 2;
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
      const int64_t at = out.k_pairs ? (b & ~3) | (b & 1) << 1 | (b >> 1 & 1) : b;  // (blocks 1 and 2 of 4 swapped)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * at), _mm512_castsi512_si256(codes));
      const __m256i s4 = _mm512_castsi512_si256(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, codes));
      store_block_sums(b, scale, s4, d, lane_d, neg4, sum4, sum32);
      alignas(32) int32_t four[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(four), s4);
      sum16[2 * b] = static_cast<float>(four[0] + four[1] + four[2] + four[3]);
      sum16[2 * b + 1] = static_cast<float>(four[4] + four[5] + four[6] + four[7]);
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
