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

#include "qlinear_launch.h"

namespace fastarch::cuda {
namespace {

using at::Tensor;

constexpr const char* kWho = "fastarch::_quantized_linear (cuda)";

QuantLinearDtype dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return QuantLinearDtype::f32;
    case at::kHalf:
      return QuantLinearDtype::f16;
    case at::kBFloat16:
      return QuantLinearDtype::bf16;
    default:
      TORCH_CHECK(false, kWho, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
}

template <Quant Q>
cudaError_t forward(QuantLinearDtype d, const QuantLinearArgs& a, cudaStream_t stream) {
  switch (d) {
    case QuantLinearDtype::f32:
      return quantized_linear_forward<Q, QuantLinearDtype::f32>(a, stream);
    case QuantLinearDtype::f16:
      return quantized_linear_forward<Q, QuantLinearDtype::f16>(a, stream);
    case QuantLinearDtype::bf16:
      return quantized_linear_forward<Q, QuantLinearDtype::bf16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

Tensor quantized_linear_cuda(const Tensor& x, const Tensor& blocks, int64_t quant, const std::optional<Tensor>& bias,
                             bool /*onednn: the CPU's GEMM choice*/) {
  TORCH_CHECK(x.is_cuda(), kWho, ": x must be a CUDA tensor, got ", x.device());
  const QuantLinearDtype d = dtype_of(x);
  TORCH_CHECK(quant == 2 || quant == 3 || quant == 8, kWho, ": quant must be 2 (Q4_0), 3 (Q4_1) or 8 (Q8_0), got ",
              quant);
  const Quant q = static_cast<Quant>(quant);
  TORCH_CHECK(x.dim() == 2, kWho, ": x must be 2-D (rows, in_features), got ", x.sizes());
  const int64_t rows = x.size(0), K = x.size(1);
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, kWho, ": x must have a contiguous last dim");
  TORCH_CHECK(K % kQuantBlock == 0, kWho, ": in_features must be a multiple of 32, got ", K);
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.is_contiguous() &&
                  blocks.size(1) == K / kQuantBlock * quant_block_bytes(q),
              kWho, ": blocks must be contiguous uint8 (out_features, ", K / kQuantBlock * quant_block_bytes(q),
              "), got ", blocks.scalar_type(), " ", blocks.sizes());
  TORCH_CHECK(blocks.device() == x.device(), kWho, ": blocks must be on x's device ", x.device(), ", got ",
              blocks.device());
  const int64_t N = blocks.size(0);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                kWho, ": bias must be a contiguous (", N, ",) tensor of x's dtype ", x.scalar_type(), " on x's device ",
                x.device(), ", got ", bias->scalar_type(), " ", bias->sizes(), " on ", bias->device());
  }
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
  }
  C10_CUDA_CHECK(err);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastarch, CUDA, m) { m.impl("_quantized_linear", &quantized_linear_cuda); }

}  // namespace fastarch::cuda
