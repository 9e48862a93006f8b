// Portable build of the Winograd F(2x2, 3x3) convolution item (winograd.h), compiled for the
// baseline and, as winograd_avx2.cpp, for AVX2 + FMA (cpu/portable.h). The steps, layouts and
// sums of winograd_avx512.cpp: input transform into V, the 16 products per panel, output
// transform with bias and residual. With fused multiply-adds (the AVX2 build) every output has
// the AVX-512 build's bits; the baseline rounds each product before its sum.
//
// AVX2 has 16 vector registers where AVX-512 has 32: the products' register tile is 3 tiles x
// 4 vectors (12 accumulators, 3 broadcast tile values, the panel row's vectors one at a time),
// one pass per 32-channel panel (two on the baseline's 4-lane vectors). Measured on Zen 4 at
// level avx2 against 6 tiles x 2 vectors (two passes): 1.45-1.8x oneDNN's AVX2 convolution on
// six of bench/conv3x3.py's shapes, where that tile reached 1.1-1.7x. Channel counts off the vector
// width go through a zero-padded copy where AVX-512 masks its loads and stores.
#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu/portable.h"
#include "cpu/portable_math.h"
#include "winograd.h"

FASTARCH_PORTABLE_BEGIN

namespace fastarch::cpu::winograd {
namespace {

using portable::kVecLanes;
using portable::Vec;

constexpr int kRows = kRowsPortable;  // register tile: kRows tiles x kCols vectors
constexpr int kCols = 4;
constexpr int kPass = kCols * kVecLanes;  // output channels of one pass of the register tile
static_assert(kChunk % kVecLanes == 0 && kPanel % kPass == 0);

// The first n values at p (n <= 0 reads nothing), zeros in the other lanes.
inline Vec load_first(const float* p, int64_t n) {
  if (n >= kVecLanes) return portable::load_vec(p);
  float lane[kVecLanes] = {};
  if (n > 0) std::memcpy(lane, p, n * sizeof(float));
  return portable::load_vec(lane);
}

// v's first n lanes to p.
inline void store_first(float* p, Vec v, int64_t n) {
  if (n >= kVecLanes) return portable::store_vec(p, v);
  float lane[kVecLanes];
  portable::store_vec(lane, v);
  std::memcpy(p, lane, n * sizeof(float));
}

// V = B^T d B for each tile and input channel, d the tile's 4x4 input patch (zeros outside the
// image and in the padded channels), B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
void input_transform(const Params& p, int64_t tile0, int64_t count, float* v) {
  const int64_t chunks = p.ci_pad / kChunk;
  for (int64_t t = 0; t < count; ++t) {
    const float* row[4][4];
    patch_rows(p, locate(p, tile0 + t), row);
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t k = 0; k < kChunk; k += kVecLanes) {
        const int64_t c0 = c * kChunk + k, left = p.ci - c0;
        Vec d[4][4];
        for (int a = 0; a < 4; ++a)
          for (int b = 0; b < 4; ++b) d[a][b] = row[a][b] ? load_first(row[a][b] + c0, left) : Vec{};
        Vec r[4][4];  // B^T d
        for (int b = 0; b < 4; ++b) {
          r[0][b] = d[0][b] - d[2][b];
          r[1][b] = d[1][b] + d[2][b];
          r[2][b] = d[2][b] - d[1][b];
          r[3][b] = d[1][b] - d[3][b];
        }
        for (int a = 0; a < 4; ++a) {  // (B^T d) B
          portable::store_vec(v_at(v, 4 * a + 0, c, chunks, p.tile_block, t) + k, r[a][0] - r[a][2]);
          portable::store_vec(v_at(v, 4 * a + 1, c, chunks, p.tile_block, t) + k, r[a][1] + r[a][2]);
          portable::store_vec(v_at(v, 4 * a + 2, c, chunks, p.tile_block, t) + k, r[a][2] - r[a][1]);
          portable::store_vec(v_at(v, 4 * a + 3, c, chunks, p.tile_block, t) + k, r[a][1] - r[a][3]);
        }
      }
  }
}

// c (rows x kPass, row stride kPanel) = sum over chunks of a's rows (V layout) x b (ci_pad x
// kPass, row stride kPanel): R x kCols accumulators, the b row loaded once per input channel,
// a broadcast from memory; each sum runs over the input channels in order, as in AVX-512.
template <int R>
void product_rows(const float* a, int64_t a_chunk_stride, const float* b, int64_t chunks, float* c) {
  Vec acc[R][kCols] = {};
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const float* ac = a + ch * a_chunk_stride;
    const float* bc = b + ch * kChunk * kPanel;
#pragma GCC unroll 16
    for (int k = 0; k < kChunk; ++k) {
      Vec bv[kCols];
      for (int j = 0; j < kCols; ++j) bv[j] = portable::load_vec(bc + k * kPanel + j * kVecLanes);
#pragma GCC unroll 3
      for (int r = 0; r < R; ++r) {
        const Vec av = portable::splat(ac[r * kChunk + k]);
        for (int j = 0; j < kCols; ++j) acc[r][j] = portable::madd(av, bv[j], acc[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kCols; ++j) portable::store_vec(c + r * kPanel + j * kVecLanes, acc[r][j]);
}

template <int... Rs>
struct RowKernels {
  using Fn = void (*)(const float*, int64_t, const float*, int64_t, float*);
  static constexpr Fn table[] = {product_rows<Rs>...};
};

template <int... Is>
constexpr auto make_kernels(std::integer_sequence<int, Is...>) { return RowKernels<(Is + 1)...>{}; }

// One pass of kPass columns at a time over every row (one pass in the AVX2 build), so that the
// panel's columns stay in cache while the rows go by.
void product(const float* a, int64_t tb, const float* b, int64_t chunks, int64_t rows, float* c) {
  using Kernels = decltype(make_kernels(std::make_integer_sequence<int, kRows>{}));
  for (int64_t col = 0; col < kPanel; col += kPass)
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const int64_t r = rows - r0 < kRows ? rows - r0 : kRows;
      Kernels::table[r - 1](a + r0 * kChunk, tb * kChunk, b + col, chunks, c + r0 * kPanel + col);
    }
}

// Y = A^T M A (+ bias, + add) for each tile and the panel's channels, A^T = [[1, 1, 1, 0],
// [0, 1, -1, -1]]; the outputs of a tile beyond an odd image edge are not written.
void output_transform(const Params& p, int64_t tile0, int64_t count, int64_t panel, const float* mbuf) {
  const int64_t stride = p.tile_block * kPanel;  // between M's positions
  for (int64_t t = 0; t < count; ++t) {
    const auto [n, ty, tx] = locate(p, tile0 + t);
    const bool down = 2 * ty + 1 < p.h, right = 2 * tx + 1 < p.w;
    for (int64_t k = 0; k < kPanel; k += kVecLanes) {
      const int64_t co = panel * kPanel + k, left = p.co - co;
      if (left <= 0) break;
      const float* m = mbuf + t * kPanel + k;
      Vec s[2][4];  // A^T M
      for (int b = 0; b < 4; ++b) {
        const Vec m0 = portable::load_vec(m + (0 * 4 + b) * stride), m1 = portable::load_vec(m + (1 * 4 + b) * stride);
        const Vec m2 = portable::load_vec(m + (2 * 4 + b) * stride), m3 = portable::load_vec(m + (3 * 4 + b) * stride);
        s[0][b] = (m0 + m1) + m2;
        s[1][b] = (m1 - m2) - m3;
      }
      const Vec bias = p.bias ? load_first(p.bias + co, left) : Vec{};
      for (int a = 0; a < 2; ++a) {
        if (a == 1 && !down) break;
        const int64_t at = ((n * p.h + 2 * ty + a) * p.w + 2 * tx) * p.co + co;
        Vec y0 = ((s[a][0] + s[a][1]) + s[a][2]) + bias;
        Vec y1 = ((s[a][1] - s[a][2]) - s[a][3]) + bias;
        if (p.add) {
          y0 += load_first(p.add + at, left);
          if (right) y1 += load_first(p.add + at + p.co, left);
        }
        store_first(p.y + at, y0, left);
        if (right) store_first(p.y + at + p.co, y1, left);
      }
    }
  }
}

}  // namespace

template <Isa I>
void run_item_generic(const Params& p, int64_t tile0, int64_t count, int64_t panel0, int64_t panel1, float* scratch) {
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

template void run_item_generic<kPortableBuild>(const Params&, int64_t, int64_t, int64_t, int64_t, float*);

}  // namespace fastarch::cpu::winograd

FASTARCH_PORTABLE_END
