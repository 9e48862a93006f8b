// The CUDA small-batch linear kernel's launcher (linear_kernels.cu), for linear_cuda.cpp.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastarch::cuda {

enum class LinearDtype { f32, f16, bf16 };

struct LinearArgs {
  const void* x;     // rows x in_features, row stride ldx, in the dtype
  const void* w;     // out_features x in_features, contiguous
  const void* bias;  // out_features or nullptr
  void* out;         // rows x out_features, contiguous
  int64_t rows, in_features, out_features, ldx;
};

template <LinearDtype D>
cudaError_t linear_forward(const LinearArgs& a, cudaStream_t stream);

}  // namespace fastarch::cuda
