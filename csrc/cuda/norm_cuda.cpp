// CUDA implementation of fastarch::_norm_fwd / _norm_bwd: checks, allocation (outputs and the
// backward's workspace, through torch's caching allocator) and launch on the current stream.
// Same semantics and outputs as the CPU backend (csrc/cpu/norm_cpu.cpp); the kernels are in
// norm_kernels.cuh, launched through norm_launch.h.
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

void check_device(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), "fastarch cuda norm: ", name, " must be on x's device ",
              x.device(), ", got ", t.device());
}

void check_rows(const Tensor& t, const char* name, const Tensor& x) {
  check_device(t, name, x);
  TORCH_CHECK(t.sizes() == x.sizes(), "fastarch cuda norm: ", name, " must have x's shape ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastarch cuda norm: ", name, " must have dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "fastarch cuda norm: ", name, " must have contiguous rows");
}

void check_vector(const Tensor& t, const char* name, const Tensor& x) {
  check_device(t, name, x);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1) && t.is_contiguous(), "fastarch cuda norm: ", name,
              " must be a contiguous vector of size ", x.size(1), ", got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastarch cuda norm: ", name, " must have dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
}

void check_stats(const Tensor& t, const char* name, const Tensor& x, int64_t rows) {
  check_device(t, name, x);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == rows, "fastarch cuda norm backward: ",
              name, " must be a contiguous float32 vector of size ", rows, ", got ", t.scalar_type(), " of shape ",
              t.sizes());
}

const void* data_or_null(const std::optional<Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

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
    const std::optional<Tensor>& bias, double eps, bool rms) {
  TORCH_CHECK(x.dim() == 2, "fastarch cuda norm: x must be 2-D (rows, cols), got shape ", x.sizes());
  TORCH_CHECK(x.is_cuda(), "fastarch cuda norm: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.size(1) >= 1, "fastarch cuda norm: x must have at least one column");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "fastarch cuda norm: x must have contiguous rows");
  const Dtype d = dtype_of(x, "x");
  if (residual) check_rows(*residual, "residual", x);
  if (weight) check_vector(*weight, "weight", x);
  if (bias) check_vector(*bias, "bias", x);
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

  NormForwardParams p{};
  p.x = xv.data_ptr();
  p.x_row_stride = xv.stride(0);
  p.residual = data_or_null(residual_v);
  p.residual_row_stride = residual_v ? residual_v->stride(0) : 0;
  p.weight = data_or_null(weight_v);
  p.bias = data_or_null(bias_v);
  p.y = y.data_ptr();
  p.residual_out = residual ? residual_out.data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.data_ptr();
  p.rstd = rstd.data_ptr();
  p.rows = rows;
  p.cols = cols;
  p.eps = eps;
  p.rms = rms;
  C10_CUDA_CHECK(launch_forward(d, p, c10::cuda::getCurrentCUDAStream().stream()));
  return {y, residual_out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd_cuda(
    const Tensor& dy, const std::optional<Tensor>& dresidual_out, const Tensor& xin,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& mean, const Tensor& rstd, bool need_dweight,
    bool need_dbias) {
  TORCH_CHECK(xin.dim() == 2, "fastarch cuda norm backward: xin must be 2-D (rows, cols), got shape ", xin.sizes());
  TORCH_CHECK(xin.is_cuda(), "fastarch cuda norm backward: xin must be a CUDA tensor, got ", xin.device());
  TORCH_CHECK(xin.size(1) <= 1 || xin.stride(1) == 1, "fastarch cuda norm backward: xin must have contiguous rows");
  const Dtype d = dtype_of(xin, "xin");
  check_rows(dy, "dy", xin);
  if (dresidual_out) check_rows(*dresidual_out, "dresidual_out", xin);
  if (weight) check_vector(*weight, "weight", xin);
  const bool rms = !mean.has_value();
  const int64_t rows = xin.size(0), cols = xin.size(1);
  check_stats(rstd, "rstd", xin, rows);
  if (mean) check_stats(*mean, "mean", xin, rows);
  TORCH_CHECK(!need_dweight || weight, "fastarch cuda norm backward: need_dweight without a weight");
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
  NormBackwardParams p{};
  p.dy = dy_v.data_ptr();
  p.dy_row_stride = dy_v.stride(0);
  p.dresidual_out = data_or_null(dresidual_out_v);
  p.dresidual_out_row_stride = dresidual_out_v ? dresidual_out_v->stride(0) : 0;
  p.xin = xin_v.data_ptr();
  p.xin_row_stride = xin_v.stride(0);
  p.weight = data_or_null(weight_v);
  p.mean = mean ? mean->data_ptr() : nullptr;
  p.rstd = rstd.data_ptr();
  p.dx = dx.data_ptr();
  p.rows = rows;
  p.cols = cols;
  p.rms = rms;

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
