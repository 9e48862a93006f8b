// AVX-512 build of the CPU rotary embedding (fp32, fp16, bf16; computed in fp32).
//
// Per head, 16 lanes at a time. Half-split (GPT-NeoX) pairs are two contiguous runs, x[i] and
// x[i + half]: each chunk of 16 pairs loads 16 cos and 16 sin values. Interleaved (GPT-J)
// pairs are neighbours: a chunk of 16 elements holds 8 pairs, and y = x * cos' + swap(x) *
// sin', with swap exchanging the neighbours of each pair and cos' = (c0, c0, c1, c1, ...),
// sin' = (-s0, s0, -s1, s1, ...). Both round x1 * c and x2 * s to fp32 separately and then add
// (no FMA), exactly the reference's fp32 operations, and round once to the output dtype.
//
// Compiled for AVX-512 through the target pragma below and called only after a run-time CPU
// check. No torch headers (no inline function of theirs may be emitted with AVX-512 code).
#include <immintrin.h>

#include <cstdint>

#include "rope_rows.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

#include "cpu/avx512_math.h"

namespace fastarch::cpu {
namespace {

// 16 values of a dtype in memory <-> 16 fp32 lanes (cpu/avx512_math.h: masked-off lanes load as 0
// and are not written; a full mask takes the plain instruction, several times faster from memory
// on AMD's Zen 5).
using F32Lanes = avx512::Lanes<avx512::Elem::f32, false>;
using F16Lanes = avx512::Lanes<avx512::Elem::f16, false>;

// kInsn: round with vcvtneps2bf16 (AVX512-BF16), except for subnormal results, which that
// instruction flushes to zero (rare: then the whole chunk is rounded by hand); else by hand,
// to nearest even, NaN kept quiet. Both give a cast's bits.
template <bool kInsn>
struct Bf16Lanes : avx512::Lanes<avx512::Elem::bf16, false> {
  using ByHand = avx512::Lanes<avx512::Elem::bf16, false>;
  static void store(void* p, __m512 v, __mmask16 m) {
    if constexpr (kInsn) {
      const __m512 smallest_normal = _mm512_castsi512_ps(_mm512_set1_epi32(0x00800000));
      const __mmask16 subnormal = _mm512_cmp_ps_mask(_mm512_abs_ps(v), smallest_normal, _CMP_LT_OQ) &
                                  _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
      if (!(subnormal & m)) return avx512::Lanes<avx512::Elem::bf16, true>::store(p, v, m);
    }
    ByHand::store(p, v, m);
  }
};

// The first n lanes (all 16 when n >= 16).
inline __mmask16 first(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

template <typename L>
inline const char* elem(const void* row, int64_t i) {
  return static_cast<const char*>(row) + i * L::kBytes;
}
template <typename L>
inline char* elem(void* row, int64_t i) {
  return static_cast<char*>(row) + i * L::kBytes;
}

template <typename L>
void turn_half_split(const void* x, void* y, const float* cos, const float* sin, __m512 sign, int64_t half) {
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 m = first(half - i);
    const __m512 c = _mm512_maskz_loadu_ps(m, cos + i);
    const __m512 s = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sin + i), sign);
    const __m512 x1 = L::load(elem<L>(x, i), m), x2 = L::load(elem<L>(x, i + half), m);
    L::store(elem<L>(y, i), _mm512_sub_ps(_mm512_mul_ps(x1, c), _mm512_mul_ps(x2, s)), m);
    L::store(elem<L>(y, i + half), _mm512_add_ps(_mm512_mul_ps(x2, c), _mm512_mul_ps(x1, s)), m);
  }
}

template <typename L>
void turn_interleaved(const void* x, void* y, const float* cos, const float* sin, __m512 sign, int64_t half) {
  const __m512i dup = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  // -sin on the first element of each pair, +sin on the second (then times sign: the inverse)
  const __m512 alternate = _mm512_mul_ps(_mm512_set_ps(1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1), sign);
  for (int64_t j = 0; j < half; j += 8) {  // pairs j .. j + 7: elements 2j .. 2j + 15
    const int64_t pairs = half - j < 8 ? half - j : 8;
    const __mmask16 m = first(2 * pairs);
    const __mmask16 mp = first(pairs);
    const __m512 c = _mm512_permutexvar_ps(dup, _mm512_maskz_loadu_ps(mp, cos + j));
    const __m512 s = _mm512_mul_ps(_mm512_permutexvar_ps(dup, _mm512_maskz_loadu_ps(mp, sin + j)), alternate);
    const __m512 v = L::load(elem<L>(x, 2 * j), m);
    const __m512 swapped = _mm512_permute_ps(v, 0xB1);  // (x1, x2) -> (x2, x1) in every pair
    L::store(elem<L>(y, 2 * j), _mm512_add_ps(_mm512_mul_ps(v, c), _mm512_mul_ps(swapped, s)), m);
  }
}

template <typename L>
void copy_tail(const void* x, void* y, int64_t from, int64_t to) {
  for (int64_t i = from; i < to; i += 16) {
    const __mmask16 m = first(to - i);
    L::store(elem<L>(y, i), L::load(elem<L>(x, i), m), m);  // exact: widening and narrowing back
  }
}

template <typename L, bool kInterleaved>
void rows(const RopeParams& p, int64_t begin, int64_t end) {
  const float* cos = static_cast<const float*>(p.cos);
  const float* sin = static_cast<const float*>(p.sin);
  const __m512 sign = _mm512_set1_ps(p.inverse ? -1.0f : 1.0f);
  RopeRows it(p, begin);
  for (int64_t r = begin; r < end; ++r, it.next()) {
    const RopeRow& row = *it;
    const int64_t pos = rope_position(p, row);
    const void* x = elem<L>(p.x, row.b * p.x_stride_b + row.h * p.x_stride_h + row.s * p.x_stride_s);
    void* y = elem<L>(p.out, row.b * p.out_stride_b + row.h * p.out_stride_h + row.s * p.out_stride_s);
    if constexpr (kInterleaved) {
      turn_interleaved<L>(x, y, cos + pos * p.half, sin + pos * p.half, sign, p.half);
    } else {
      turn_half_split<L>(x, y, cos + pos * p.half, sin + pos * p.half, sign, p.half);
    }
    if (p.head_dim > 2 * p.half) copy_tail<L>(x, y, 2 * p.half, p.head_dim);
  }
}

template <typename L>
void dispatch(const RopeParams& p, int64_t begin, int64_t end) {
  if (p.interleaved) {
    rows<L, true>(p, begin, end);
  } else {
    rows<L, false>(p, begin, end);
  }
}

}  // namespace

template <Dtype D>
void rope_rows_avx512(const RopeParams& p, int64_t begin, int64_t end, bool bf16_instructions) {
  if constexpr (D == Dtype::f32) {
    dispatch<F32Lanes>(p, begin, end);
  } else if constexpr (D == Dtype::f16) {
    dispatch<F16Lanes>(p, begin, end);
  } else if constexpr (D == Dtype::bf16) {
    if (bf16_instructions) {
      dispatch<Bf16Lanes<true>>(p, begin, end);
    } else {
      dispatch<Bf16Lanes<false>>(p, begin, end);
    }
  }
}

template void rope_rows_avx512<Dtype::f32>(const RopeParams&, int64_t, int64_t, bool);
template void rope_rows_avx512<Dtype::f16>(const RopeParams&, int64_t, int64_t, bool);
template void rope_rows_avx512<Dtype::bf16>(const RopeParams&, int64_t, int64_t, bool);

}  // namespace fastarch::cpu

#pragma GCC pop_options
