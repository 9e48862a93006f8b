// CUDA implementation of the activation kernel ops (fastarch::_bias_gelu_fwd / _bias_gelu_bwd,
// _gated_act_fwd / _gated_act_bwd, which serve swiglu and geglu):
// checks, allocation (outputs and the backward's workspace, through torch's caching allocator)
// and launch on the current stream. Same semantics and outputs as the CPU backend
// (csrc/cpu/activations/activation_cpu.cpp); the kernels are in activation_kernels.cuh,
// launched through activation_launch.h.
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>

#include "activation_launch.h"
#include "activations/activation_glue.h"

namespace fastarch::cuda::act {
namespace {

using at::Tensor;

constexpr const char* kWho = "fastarch cuda activation";

Dtype dtype_of(const Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return Dtype::f32;
    case at::kHalf:
      return Dtype::f16;
    case at::kBFloat16:
      return Dtype::bf16;
    default:
      TORCH_CHECK(false, kWho, ": ", name, " must be float32, float16 or bfloat16, got ", x.scalar_type(),
                  x.scalar_type() == at::kDouble ? " (float64 activations run on the cpu and reference backends only)"
                                                 : "");
  }
}

cudaError_t launch_forward(Dtype d, const ActivationForwardParams& p, cudaStream_t stream) {
  switch (d) {
    case Dtype::f32:
      return activation_forward<Dtype::f32>(p, stream);
    case Dtype::f16:
      return activation_forward<Dtype::f16>(p, stream);
    case Dtype::bf16:
      return activation_forward<Dtype::bf16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(Dtype d, const ActivationBackwardParams& p, float* partials, void* dbias, cudaStream_t stream) {
  switch (d) {
    case Dtype::f32:
      return activation_backward<Dtype::f32>(p, partials, dbias, stream);
    case Dtype::f16:
      return activation_backward<Dtype::f16>(p, partials, dbias, stream);
    case Dtype::bf16:
      return activation_backward<Dtype::bf16>(p, partials, dbias, stream);
  }
  return cudaErrorInvalidValue;
}

Tensor forward(Activation act, const Tensor& a, const Tensor* b, const std::optional<Tensor>& bias) {
  const Dtype d = dtype_of(a, b ? "gate" : "x");
  const c10::cuda::CUDAGuard guard(a.device());
  Tensor y = at::empty({a.size(0), a.size(1)}, a.options());
  if (a.size(0) == 0) return y;
  const ActivationForwardParams p = activation_glue::forward_params(act, a, b, bias, y);
  C10_CUDA_CHECK(launch_forward(d, p, c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

// Into da (and db for the gated activations), (rows, cols) with contiguous columns; returns
// dbias when need_dbias, else an empty tensor.
Tensor backward_into(
    Activation act, const Tensor& dy, const Tensor& a, const Tensor* b, const std::optional<Tensor>& bias,
    bool need_dbias, const Tensor& da, const Tensor& db) {
  const Dtype d = dtype_of(a, b ? "gate" : "x");
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t rows = a.size(0), cols = a.size(1);
  // With no rows the bias gradient is zeros; otherwise every element is written by the kernels.
  Tensor dbias = !need_dbias ? at::empty({0}, a.options()) : rows == 0 ? at::zeros({cols}, a.options())
                                                                       : at::empty({cols}, a.options());
  if (rows == 0) return dbias;
  const ActivationBackwardParams p = activation_glue::backward_params(act, dy, a, b, bias, da, b ? &db : nullptr);
  Tensor partials = need_dbias
      ? at::empty({activation_backward_partial_rows(rows, cols), cols}, a.options().dtype(at::kFloat))
      : Tensor();
  C10_CUDA_CHECK(launch_backward(d, p, need_dbias ? partials.data_ptr<float>() : nullptr,
                                 need_dbias ? dbias.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream().stream()));
  return dbias;
}

std::tuple<Tensor, Tensor, Tensor> backward(
    Activation act, const Tensor& dy, const Tensor& a, const Tensor* b, const std::optional<Tensor>& bias,
    bool need_dbias) {
  Tensor da = at::empty({a.size(0), a.size(1)}, a.options());
  Tensor db = b ? at::empty({a.size(0), a.size(1)}, a.options()) : Tensor();
  Tensor dbias = backward_into(act, dy, a, b, bias, need_dbias, da, db);
  return {da, db, dbias};
}

Tensor bias_gelu_fwd_cuda(const Tensor& x, const std::optional<Tensor>& bias, bool tanh) {
  TORCH_CHECK(x.is_cuda(), kWho, ": x must be a CUDA tensor, got ", x.device());
  activation_glue::check_matrix(kWho, x, "x");
  activation_glue::check_bias(kWho, bias, x);
  return forward(tanh ? Activation::gelu_tanh : Activation::gelu_erf, x, nullptr, bias);
}

std::tuple<Tensor, Tensor> bias_gelu_bwd_cuda(
    const Tensor& dy, const Tensor& x, const std::optional<Tensor>& bias, bool tanh, bool need_dbias) {
  TORCH_CHECK(x.is_cuda(), kWho, " backward: x must be a CUDA tensor, got ", x.device());
  activation_glue::check_matrix(kWho, x, "x");
  activation_glue::check_like(kWho, dy, "dy", x, "x");
  activation_glue::check_bias(kWho, bias, x);
  TORCH_CHECK(!need_dbias || bias, kWho, " backward: need_dbias without a bias");
  auto [dx, unused, dbias] = backward(tanh ? Activation::gelu_tanh : Activation::gelu_erf, dy, x, nullptr, bias, need_dbias);
  return {dx, dbias};
}

// act: "silu" (swiglu), "gelu" or "gelu_tanh" (geglu); see activation_glue::gated_activation.
Tensor gated_act_fwd_cuda(const Tensor& gate, const Tensor& up, c10::string_view act) {
  TORCH_CHECK(gate.is_cuda(), kWho, ": gate must be a CUDA tensor, got ", gate.device());
  const Activation f = activation_glue::gated_activation(kWho, std::string_view(act.data(), act.size()));
  activation_glue::check_matrix(kWho, gate, "gate");
  activation_glue::check_like(kWho, up, "up", gate, "gate");
  return forward(f, gate, &up, std::nullopt);
}

std::tuple<Tensor, Tensor> gated_act_bwd_cuda(const Tensor& dy, const Tensor& gate, const Tensor& up, c10::string_view act) {
  TORCH_CHECK(gate.is_cuda(), kWho, " backward: gate must be a CUDA tensor, got ", gate.device());
  const Activation f = activation_glue::gated_activation(kWho, std::string_view(act.data(), act.size()));
  activation_glue::check_matrix(kWho, gate, "gate");
  activation_glue::check_like(kWho, up, "up", gate, "gate");
  activation_glue::check_like(kWho, dy, "dy", gate, "gate");
  auto [dgate, dup, unused] = backward(f, dy, gate, &up, std::nullopt, false);
  return {dgate, dup};
}

// The gradient of the packed projection [up | gate] in one (rows, 2 cols) tensor, each half
// written in place: no concatenation of dup and dgate afterwards.
Tensor gated_act_bwd_packed_cuda(const Tensor& dy, const Tensor& proj, c10::string_view act) {
  TORCH_CHECK(proj.is_cuda(), kWho, " backward: proj must be a CUDA tensor, got ", proj.device());
  const Activation f = activation_glue::gated_activation(kWho, std::string_view(act.data(), act.size()));
  const auto [up, gate] = activation_glue::packed_halves(kWho, proj);
  activation_glue::check_like(kWho, dy, "dy", gate, "a half of proj");
  Tensor dproj = at::empty({proj.size(0), proj.size(1)}, proj.options());
  const auto [dup, dgate] = activation_glue::packed_halves(kWho, dproj);
  backward_into(f, dy, gate, &up, std::nullopt, false, dgate, dup);
  return dproj;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastarch, CUDA, m) {
  m.impl("_bias_gelu_fwd", &bias_gelu_fwd_cuda);
  m.impl("_bias_gelu_bwd", &bias_gelu_bwd_cuda);
  m.impl("_gated_act_fwd", &gated_act_fwd_cuda);
  m.impl("_gated_act_bwd", &gated_act_bwd_cuda);
  m.impl("_gated_act_bwd_packed", &gated_act_bwd_packed_cuda);
}

}  // namespace fastarch::cuda::act
