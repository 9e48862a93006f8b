// The CPU 3x3 convolution by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, "Fast
// Algorithms for Convolutional Neural Networks", 2015), fp32, channels-last, stride 1, padding
// 1: each 2x2 block of outputs ("tile") comes from the 4x4 input patch around it as
//   Y = A^T [ sum over input channels of (G g G^T) * (B^T d B) ] A
// (* elementwise over the 4x4 positions e), so a tile costs 16 products per input/output
// channel pair where the direct convolution costs 36: the 16 positions are 16 independent
// matrix products  M_e (tiles x Co) = V_e (tiles x Ci) U_e (Ci x Co), U = G g G^T per filter.
// The transforms' coefficients are 0, +-1 and 1/2, so no value is scaled by more than 2 and
// the rounding error stays that of the products' sums (tests/nn/test_conv.py measures it against
// an fp64 reference, beside oneDNN's direct convolution).
//
// Work is cut into items of a block of tiles x a range of kPanel-wide output-channel panels;
// an item transforms its tiles' input into V (in L2), runs the 16 products per panel with a
// register-tiled kernel, and transforms each panel's M straight into the output (plus bias and
// an optional residual). Two builds of the item share the layouts of V, U and M and the order
// of every sum: AVX-512 (winograd_avx512.cpp, 14 tiles x 32 channels in 28 of its 32 zmm) and
// the portable kernels (winograd_generic.cpp, cpu/portable.h: 3 tiles x 32 channels in 12 of
// the 16 ymm of the AVX2 build; 3 x 16 in 12 xmm on the baseline). No torch headers here (the
// AVX-512 translation unit includes it).
#pragma once
#include <cstdint>

#include "cpu/isa.h"

namespace fastarch::cpu::winograd {

constexpr int64_t kMaxTileBlock = 56;  // tiles per item at most (Params::tile_block)
constexpr int64_t kPanel = 32;      // output channels per product panel (two zmm, four ymm columns)
constexpr int64_t kChunk = 16;      // input channels per V block (one zmm, two ymm)

struct Params {
  const float* x;     // (N, H, W, Ci) contiguous
  const float* u;     // (16, panels, ci_pad, kPanel): G g G^T, zero-padded channels
  const float* bias;  // (Co,) or null
  const float* add;   // (N, H, W, Co) contiguous or null: added to the output
  float* y;           // (N, H, W, Co) contiguous
  int64_t n, h, w, ci, co;
  int64_t ci_pad;     // ci rounded up to kChunk
  int64_t panels;     // co rounded up to kPanel, / kPanel
  int64_t tiles_h, tiles_w;
  int64_t tile_block;  // tiles per item (<= kMaxTileBlock)
  int64_t tiles() const { return n * tiles_h * tiles_w; }
};

// Tile index -> (image, tile row, tile column); tiles run row-major within an image.
struct TilePos {
  int64_t n, ty, tx;
};
inline TilePos locate(const Params& p, int64_t tile) {
  const int64_t per_image = p.tiles_h * p.tiles_w;
  return {tile / per_image, (tile % per_image) / p.tiles_w, tile % p.tiles_w};
}

// The tile's 4x4 input patch: row[a][b] the channels of input position (2 ty - 1 + a,
// 2 tx - 1 + b), null outside the image (the zero padding).
inline void patch_rows(const Params& p, const TilePos& tile, const float* (&row)[4][4]) {
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) {
      const int64_t yy = 2 * tile.ty - 1 + a, xx = 2 * tile.tx - 1 + b;
      row[a][b] = (yy >= 0 && yy < p.h && xx >= 0 && xx < p.w) ? p.x + ((tile.n * p.h + yy) * p.w + xx) * p.ci : nullptr;
    }
}

// V layout per item: (16 positions, ci_pad / kChunk, tile_block, kChunk): for one chunk of 16
// input channels the tiles are rows of 16 floats, so the product kernel finds row r's value of
// channel k at a constant offset r * 16 + k from one pointer.
inline float* v_at(float* v, int64_t e, int64_t chunk, int64_t chunks, int64_t tb, int64_t t) {
  return v + ((e * chunks + chunk) * tb + t) * kChunk;
}

// Floats of scratch one item needs: V, then M of one panel.
inline int64_t scratch_floats(const Params& p) { return 16 * p.ci_pad * p.tile_block + 16 * p.tile_block * kPanel; }
// Tiles per register tile of each build: the work plan (winograd_cpu.cpp) cuts tile blocks in
// multiples of it.
constexpr int64_t kRowsAvx512 = 14;
constexpr int64_t kRowsPortable = 3;

// Tiles [tile0, tile0 + count) (count <= p.tile_block), output panels [panel0, panel1).
void run_item_avx512(const Params& p, int64_t tile0, int64_t count, int64_t panel0, int64_t panel1, float* scratch);
// The same in portable build I (kPortableBuild of winograd_generic.cpp / winograd_avx2.cpp).
template <Isa I>
void run_item_generic(const Params& p, int64_t tile0, int64_t count, int64_t panel0, int64_t panel1, float* scratch);

}  // namespace fastarch::cpu::winograd
