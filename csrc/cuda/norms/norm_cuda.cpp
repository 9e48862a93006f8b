// CUDA implementation of fastarch::_norm_fwd / _norm_bwd: checks, allocation (outputs and the
// backward's workspace, through torch's caching allocator) and launch on the current stream.
// Same semantics and outputs as the CPU backend (csrc/cpu/norms/norm_cpu.cpp); the kernels are in
// norm_kernels.cuh, launched through norm_launch.h.
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <ATen/core/Tensor.h>
#include <ATen/ops/clone.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "norms/norm_glue.h"
#include "norm_launch.h"

namespace fastarch::cuda {
namespace {

using at::Tensor;

Dtype dtype_of(const Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return Dtype::f32;
    case at::kHalf:
      return Dtype::f16;
    case at::kBFloat16:
      return Dtype::bf16;
    default:
      TORCH_CHECK(false, "fastarch cuda norm: ", name, " must be float32, float16 or bfloat16, got ", x.scalar_type(),
                  x.scalar_type() == at::kDouble ? " (float64 norms run on the cpu and reference backends only)" : "");
  }
}

constexpr const char* kWho = "fastarch cuda norm";

// The kernels' configuration, and so the fp32 summation order (the exact bits of every
// result), depends only on rows, cols and dtype. When cols allows 16-byte vector access, an
// input whose pointer or row stride does not (a slice at an odd column offset) is copied
// first, so that every layout of the same values gives the same bits (it would otherwise run
// the element-wise configuration). Rows (2-D) or vectors (1-D).
Tensor vector_ready(const Tensor& t, int64_t cols) {
  const int64_t vec = 16 / t.element_size();
  if (cols % vec != 0) return t;  // element-wise kernels for every layout
  const bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
      (t.dim() == 1 || t.size(0) <= 1 || t.stride(0) % vec == 0);
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

std::optional<Tensor> vector_ready(const std::optional<Tensor>& t, int64_t cols) {
  return t.has_value() ? std::optional<Tensor>(vector_ready(*t, cols)) : std::nullopt;
}

cudaError_t launch_forward(Dtype d, const NormForwardParams& p, cudaStream_t stream) {
  switch (d) {
    case Dtype::f32:
      return norm_forward<Dtype::f32>(p, stream);
    case Dtype::f16:
      return norm_forward<Dtype::f16>(p, stream);
    case Dtype::bf16:
      return norm_forward<Dtype::bf16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t plan_backward(Dtype d, const NormBackwardParams& p, bool weight_grads, NormBackwardPlan* plan) {
  switch (d) {
    case Dtype::f32:
      return norm_backward_plan<Dtype::f32>(p, weight_grads, plan);
    case Dtype::f16:
      return norm_backward_plan<Dtype::f16>(p, weight_grads, plan);
    case Dtype::bf16:
      return norm_backward_plan<Dtype::bf16>(p, weight_grads, plan);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(
    Dtype d, const NormBackwardPlan& plan, const NormBackwardParams& p, float* partials, void* dweight, void* dbias,
    cudaStream_t stream) {
  switch (d) {
    case Dtype::f32:
      return norm_backward<Dtype::f32>(plan, p, partials, dweight, dbias, stream);
    case Dtype::f16:
      return norm_backward<Dtype::f16>(plan, p, partials, dweight, dbias, stream);
    case Dtype::bf16:
      return norm_backward<Dtype::bf16>(plan, p, partials, dweight, dbias, stream);
  }
  return cudaErrorInvalidValue;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_cuda(
    const Tensor& x, const std::optional<Tensor>& residual, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, double eps, bool rms, double weight_offset) {
  TORCH_CHECK(x.is_cuda(), kWho, ": x must be a CUDA tensor, got ", x.device());
  norm_glue::check_forward(kWho, x, residual, weight, bias);
  norm_glue::check_weight_offset(kWho, weight, weight_offset);
  const Dtype d = dtype_of(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), cols = x.size(1);
  const auto stats = x.options().dtype(at::kFloat);
  const Tensor xv = vector_ready(x, cols);
  const std::optional<Tensor> residual_v = vector_ready(residual, cols);
  const std::optional<Tensor> weight_v = vector_ready(weight, cols);
  const std::optional<Tensor> bias_v = vector_ready(bias, cols);
  Tensor y = at::empty({rows, cols}, x.options());
  Tensor residual_out = residual ? at::empty({rows, cols}, x.options()) : at::empty({0}, x.options());
  Tensor mean = at::empty({rms ? 0 : rows}, stats);
  Tensor rstd = at::empty({rows}, stats);
  if (rows == 0) return {y, residual_out, mean, rstd};

  const NormForwardParams p =
      norm_glue::forward_params(xv, residual_v, weight_v, bias_v, y, residual_out, mean, rstd, eps, rms, weight_offset);
  C10_CUDA_CHECK(launch_forward(d, p, c10::cuda::getCurrentCUDAStream().stream()));
  return {y, residual_out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd_cuda(
    const Tensor& dy, const std::optional<Tensor>& dresidual_out, const Tensor& xin,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& mean, const Tensor& rstd, bool need_dweight,
    bool need_dbias, double weight_offset) {
  TORCH_CHECK(xin.is_cuda(), kWho, " backward: xin must be a CUDA tensor, got ", xin.device());
  const Dtype d = dtype_of(xin, "xin");
  norm_glue::check_backward(kWho, dy, dresidual_out, xin, weight, mean, rstd, need_dweight, at::kFloat);
  norm_glue::check_weight_offset(kWho, weight, weight_offset);
  const int64_t rows = xin.size(0), cols = xin.size(1);
  const c10::cuda::CUDAGuard guard(xin.device());

  Tensor dx = at::empty({rows, cols}, xin.options());
  const bool weight_grads = need_dweight || need_dbias;
  const bool empty = rows == 0 || cols == 0;
  // With no rows the sums are zeros; otherwise every element is written by the kernels.
  auto grad_vector = [&](bool need) {
    if (!need) return at::empty({0}, xin.options());
    return empty ? at::zeros({cols}, xin.options()) : at::empty({cols}, xin.options());
  };
  Tensor dweight = grad_vector(need_dweight);
  Tensor dbias = grad_vector(need_dbias);
  if (empty) return {dx, dweight, dbias};

  const Tensor dy_v = vector_ready(dy, cols);
  const std::optional<Tensor> dresidual_out_v = vector_ready(dresidual_out, cols);
  const Tensor xin_v = vector_ready(xin, cols);
  const std::optional<Tensor> weight_v = vector_ready(weight, cols);
  const NormBackwardParams p =
      norm_glue::backward_params(dy_v, dresidual_out_v, xin_v, weight_v, mean, rstd, dx, weight_offset);

  NormBackwardPlan plan;
  C10_CUDA_CHECK(plan_backward(d, p, weight_grads, &plan));
  // (2, partial_rows, cols) fp32 partial sums of dweight and dbias, summed by the last kernel.
  Tensor partials = weight_grads ? at::empty({2, plan.partial_rows, cols}, xin.options().dtype(at::kFloat)) : Tensor();
  C10_CUDA_CHECK(launch_backward(
      d, plan, p, weight_grads ? partials.data_ptr<float>() : nullptr, need_dweight ? dweight.data_ptr() : nullptr,
      need_dbias ? dbias.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream().stream()));
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastarch, CUDA, m) {
  m.impl("_norm_fwd", &norm_fwd_cuda);
  m.impl("_norm_bwd", &norm_bwd_cuda);
}

}  // namespace fastarch::cuda
