// The CUDA launcher of the linear layer on GGUF's block-quantized weights (qlinear_kernels.cu),
// for qlinear_cuda.cpp: the glue checks and allocates with torch, this only launches. Returns the
// launch's error (cudaSuccess otherwise); nothing here synchronizes.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastarch::cuda {

// ggml's type ids of the block formats the kernel reads (gguf's GGMLQuantizationType).
enum class Quant : int64_t { q4_0 = 2, q4_1 = 3, q8_0 = 8 };
enum class QuantLinearDtype { f32, f16, bf16 };

constexpr int64_t kQuantBlock = 32;  // values per block, in every format here

// Bytes per block: an fp16 scale d (Q4_1: then an fp16 offset m), then the values: Q4_0 and
// Q4_1 16 bytes of 4-bit values (byte j: value j in its low nibble, value j + 16 in its high),
// Q8_0 32 int8. A value is Q4_0 (q - 8) * d, Q4_1 q * d + m, Q8_0 q * d.
constexpr int64_t quant_block_bytes(Quant q) { return q == Quant::q4_0 ? 18 : q == Quant::q4_1 ? 20 : 34; }

// The most rows of x one pass of the kernel takes: more rows run as groups of this many, each
// reading W again (from L2, mostly).
constexpr int64_t kQuantMaxRows = 16;

struct QuantLinearArgs {
  const void* x;     // rows x in_features, row stride ldx, in the dtype
  const uint8_t* w;  // out_features rows of in_features / 32 blocks, contiguous, any byte address
  const void* bias;  // out_features or nullptr, in the dtype
  void* out;         // rows x out_features, contiguous, in the dtype
  int64_t rows, in_features, out_features, ldx;
};

// rows >= 1, out_features >= 1, in_features a positive multiple of 32 (the glue returns early
// otherwise), rows / kQuantMaxRows < 65536 (grid.y).
template <Quant Q, QuantLinearDtype D>
cudaError_t quantized_linear_forward(const QuantLinearArgs& a, cudaStream_t stream);

}  // namespace fastarch::cuda
