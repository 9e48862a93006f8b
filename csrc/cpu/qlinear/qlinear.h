// The CPU linear layer on block-quantized weights (GGUF's blocks as the file stores them, every
// format of qlinear_formats.h): y = x W^T + b with W's values exactly those ggml's dequantize
// gives, sums in fp32. For a few rows of x (a decode step) the kernels read W's blocks once,
// widen each block to fp32 in registers and multiply it into every row of x: a Q4_K weight is
// 0.5625 bytes where bf16 is 2, and a decode step's cost is the weights' bytes. Two builds: AVX-512 (picked at run
// time when the CPU has it) and portable C++.
#pragma once
#include <cstdint>

#include "cpu/dtype.h"
#include "cpu/isa.h"
#include "qlinear/qlinear_formats.h"  // Quant, kQuantBlock, quant_block_bytes

namespace fastarch::cpu {

// The most rows of x one pass of the kernels takes (the glue loops over more) and the output
// columns a pass finishes together (their bias added and rounded by vector).
constexpr int64_t kQuantRowGroup = 8;
constexpr int64_t kQuantColChunk = 16;

// x's rows rounded to int8, each 32 values with their own scale (activations "int8";
// fastarch/ops/qlinear/reference.py, quantize_activations, is the definition): value j of a
// block is d q_j, d = max |x| / 127, q_j = round(x_j 127 / max |x|) (ties to even); a block
// holding an inf or a NaN has d NaN and codes 0. Each row's arrays are padded with zeros to ld
// values (a multiple of 64). Besides the codes and scales, what the vpdpbusd kernels read per 4
// (16, 32) values, made once per call by quantize_int8_rows_avx512 or _avx2 (the portable rounding,
// whose values go to the exact kernels, fills q and d only).
struct Int8Rows {
  const int8_t* q;      // rows x ld codes
  const float* d;       // rows x ld / 32: each block's scale
  const float* lane_d;  // rows x ld / 4: the scale of each 4 values
  const int32_t* neg4;  // rows x ld / 4: minus the sum of each 4 codes
  const float* sum4;    // rows x ld / 4: d times the sum of each 4 codes
  const float* sum32;   // rows x ld / 32: d times the sum of each block's codes
  const float* sum16;   // rows x ld / 16: the sum of each 16 codes (AVX-512 rounding only)
  int64_t ld;
  // q's order: as x's, or (AVX512-VNNI, Q4_K and Q5_K) in every 128 values the codes of
  // values 64-95 before those of 32-63, the order in which one 64-byte load of those formats'
  // 4-bit codes holds them (its low nibbles values 0-31 and 64-95, its high 32-63 and 96-127)
  bool k_pairs = false;
};

// Rounds rows of x (rows x K fp32, row stride ldx) into rows (the arrays of Int8Rows, each
// rows x its length, laid out by the caller; ld = K rounded up to 64).
template <Isa I>
void quantize_int8_rows_generic(const float* x, int64_t rows, int64_t K, int64_t ldx, const Int8Rows& out);
void quantize_int8_rows_avx512(const float* x, int64_t rows, int64_t K, int64_t ldx, const Int8Rows& out);
void quantize_int8_rows_avx2(const float* x, int64_t rows, int64_t K, int64_t ldx, const Int8Rows& out);

// x's rows rounded to int8 (as Int8Rows) for the packed-panel GEMM, in groups of 8 rows
// interleaved so that one pointer reaches all 8: the codes 4j .. 4j + 3 of the group's rows
// side by side (32 bytes), each code biased by 128 (q + 128 as an unsigned byte); then each
// block's d and d times the sum of its codes, 8 rows side by side. Rows past the last are zeros.
struct Int8Tiles {
  const uint8_t* q;    // groups x ld / 4 x 8 rows x 4 codes
  const float* d;      // groups x ld / 32 x 8 rows
  const float* sum32;  // groups x ld / 32 x 8 rows
  int64_t ld;
};
constexpr int64_t kInt8TileRows = 8;

struct QuantLinearParams {
  const float* x;     // rows x in_features fp32 (the glue widens fp16/bf16), row stride ldx
  const uint8_t* w;   // out_features rows of in_features / 32 blocks, contiguous
  const void* bias;   // out_features or nullptr, in dtype
  void* out;          // rows x out_features, contiguous, in dtype
  int64_t rows, in_features, out_features, ldx;
  const Int8Rows* int8 = nullptr;  // activations "int8": x's rows rounded (then x is not read)
  const Int8Tiles* tiles = nullptr;  // the same for qlinear_int8_gemm_avx512
};

// Output columns [begin, end) of every row (begin a multiple of kQuantColChunk).
template <Isa I, Quant Q, Dtype D>
void qlinear_cols_generic(const QuantLinearParams& p, int64_t begin, int64_t end);
template <Quant Q, Dtype D>
void qlinear_cols_avx512(const QuantLinearParams& p, int64_t begin, int64_t end);
template <Quant Q, Dtype D>
void qlinear_cols_avx2(const QuantLinearParams& p, int64_t begin, int64_t end);

// The same with x rounded to int8 (p.int8): each block's codes times x's codes summed in int32,
// then scaled (cpu/isa.h, int8_products()): by vpdpbusd on zmm (AVX512-VNNI), or on ymm (AVX2
// build, kVnni: AVX-VNNI), or vpmaddubsw + vpmaddwd (AVX2). Elsewhere x's rounded values go to
// the kernels above.
template <Quant Q, Dtype D>
void qlinear_int8_cols_avx512(const QuantLinearParams& p, int64_t begin, int64_t end);
template <Quant Q, Dtype D, bool kVnni>
void qlinear_int8_cols_avx2(const QuantLinearParams& p, int64_t begin, int64_t end);
// The same for many rows of x (a prefill; AVX512-VNNI), x as p.tiles: W's columns packed 16 at
// a time and every group of 8 rows multiplied into them (qlinear_int8_gemm_avx512.cpp).
template <Quant Q, Dtype D>
void qlinear_int8_gemm_avx512(const QuantLinearParams& p, int64_t begin, int64_t end);

// W rows [begin, end) as fp32 values (row r at out + (r - begin) * in_features): exactly ggml's.
template <Isa I, Quant Q>
void dequantize_rows_generic(const uint8_t* w, int64_t in_features, int64_t begin, int64_t end, float* out);
template <Quant Q>
void dequantize_rows_avx512(const uint8_t* w, int64_t in_features, int64_t begin, int64_t end, float* out);

}  // namespace fastarch::cpu
