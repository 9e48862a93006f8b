// CUDA implementation of fastarch::_linear: checks, allocation and launch on the current
// stream. Same semantics as the CPU backend (csrc/cpu/linear/linear_cpu.cpp); the kernel is in
// linear_kernels.cu.
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "linear/linear_glue.h"
#include "linear_dtype.h"
#include "linear_launch.h"

namespace fastarch::cuda {
namespace {

using at::Tensor;

constexpr const char* kWho = "fastarch::_linear (cuda)";

Tensor linear_cuda(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), kWho, ": x must be a CUDA tensor, got ", x.device());
  const LinearDtype d = linear_dtype_of(x, kWho);
  linear_glue::check(kWho, x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), N = weight.size(0);
  Tensor out = at::empty({rows, N}, x.options());
  if (rows == 0 || N == 0) return out;
  if (x.size(1) == 0) return bias ? out.copy_(bias->expand({rows, N})) : out.zero_();
  TORCH_CHECK(rows <= 65535 * 4, kWho, ": at most ", 65535 * 4, " rows, got ", rows);
  const Tensor xc = x.size(1) == 1 ? x.contiguous() : x;
  const LinearArgs a{xc.data_ptr(), weight.data_ptr(), bias ? bias->data_ptr() : nullptr, out.data_ptr(),
                     rows, x.size(1), N, xc.stride(0)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err = cudaErrorInvalidValue;
  switch (d) {
    case LinearDtype::f32:
      err = linear_forward<LinearDtype::f32>(a, stream);
      break;
    case LinearDtype::f16:
      err = linear_forward<LinearDtype::f16>(a, stream);
      break;
    case LinearDtype::bf16:
      err = linear_forward<LinearDtype::bf16>(a, stream);
      break;
  }
  C10_CUDA_CHECK(err);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastarch, CUDA, m) { m.impl("_linear", &linear_cuda); }

}  // namespace fastarch::cuda
