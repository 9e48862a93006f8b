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

struct QuantLinearParams {
  const float* x;     // rows x in_features fp32 (the glue widens fp16/bf16), row stride ldx
  const uint8_t* w;   // out_features rows of in_features / 32 blocks, contiguous
  const void* bias;   // out_features or nullptr, in dtype
  void* out;          // rows x out_features, contiguous, in dtype
  int64_t rows, in_features, out_features, ldx;
};

// Output columns [begin, end) of every row (begin a multiple of kQuantColChunk).
template <Isa I, Quant Q, Dtype D>
void qlinear_cols_generic(const QuantLinearParams& p, int64_t begin, int64_t end);
template <Quant Q, Dtype D>
void qlinear_cols_avx512(const QuantLinearParams& p, int64_t begin, int64_t end);

// W rows [begin, end) as fp32 values (row r at out + (r - begin) * in_features): exactly ggml's.
template <Isa I, Quant Q>
void dequantize_rows_generic(const uint8_t* w, int64_t in_features, int64_t begin, int64_t end, float* out);
template <Quant Q>
void dequantize_rows_avx512(const uint8_t* w, int64_t in_features, int64_t begin, int64_t end, float* out);

}  // namespace fastarch::cpu
