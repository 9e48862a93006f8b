// CUDA implementation of fastarch::_rotary: checks, allocation and launch on the current
// stream. Same semantics and outputs as the CPU backend (csrc/cpu/rope/rope_cpu.cpp); the
// kernel is in rope_kernels.cuh, launched through rope_launch.h. Positions are not read on
// the host (the Python op asserts them on the device; the kernel never reads outside the
// table).
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "rope/rope_glue.h"
#include "rope_launch.h"

namespace fastarch::cuda {
namespace {

using at::Tensor;

constexpr const char* kWho = "fastarch::_rotary (cuda)";

RopeDtype dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return RopeDtype::f32;
    case at::kHalf:
      return RopeDtype::f16;
    case at::kBFloat16:
      return RopeDtype::bf16;
    default:
      TORCH_CHECK(false, kWho, ": q must be float32, float16 or bfloat16, got ", x.scalar_type(),
                  x.scalar_type() == at::kDouble ? " (float64 runs on the cpu and reference backends only)" : "");
  }
}

cudaError_t launch(RopeDtype d, const RopeParams& p, cudaStream_t stream) {
  switch (d) {
    case RopeDtype::f32:
      return rope_forward<RopeDtype::f32>(p, stream);
    case RopeDtype::f16:
      return rope_forward<RopeDtype::f16>(p, stream);
    case RopeDtype::bf16:
      return rope_forward<RopeDtype::bf16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

std::tuple<Tensor, Tensor> rotary_cuda(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                       const std::optional<Tensor>& positions, bool interleaved, bool inverse) {
  TORCH_CHECK(q.is_cuda(), kWho, ": q must be a CUDA tensor, got ", q.device());
  const RopeDtype d = dtype_of(q);
  rope_glue::check(kWho, q, k, cos, sin, positions, at::kFloat);
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor q_out = at::empty_like(q);
  Tensor k_out = at::empty_like(k);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(launch(d, rope_glue::params(q, q_out, cos, sin, positions, interleaved, inverse), stream));
  C10_CUDA_CHECK(launch(d, rope_glue::params(k, k_out, cos, sin, positions, interleaved, inverse), stream));
  return {q_out, k_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastarch, CUDA, m) { m.impl("_rotary", &rotary_cuda); }

}  // namespace fastarch::cuda
