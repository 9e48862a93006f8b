// The CUDA launcher of the linear layer on GGUF's block-quantized weights (qlinear_kernels.cu),
// for qlinear_cuda.cpp: the glue checks and allocates with torch, this only launches. Returns the
// launch's error (cudaSuccess otherwise); nothing here synchronizes.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/linear/linear_launch.h"  // LinearDtype
#include "qlinear/qlinear_formats.h"        // Quant, kQuantBlock, quant_block_bytes

namespace fastarch::cuda {

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
template <Quant Q, LinearDtype D>
cudaError_t quantized_linear_forward(const QuantLinearArgs& a, cudaStream_t stream);

}  // namespace fastarch::cuda
