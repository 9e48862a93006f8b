// CUDA implementation of fastarch::_group_norm_fwd / _group_norm_bwd: checks (the shared
// csrc/group_norms/group_norm_glue.h), allocation (outputs and the kernels' fp32 workspace,
// through torch's caching allocator) and launch on the current stream. Same semantics and
// outputs as the CPU backend (csrc/cpu/group_norms/group_norm_cpu.cpp); the kernels are in
// group_norm_kernels.cuh, launched through group_norm_launch.h.
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <tuple>

#include "group_norm_launch.h"
#include "group_norms/group_norm_glue.h"

namespace fastarch::cuda::gn {
namespace {

using at::Tensor;

constexpr const char* kFwd = "fastarch::_group_norm_fwd (cuda)";
constexpr const char* kBwd = "fastarch::_group_norm_bwd (cuda)";

Dtype dtype_of(const char* who, const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return Dtype::f32;
    case at::kHalf:
      return Dtype::f16;
    case at::kBFloat16:
      return Dtype::bf16;
    default:
      TORCH_CHECK(false, who, ": x must be float32, float16 or bfloat16, got ", x.scalar_type(),
                  x.scalar_type() == at::kDouble ? " (float64 group_norm runs on the cpu and reference backends only)"
                                                 : "");
  }
}

// One block per (sample, group, slice): blockIdx.x counts samples x groups.
void check_grid(const char* who, int64_t batch, int64_t groups) {
  TORCH_CHECK(batch * groups <= INT_MAX, who, ": N * num_groups = ", batch * groups,
              " exceeds the CUDA grid's 2^31 - 1 blocks");
}

cudaError_t launch_forward(Dtype d, const GroupNormForwardParams& p, const GroupNormPlan& plan, float* workspace,
                           cudaStream_t stream) {
  switch (d) {
    case Dtype::f32:
      return group_norm_forward<Dtype::f32>(p, plan, workspace, stream);
    case Dtype::f16:
      return group_norm_forward<Dtype::f16>(p, plan, workspace, stream);
    case Dtype::bf16:
      return group_norm_forward<Dtype::bf16>(p, plan, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(Dtype d, const GroupNormBackwardParams& p, const GroupNormPlan& plan, float* workspace,
                            cudaStream_t stream) {
  switch (d) {
    case Dtype::f32:
      return group_norm_backward<Dtype::f32>(p, plan, workspace, stream);
    case Dtype::f16:
      return group_norm_backward<Dtype::f16>(p, plan, workspace, stream);
    case Dtype::bf16:
      return group_norm_backward<Dtype::bf16>(p, plan, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

std::tuple<Tensor, Tensor, Tensor> group_norm_fwd_cuda(
    const Tensor& x, int64_t num_groups, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& scale, const std::optional<Tensor>& shift, double eps, bool silu,
    bool channels_last) {
  TORCH_CHECK(x.is_cuda(), kFwd, ": x must be a CUDA tensor, got ", x.device());
  const Dtype d = dtype_of(kFwd, x);
  group_norm_glue::check_forward(kFwd, x, num_groups, weight, bias, scale, shift, eps, channels_last);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0);
  check_grid(kFwd, n, num_groups);
  const auto stats = x.options().dtype(at::kFloat);
  Tensor y = at::empty(x.sizes(), x.options());
  Tensor mean = at::empty({n, num_groups}, stats);
  Tensor rstd = at::empty({n, num_groups}, stats);
  if (n == 0) return {y, mean, rstd};

  const GroupNormForwardParams p = group_norm_glue::forward_params(
      x, num_groups, weight, bias, scale, shift, eps, silu, channels_last, y, mean, rstd);
  const GroupNormPlan plan = group_norm_plan(p.batch, p.channels, p.spatial, p.groups, channels_last,
                                             static_cast<int>(x.element_size()), {p.x, p.y});
  Tensor workspace = at::empty({group_norm_forward_workspace(plan, p.batch, p.groups)}, stats);
  C10_CUDA_CHECK(launch_forward(d, p, plan, workspace.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> group_norm_bwd_cuda(
    const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& rstd, int64_t num_groups,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, const std::optional<Tensor>& scale,
    const std::optional<Tensor>& shift, bool silu, bool channels_last, bool need_dweight, bool need_dscale) {
  TORCH_CHECK(x.is_cuda(), kBwd, ": x must be a CUDA tensor, got ", x.device());
  const Dtype d = dtype_of(kBwd, x);
  group_norm_glue::check_backward(kBwd, dy, x, mean, rstd, num_groups, weight, bias, scale, shift, channels_last,
                                  at::kFloat);
  const c10::cuda::CUDAGuard guard(x.device());
  check_grid(kBwd, x.size(0), num_groups);
  Tensor dx = at::empty(x.sizes(), x.options());
  auto [dweight, dbias, dscale, dshift] = group_norm_glue::weight_gradients(
      x, channels_last, weight, bias, scale, shift, need_dweight, need_dscale);
  if (x.size(0) == 0) {  // sums over no samples
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias, dscale, dshift};
  }

  const GroupNormBackwardParams p = group_norm_glue::backward_params(
      dy, x, mean, rstd, num_groups, weight, bias, scale, shift, silu, channels_last, dx, dweight, dbias, dscale,
      dshift);
  const bool weight_grads = p.dweight || p.dbias || p.dscale || p.dshift;
  const GroupNormPlan plan = group_norm_plan(p.batch, p.channels, p.spatial, p.groups, channels_last,
                                             static_cast<int>(x.element_size()), {p.dy, p.x, p.dx});
  Tensor workspace = at::empty({group_norm_backward_workspace(plan, p.batch, p.channels, p.groups, weight_grads)},
                               x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_backward(d, p, plan, workspace.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
  return {dx, dweight, dbias, dscale, dshift};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastarch, CUDA, m) {
  m.impl("_group_norm_fwd", &group_norm_fwd_cuda);
  m.impl("_group_norm_bwd", &group_norm_bwd_cuda);
}

}  // namespace fastarch::cuda::gn
