// AVX-512 build of the quantized linear layer with x rounded to int8 (activations "int8") for
// more than a few rows of x (a prefill, a batch of sequences: qlinear_cpu.cpp, int8_panel_rows),
// on CPUs with AVX512-VNNI: the same arithmetic as qlinear_int8_avx512.cpp (each group of 32
// values, Q6_K's of 16, summed exactly in int32, then scaled by W's a times x's d in fp32),
// laid out for reuse instead of streaming.
//
// The few-row kernels put 64 values of one W row in a vector's lanes, 4 to a lane, so every
// vpdpbusd is followed by a conversion and a scaling of its 16 partial sums (~5 instructions per
// 64 products). Here 16 W rows (output columns) are packed once into a panel whose vector j of a
// group holds values 4j .. 4j + 3 of each column in its lanes: a group's 8 vpdpbusd (x's 4 codes
// broadcast) leave each lane the column's whole group sum, and one conversion and one scaling
// follow per 512 products. The panel stays in L1 while every row of x passes through it, 8 rows
// at a time (W's codes loaded once per 8 rows). vpdpbusd multiplies unsigned bytes by signed
// ones: the panel holds W's values v = u - o as signed codes and x's codes come biased by 128
// (Int8Tiles: q + 128, unsigned), the group's -128 sum v (a panel constant) starting each sum.
//
// Compiled with the target of qlinear_avx512.cpp (cpu/avx512_math.h's rule) and AVX512-VNNI
// for the functions that multiply; called only where the CPU has it (cpu/isa.h, int8_products()).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "qlinear.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

#include "cpu/avx512_math.h"
#include "qlinear_avx512.h"
#include "qlinear_int8_avx512.h"

namespace fastarch::cpu {
namespace {

// Values per group (one scale): 16 for Q6_K, else 32.
template <Quant Q>
constexpr int kGroup = Q == Quant::q6_k ? 16 : 32;
// Whether W's values have a min b (a u + b): Q4_1, Q5_1, Q4_K, Q5_K.
template <Quant Q>
constexpr bool kMins = kOffsetShift<Q> < 0;

// 16 W rows (output columns) packed: for each group of values, kGroup / 4 vectors of codes
// (lane l: column l's 4 values), the columns' scales a, mins b (formats with mins) and -128
// times the sum of the group's codes.
struct Panel {
  std::vector<int8_t> codes;
  std::vector<float> a, b;
  std::vector<int32_t> corr;
};

// The 16 x 16 dwords of r (r[l]: column l's 16 runs of 4 codes) transposed in registers, run j
// of every column into out[j]: within 128-bit lanes by unpacks, then the lanes by shuffles.
FASTARCH_VNNI void transpose16(const __m512i (&r)[16], __m512i (&out)[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4 i + m], lane k: columns 4i .. 4i + 3 of run 4k + m
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int m = 0; m < 4; ++m) {
    const __m512i e0 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x44), e1 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xEE);
    const __m512i f0 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x44);
    const __m512i f1 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xEE);
    out[m] = _mm512_shuffle_i32x4(e0, f0, 0x88);
    out[4 + m] = _mm512_shuffle_i32x4(e0, f0, 0xDD);
    out[8 + m] = _mm512_shuffle_i32x4(e1, f1, 0x88);
    out[12 + m] = _mm512_shuffle_i32x4(e1, f1, 0xDD);
  }
}

