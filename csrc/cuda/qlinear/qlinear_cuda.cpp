// CUDA implementation of fastarch::_quantized_linear: checks, allocation and launch on the
// current stream. Same semantics as the CPU backend (csrc/cpu/qlinear/qlinear_cpu.cpp); the
// kernel is in qlinear_kernels.cu (a few rows of x at a time: more rows run as groups of 16, each
// reading W's blocks again).
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "cuda/linear/linear_dtype.h"
#include "qlinear/qlinear_glue.h"
#include "qlinear_launch.h"

namespace fastarch::cuda {
namespace {

using at::Tensor;

constexpr const char* kWho = "fastarch::_quantized_linear (cuda)";

template <Quant Q>
cudaError_t forward(LinearDtype d, const QuantLinearArgs& a, cudaStream_t stream) {
  switch (d) {
    case LinearDtype::f32:
      return quantized_linear_forward<Q, LinearDtype::f32>(a, stream);
    case LinearDtype::f16:
      return quantized_linear_forward<Q, LinearDtype::f16>(a, stream);
    case LinearDtype::bf16:
      return quantized_linear_forward<Q, LinearDtype::bf16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

Tensor quantized_linear_cuda(const Tensor& x, const Tensor& blocks, int64_t quant, const std::optional<Tensor>& bias,
                             bool /*onednn: the CPU's GEMM choice*/, bool int8) {
  TORCH_CHECK(x.is_cuda(), kWho, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(!int8, kWho, ": x rounded to int8 (activations \"int8\") runs on the CPU only");
  const LinearDtype d = linear_dtype_of(x, kWho);
  qlinear_glue::check(kWho, x, blocks, quant, bias);
  const Quant q = static_cast<Quant>(quant);
  const int64_t rows = x.size(0), K = x.size(1), N = blocks.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty({rows, N}, x.options());
  if (rows == 0 || N == 0) return out;
  if (K == 0) return bias ? out.copy_(bias->expand({rows, N})) : out.zero_();
  TORCH_CHECK(rows <= 65535 * kQuantMaxRows, kWho, ": at most ", 65535 * kQuantMaxRows, " rows, got ", rows);
  const QuantLinearArgs a{x.data_ptr(), blocks.data_ptr<uint8_t>(), bias ? bias->data_ptr() : nullptr,
                          out.data_ptr(), rows, K, N, x.stride(0)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err = cudaErrorInvalidValue;
  switch (q) {
    case Quant::q4_0:
      err = forward<Quant::q4_0>(d, a, stream);
      break;
    case Quant::q4_1:
      err = forward<Quant::q4_1>(d, a, stream);
      break;
    case Quant::q8_0:
      err = forward<Quant::q8_0>(d, a, stream);
      break;
    default:  // the Python backend table sends the other formats to the Triton kernel
      TORCH_CHECK(false, kWho, ": the CUDA kernel reads Q4_0, Q4_1 and Q8_0 blocks, got ggml type ", quant);
  }
  C10_CUDA_CHECK(err);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastarch, CUDA, m) { m.impl("_quantized_linear", &quantized_linear_cuda); }

}  // namespace fastarch::cuda
