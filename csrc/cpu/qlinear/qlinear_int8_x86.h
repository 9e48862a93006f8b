// What the x86 builds of the int8 products share (qlinear_int8_avx512.cpp, qlinear_blocks_avx2.cpp):
// the rows of x's Int8Rows a pass reads, IQ4_XS's sub-block steps and the per-block sums of x's
// codes. AVX2 code with internal linkage: include after the file's target pragma (each build
// keeps its own copy).
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "qlinear.h"

namespace fastarch::cpu {
namespace {

// Row r of x's arrays from value v on (kept per row of a group, so that a chunk's loads are a
// pointer plus a constant).
template <int R>
struct XRows {
  const int8_t* q[R];
  const float* d[R];
  const float* lane_d[R];
  const int32_t* neg4[R];
  const float* sum4[R];
  const float* sum32[R];
  const float* sum16[R];

  XRows(const Int8Rows& x, int64_t m0) {
    for (int r = 0; r < R; ++r) {
      const int64_t row = m0 + r;
      q[r] = x.q + row * x.ld;
      d[r] = x.d + row * (x.ld / 32);
      lane_d[r] = x.lane_d + row * (x.ld / 4);
      neg4[r] = x.neg4 + row * (x.ld / 4);
      sum4[r] = x.sum4 + row * (x.ld / 4);
      sum32[r] = x.sum32 + row * (x.ld / 32);
      sum16[r] = x.sum16 + row * (x.ld / 16);
    }
  }
  void advance(int64_t values) {
    for (int r = 0; r < R; ++r) {
      q[r] += values;
      d[r] += values / 32;
      lane_d[r] += values / 4;
      neg4[r] += values / 4;
      sum4[r] += values / 4;
      sum32[r] += values / 32;
      sum16[r] += values / 16;
    }
  }
};

// IQ4_XS's eight sub-block steps d (ls_c - 32) (exact products; d the block's fp16 scale, at
// byte 0), ls_c 6 bits: a nibble of bytes 4-7 and 2 bits of the u16 at byte 2.
inline __m256 iq4_xs_steps(const uint8_t* blk, float d) {
  uint32_t low;
  uint16_t high;
  std::memcpy(&high, blk + 2, 2);
  std::memcpy(&low, blk + 4, 4);
  const __m256i ls = _mm256_or_si256(
      _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(low)),
                                         _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)), _mm256_set1_epi32(15)),
      _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(high),
                                                           _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                                         _mm256_set1_epi32(3)), 4));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(ls, _mm256_set1_epi32(32))), _mm256_set1_ps(d));
}

// Block b of a row's arrays (Int8Rows, this row's): its scale, and from s4 (each 4 codes' sum)
// lane_d, neg4, sum4 and sum32.
inline void store_block_sums(int64_t b, float scale, __m256i s4, float* d, float* lane_d, int32_t* neg4, float* sum4,
                             float* sum32) {
  const __m256 sc = _mm256_set1_ps(scale);
  _mm256_storeu_ps(lane_d + 8 * b, sc);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(neg4 + 8 * b), _mm256_sub_epi32(_mm256_setzero_si256(), s4));
  _mm256_storeu_ps(sum4 + 8 * b, _mm256_mul_ps(sc, _mm256_cvtepi32_ps(s4)));
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), s4);
  int32_t sum = 0;
  for (int l = 0; l < 8; ++l) sum += lanes[l];
  sum32[b] = scale * static_cast<float>(sum);
  d[b] = scale;
}

}  // namespace
}  // namespace fastarch::cpu
