// Launchers of the CUDA norm kernels (csrc/cuda/norm_*.cu), callable from plain C++: the
// glue (norm_cuda.cpp) checks and allocates with torch, these only launch. Each returns the
// first CUDA error it met (cudaSuccess otherwise); nothing here synchronizes.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../norm_params.h"

namespace fastarch::cuda {

enum class Dtype { f32, f16, bf16 };

// Forward on `stream`; p.rows >= 1 and p.cols >= 1 (the glue returns early otherwise).
template <Dtype D>
cudaError_t norm_forward(const NormForwardParams& p, cudaStream_t stream);

// How the backward will run; computed first so that the glue can allocate the workspace.
struct NormBackwardPlan {
  // dweight/dbias partial sums: the workspace is (2, partial_rows, cols) fp32 (row 0 for
  // dweight, row 1 for dbias); 0 when neither gradient is wanted.
  int64_t partial_rows = 0;
  // The rest belongs to the launcher.
  bool weight_grads = false;
  bool looped = false;  // rows too long for registers: looped dx kernel + column-sum kernel
  int vec = 1;          // elements per vector access (16 bytes, or 1 when misaligned)
  int vectors_per_thread = 0;
  int threads_per_row = 0;
  int rows_per_block = 0;
  int64_t grid = 0;        // blocks of the dx kernel
  int64_t col_blocks = 0;  // looped only: grid of the column-sum kernel (col_blocks, partial_rows)
};

// p.rows >= 1 and p.cols >= 1; weight_grads: dweight or dbias is wanted.
template <Dtype D>
cudaError_t norm_backward_plan(const NormBackwardParams& p, bool weight_grads, NormBackwardPlan* plan);

// partials: the (2, plan.partial_rows, cols) fp32 workspace, or null when !plan.weight_grads.
// dweight, dbias: (cols,) in x's dtype, each null when not wanted.
template <Dtype D>
cudaError_t norm_backward(
    const NormBackwardPlan& plan, const NormBackwardParams& p, float* partials, void* dweight, void* dbias,
    cudaStream_t stream);

// Defined in norm_fwd_<dtype>.cu and norm_bwd_<dtype>.cu.
template <>
cudaError_t norm_forward<Dtype::f32>(const NormForwardParams&, cudaStream_t);
template <>
cudaError_t norm_forward<Dtype::f16>(const NormForwardParams&, cudaStream_t);
template <>
cudaError_t norm_forward<Dtype::bf16>(const NormForwardParams&, cudaStream_t);
template <>
cudaError_t norm_backward_plan<Dtype::f32>(const NormBackwardParams&, bool, NormBackwardPlan*);
template <>
cudaError_t norm_backward_plan<Dtype::f16>(const NormBackwardParams&, bool, NormBackwardPlan*);
template <>
cudaError_t norm_backward_plan<Dtype::bf16>(const NormBackwardParams&, bool, NormBackwardPlan*);
template <>
cudaError_t norm_backward<Dtype::f32>(
    const NormBackwardPlan&, const NormBackwardParams&, float*, void*, void*, cudaStream_t);
template <>
cudaError_t norm_backward<Dtype::f16>(
    const NormBackwardPlan&, const NormBackwardParams&, float*, void*, void*, cudaStream_t);
template <>
cudaError_t norm_backward<Dtype::bf16>(
    const NormBackwardPlan&, const NormBackwardParams&, float*, void*, void*, cudaStream_t);

}  // namespace fastarch::cuda