// Columns n0 .. n0 + cols - 1 of W (rows of row_bytes bytes, K values) into the panel: a unit
// of blocks (a pair of 32-value blocks, or a super-block's 4 chunks) of each column unpacked
// into a scratch, then each chunk's 16 columns transposed.
template <Quant Q>
FASTARCH_VNNI void pack(const uint8_t* w, int64_t row_bytes, int64_t K, int64_t n0, int cols, Panel& pn) {
  constexpr int G = kGroup<Q>, kSteps = G / 4, kPerChunk = 64 / G;
  constexpr int64_t kBytes = quant_block_bytes(Q), kValues = quant_block_values(Q);
  constexpr int kUnitChunks = kValues == kQuantBlock ? 1 : 4;
  const int64_t chunks = (K + 63) / 64, groups = K / G, nb = K / kValues;
  pn.codes.resize(static_cast<size_t>(64 * 16 * chunks));
  pn.a.assign(static_cast<size_t>(16 * groups), 0.0f);
  pn.b.assign(kMins<Q> ? static_cast<size_t>(16 * groups) : 0, 0.0f);
  pn.corr.resize(static_cast<size_t>(16 * groups));
  const int offset = kOffsetShift<Q> < 0 ? 0 : 1 << kOffsetShift<Q>;
  alignas(64) int8_t scratch[kUnitChunks][16][64] = {};  // (columns past cols stay zero)
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t units = kValues == kQuantBlock ? (nb + 1) / 2 : nb;
  for (int64_t unit = 0; unit < units; ++unit) {
    for (int l = 0; l < cols; ++l) {
      const uint8_t* row = w + (n0 + l) * row_bytes;
      auto take = [&](int p, const Chunk& c) __attribute__((always_inline)) {
        const int64_t chunk = unit * kUnitChunks + p;
        _mm512_store_si512(scratch[p][l], _mm512_sub_epi8(c.codes, _mm512_set1_epi8(static_cast<char>(offset))));
        alignas(64) float a[16], b[16];
        _mm512_store_ps(a, c.a);
        if constexpr (kLaneMins<Q>) _mm512_store_ps(b, c.b);
        for (int g = 0; g < kPerChunk && chunk * kPerChunk + g < groups; ++g) {
          pn.a[(chunk * kPerChunk + g) * 16 + l] = a[g * kSteps];
          if constexpr (kLaneMins<Q>) pn.b[(chunk * kPerChunk + g) * 16 + l] = b[g * kSteps];
        }
      };
      if constexpr (kValues == kQuantBlock) {
        const int64_t b = 2 * unit;
        take(0, pair_chunk<Q>(row + b * kBytes, b + 1 < nb ? row + (b + 1) * kBytes : kZeroBlock));
      } else {
        k_chunks<Q>(
            row + unit * kBytes, take,
            [&](__m256 dmin_m) __attribute__((always_inline)) {
              alignas(32) float m[8];
              _mm256_store_ps(m, dmin_m);
              for (int s = 0; s < 8; ++s) pn.b[(8 * unit + s) * 16 + l] = -m[s];
            });
      }
    }
    for (int p = 0; p < kUnitChunks; ++p) {
      const int64_t chunk = unit * kUnitChunks + p;
      __m512i r[16], v[16];
      for (int l = 0; l < 16; ++l) r[l] = _mm512_load_si512(scratch[p][l]);
      transpose16(r, v);
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(pn.codes.data() + 64 * (16 * chunk + j), v[j]);
      for (int g = 0; g < kPerChunk && chunk * kPerChunk + g < groups; ++g) {
        __m512i sum = _mm512_setzero_si512();
        for (int j = 0; j < kSteps; ++j) sum = _mm512_dpbusd_epi32(sum, bias, v[g * kSteps + j]);
        _mm512_storeu_si512(pn.corr.data() + 16 * (chunk * kPerChunk + g), _mm512_sub_epi32(_mm512_setzero_si512(), sum));
      }
    }
  }
}

