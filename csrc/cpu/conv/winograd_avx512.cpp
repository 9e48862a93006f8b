// AVX-512 build of the Winograd F(2x2, 3x3) convolution item (winograd.h): input transform into
// V, the 16 products per panel on a 14 x 32 register tile, output transform with bias and
// residual. Compiled for AVX-512 through the pragma below and called only after a run-time CPU
// check (winograd_cpu.cpp); no torch headers.
#include <immintrin.h>

#include <cstdint>
#include <utility>

#include "winograd.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

namespace fastarch::cpu::winograd {
namespace {

constexpr int kRows = 14;  // register tile: kRows tiles x kPanel channels = 28 accumulators

inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// V = B^T d B for each tile and input channel, d the tile's 4x4 input patch (zeros outside the
// image), B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
void input_transform(const Params& p, int64_t tile0, int64_t count, float* v) {
  const int64_t chunks = p.ci_pad / kChunk;
  for (int64_t t = 0; t < count; ++t) {
    const float* row[4][4];
    patch_rows(p, locate(p, tile0 + t), row);
    for (int64_t c = 0; c < chunks; ++c) {
      const __mmask16 m = lanes(p.ci - c * kChunk);
      __m512 d[4][4];
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b)
          d[a][b] = row[a][b] ? _mm512_maskz_loadu_ps(m, row[a][b] + c * kChunk) : _mm512_setzero_ps();
      __m512 r[4][4];  // B^T d
      for (int b = 0; b < 4; ++b) {
        r[0][b] = _mm512_sub_ps(d[0][b], d[2][b]);
        r[1][b] = _mm512_add_ps(d[1][b], d[2][b]);
        r[2][b] = _mm512_sub_ps(d[2][b], d[1][b]);
        r[3][b] = _mm512_sub_ps(d[1][b], d[3][b]);
      }
      for (int a = 0; a < 4; ++a) {  // (B^T d) B
        _mm512_storeu_ps(v_at(v, 4 * a + 0, c, chunks, p.tile_block, t), _mm512_sub_ps(r[a][0], r[a][2]));
        _mm512_storeu_ps(v_at(v, 4 * a + 1, c, chunks, p.tile_block, t), _mm512_add_ps(r[a][1], r[a][2]));
        _mm512_storeu_ps(v_at(v, 4 * a + 2, c, chunks, p.tile_block, t), _mm512_sub_ps(r[a][2], r[a][1]));
        _mm512_storeu_ps(v_at(v, 4 * a + 3, c, chunks, p.tile_block, t), _mm512_sub_ps(r[a][1], r[a][3]));
      }
    }
  }
}

// c (rows x kPanel, row stride kPanel) = sum over chunks of a's rows (V layout) x b (ci_pad x
// kPanel): 2 * R accumulators, the b row loaded once per input channel, a broadcast from memory.
template <int R>
void product_rows(const float* a, int64_t a_chunk_stride, const float* b, int64_t chunks, float* c) {
  __m512 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const float* ac = a + ch * a_chunk_stride;
    const float* bc = b + ch * kChunk * kPanel;
#pragma GCC unroll 16
    for (int k = 0; k < kChunk; ++k) {
      const __m512 b0 = _mm512_loadu_ps(bc + k * kPanel), b1 = _mm512_loadu_ps(bc + k * kPanel + 16);
#pragma GCC unroll 14
      for (int r = 0; r < R; ++r) {
        const __m512 av = _mm512_set1_ps(ac[r * kChunk + k]);
        lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
        hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(c + r * kPanel, lo[r]);
    _mm512_storeu_ps(c + r * kPanel + 16, hi[r]);
  }
}

template <int... Rs>
struct RowKernels {
  using Fn = void (*)(const float*, int64_t, const float*, int64_t, float*);
  static constexpr Fn table[] = {product_rows<Rs>...};
};

template <int... Is>
constexpr auto make_kernels(std::integer_sequence<int, Is...>) { return RowKernels<(Is + 1)...>{}; }

void product(const float* a, int64_t tb, const float* b, int64_t chunks, int64_t rows, float* c) {
  using Kernels = decltype(make_kernels(std::make_integer_sequence<int, kRows>{}));
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const int64_t r = rows - r0 < kRows ? rows - r0 : kRows;
    Kernels::table[r - 1](a + r0 * kChunk, tb * kChunk, b, chunks, c + r0 * kPanel);
  }
}

// Y = A^T M A (+ bias, + add) for each tile and the panel's channels, A^T = [[1, 1, 1, 0],
// [0, 1, -1, -1]]; the outputs of a tile beyond an odd image edge are not written.
void output_transform(const Params& p, int64_t tile0, int64_t count, int64_t panel, const float* mbuf) {
  for (int64_t t = 0; t < count; ++t) {
    const auto [n, ty, tx] = locate(p, tile0 + t);
    const bool down = 2 * ty + 1 < p.h, right = 2 * tx + 1 < p.w;
    for (int half = 0; half < 2; ++half) {
      const int64_t co = panel * kPanel + half * 16;
      if (co >= p.co) break;
      const __mmask16 m = lanes(p.co - co);
      __m512 s[2][4];  // A^T M
      for (int b = 0; b < 4; ++b) {
        const __m512 m0 = _mm512_loadu_ps(mbuf + (0 * 4 + b) * p.tile_block * kPanel + t * kPanel + half * 16);
        const __m512 m1 = _mm512_loadu_ps(mbuf + (1 * 4 + b) * p.tile_block * kPanel + t * kPanel + half * 16);
        const __m512 m2 = _mm512_loadu_ps(mbuf + (2 * 4 + b) * p.tile_block * kPanel + t * kPanel + half * 16);
        const __m512 m3 = _mm512_loadu_ps(mbuf + (3 * 4 + b) * p.tile_block * kPanel + t * kPanel + half * 16);
        s[0][b] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
        s[1][b] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
      }
      const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(m, p.bias + co) : _mm512_setzero_ps();
      for (int a = 0; a < 2; ++a) {
        if (a == 1 && !down) break;
        const int64_t at = ((n * p.h + 2 * ty + a) * p.w + 2 * tx) * p.co + co;
        __m512 y0 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s[a][0], s[a][1]), s[a][2]), bias);
        __m512 y1 = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s[a][1], s[a][2]), s[a][3]), bias);
        if (p.add) {
          y0 = _mm512_add_ps(y0, _mm512_maskz_loadu_ps(m, p.add + at));
          if (right) y1 = _mm512_add_ps(y1, _mm512_maskz_loadu_ps(m, p.add + at + p.co));
        }
        _mm512_mask_storeu_ps(p.y + at, m, y0);
        if (right) _mm512_mask_storeu_ps(p.y + at + p.co, m, y1);
      }
    }
  }
}

}  // namespace

void run_item_avx512(const Params& p, int64_t tile0, int64_t count, int64_t panel0, int64_t panel1, float* scratch) {
  float* v = scratch;
  const int64_t tb = p.tile_block;
  float* mbuf = scratch + 16 * p.ci_pad * tb;
  const int64_t chunks = p.ci_pad / kChunk;
  input_transform(p, tile0, count, v);
  for (int64_t panel = panel0; panel < panel1; ++panel) {
    for (int64_t e = 0; e < 16; ++e)
      product(v + e * chunks * tb * kChunk, tb, p.u + (e * p.panels + panel) * p.ci_pad * kPanel, chunks, count,
              mbuf + e * tb * kPanel);
    output_transform(p, tile0, count, panel, mbuf);
  }
}

}  // namespace fastarch::cpu::winograd

#pragma GCC pop_options