// Group g of x's tiles (8 rows) times the panel's columns: acc[r] for row 8 g + r. Step j of a
// group of values: one vector of W's codes, multiplied into each row's 4 codes (broadcast), the
// rows' sums independent chains.
template <Quant Q>
FASTARCH_VNNI void panel_rows(const Panel& pn, const Int8Tiles& x, int64_t g, int64_t K, __m512 (&acc)[kInt8TileRows]) {
  constexpr int G = kGroup<Q>, kSteps = G / 4, T = kInt8TileRows;
  const uint8_t* q = x.q + g * x.ld * T;
  const float* d = x.d + g * (x.ld / 32) * T;
  const float* sum32 = x.sum32 + g * (x.ld / 32) * T;
  for (int r = 0; r < T; ++r) acc[r] = _mm512_setzero_ps();
  const int64_t groups = K / G;
  for (int64_t gi = 0; gi < groups; ++gi) {
    __m512i s[T];
    const __m512i corr = _mm512_loadu_si512(pn.corr.data() + 16 * gi);
    for (int r = 0; r < T; ++r) s[r] = corr;
#pragma GCC unroll 8
    for (int j = 0; j < kSteps; ++j) {
      const int64_t step = gi * kSteps + j;
      const __m512i w = _mm512_loadu_si512(pn.codes.data() + 64 * step);
#pragma GCC unroll 8
      for (int r = 0; r < T; ++r) {
        int32_t four;
        std::memcpy(&four, q + 4 * (step * T + r), 4);
        s[r] = _mm512_dpbusd_epi32(s[r], _mm512_set1_epi32(four), w);
      }
    }
    const __m512 a = _mm512_loadu_ps(pn.a.data() + 16 * gi);
    const int64_t block = gi * G / 32;
#pragma GCC unroll 8
    for (int r = 0; r < T; ++r) {
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r]), _mm512_mul_ps(a, _mm512_set1_ps(d[block * T + r])), acc[r]);
    }
    if constexpr (kMins<Q>) {
      const __m512 b = _mm512_loadu_ps(pn.b.data() + 16 * gi);
#pragma GCC unroll 8
      for (int r = 0; r < T; ++r) acc[r] = _mm512_fmadd_ps(b, _mm512_set1_ps(sum32[block * T + r]), acc[r]);
    }
  }
}

// (the exported function below is declared in qlinear.h without AVX512-VNNI: the kernels are
// inlined here, its body)
template <Quant Q, Dtype D>
__attribute__((target("avx512vnni"))) void panels(const QuantLinearParams& p, int64_t begin, int64_t end) {
  using L = avx512::LanesOf<D, false>;
  static_assert(kQuantColChunk == 16, "a panel of output columns is one vector");
  const int64_t row_bytes = p.in_features / quant_block_values(Q) * quant_block_bytes(Q);
  thread_local Panel pn;
  for (int64_t n0 = begin; n0 < end; n0 += kQuantColChunk) {
    const int cols = static_cast<int>(std::min(kQuantColChunk, end - n0));
    pack<Q>(p.w, row_bytes, p.in_features, n0, cols, pn);
    const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
    const __m512 bias = p.bias ? L::load(static_cast<const char*>(p.bias) + n0 * L::kBytes, mask)
                               : _mm512_setzero_ps();
    for (int64_t g = 0; g * kInt8TileRows < p.rows; ++g) {
      __m512 acc[kInt8TileRows];
      panel_rows<Q>(pn, *p.tiles, g, p.in_features, acc);
      const int64_t n = std::min(kInt8TileRows, p.rows - g * kInt8TileRows);
      for (int64_t r = 0; r < n; ++r) {
        const int64_t row = g * kInt8TileRows + r;
        L::store(static_cast<char*>(p.out) + (row * p.out_features + n0) * L::kBytes, _mm512_add_ps(acc[r], bias),
                 mask);
      }
    }
  }
}

}  // namespace

template <Quant Q, Dtype D>
void qlinear_int8_gemm_avx512(const QuantLinearParams& p, int64_t begin, int64_t end) {
  panels<Q, D>(p, begin, end);
}

#define FASTARCH_QLINEAR_INT8_GEMM_AVX512(Q)                                                      \
  template void qlinear_int8_gemm_avx512<Q, Dtype::f32>(const QuantLinearParams&, int64_t, int64_t); \
  template void qlinear_int8_gemm_avx512<Q, Dtype::f16>(const QuantLinearParams&, int64_t, int64_t); \
  template void qlinear_int8_gemm_avx512<Q, Dtype::bf16>(const QuantLinearParams&, int64_t, int64_t);
FASTARCH_QUANTS(FASTARCH_QLINEAR_INT8_GEMM_AVX512)
#undef FASTARCH_QLINEAR_INT8_GEMM_AVX512

}  // namespace fastarch::cpu

#pragma GCC pop_options
