// One decode step of a LLaMA-family decoder's layers in one call: the loop of
// fastarch/models/llama.py (Llama._decode) with no Python between its ops. A step of a small
// model is a few hundred kernel calls of tens of microseconds each; called one by one from
// Python, their argument checks and dispatch cost a fifth of the step on a 2-core CPU.
//
// The loop calls the same kernels the Python path's registry chose (fastarch::_norm_fwd,
// _linear, _rotary, _append_kv, _attention_decode, _gated_act_fwd at the CPU key), with the
// same arguments in the same order, so its results equal the Python path's bit for bit
// (tests/models/test_llama_fused_step.py). The Python side calls it only when every op of the
// step chose its CPU kernel, and checks every argument first (shapes fixed by the config, the
// cache's room on the host); the products past the linear kernel's rows (linear_kernel false)
// run on PyTorch's GEMM, as the registry's reference backend does.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastarch::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr int64_t kWeightsPerLayer = 6;  // input norm, qkv, o, post-attention norm, gate_up, down
constexpr int64_t kBiasesPerLayer = 4;   // qkv, o, gate_up, down (None where the layer has none)

// The kernels, called below autograd at the CPU key (this op only runs without gradients).
template <class Signature>
c10::TypedOperatorHandle<Signature> kernel(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const c10::DispatchKeySet kCpu(c10::DispatchKey::CPU);

struct Kernels {
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, bool)>
      norm = kernel<std::tuple<Tensor, Tensor, Tensor, Tensor>(
          const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, bool)>("fastarch::_norm_fwd");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const OptTensor&)> linear =
      kernel<Tensor(const Tensor&, const Tensor&, const OptTensor&)>("fastarch::_linear");
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, bool, bool)>
      rotary = kernel<std::tuple<Tensor, Tensor>(
          const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, bool, bool)>("fastarch::_rotary");
  c10::TypedOperatorHandle<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)> append =
      kernel<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>("fastarch::_append_kv");
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, double, int64_t)>
      decode = kernel<std::tuple<Tensor, Tensor>(
          const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, double, int64_t)>("fastarch::_attention_decode");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, c10::string_view)> gated =
      kernel<Tensor(const Tensor&, const Tensor&, c10::string_view)>("fastarch::_gated_act_fwd");
};

const Kernels& kernels() {
  static const Kernels k;  // looked up once: the schemas are registered before any call
  return k;
}

struct Step {
  const Kernels& ops;
  bool linear_kernel;

  Tensor linear(const Tensor& x, const Tensor& weight, const OptTensor& bias) const {
    return linear_kernel ? ops.linear.redispatch(kCpu, x, weight, bias) : at::linear(x, weight, bias);
  }
  // RMSNorm of x (+ residual): (y, the new residual stream)
  std::tuple<Tensor, Tensor> norm(const Tensor& x, const OptTensor& residual, const Tensor& weight, double eps) const {
    auto [y, residual_out, mean, rstd] = ops.norm.redispatch(kCpu, x, residual, weight, std::nullopt, eps, true);
    return {y, residual.has_value() ? residual_out : x};
  }
};

Tensor llama_decode_layers_cpu(const Tensor& x, at::TensorList weights, const c10::List<OptTensor>& biases,
                               at::TensorList k_caches, at::TensorList v_caches, const Tensor& cos, const Tensor& sin,
                               const Tensor& offsets, const Tensor& seqlens_before, const Tensor& seqlens_after,
                               at::ArrayRef<double> eps, int64_t batch, int64_t n_head, int64_t n_kv,
                               int64_t head_dim, double scale, int64_t window_left, bool linear_kernel) {
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kWeightsPerLayer * L + 1 &&
                  static_cast<int64_t>(biases.size()) == kBiasesPerLayer * L &&
                  static_cast<int64_t>(v_caches.size()) == L && static_cast<int64_t>(eps.size()) == 2 * L + 1,
              "fastarch::_llama_decode_layers: expected per layer 6 weights, 4 biases, a k and a v cache and 2 eps"
              " (and the final norm's weight and eps), got ", weights.size(), " weights, ", biases.size(),
              " biases, ", k_caches.size(), "/", v_caches.size(), " caches and ", eps.size(), " eps for ", L,
              " layers");
  TORCH_CHECK(x.dim() == 2 && x.size(0) % batch == 0, "fastarch::_llama_decode_layers: x must be (batch * n, hidden)");
  const int64_t n = x.size(0) / batch, H = n_head, Hkv = n_kv, D = head_dim;
  const Step step{kernels(), linear_kernel};
  auto [y, h] = step.norm(x, std::nullopt, weights[0], eps[0]);
  for (int64_t i = 0; i < L; ++i) {
    const Tensor* w = weights.data() + kWeightsPerLayer * i;
    auto bias = [&](int64_t j) -> OptTensor { return biases.get(kBiasesPerLayer * i + j); };
    // attention: (B n, (H + 2 Hkv) D) -> q (B, H, n, D), k, v (B, Hkv, n, D), views
    const Tensor heads = step.linear(y, w[1], bias(0)).view({batch, n, H + 2 * Hkv, D}).transpose(1, 2);
    const std::vector<Tensor> qkv = heads.split_with_sizes({H, Hkv, Hkv}, 1);
    auto [q, k] = step.ops.rotary.redispatch(kCpu, qkv[0], qkv[1], cos, sin, offsets, false, false);
    step.ops.append.redispatch(kCpu, k_caches[i], v_caches[i], k, qkv[2], seqlens_before);
    auto [out, lse] =
        step.ops.decode.redispatch(kCpu, q, k_caches[i], v_caches[i], seqlens_after, true, scale, window_left);
    const Tensor a = step.linear(out.transpose(1, 2).reshape({batch * n, H * D}), w[2], bias(1));
    std::tie(y, h) = step.norm(a, h, w[3], eps[2 * i + 1]);
    // SwiGLU feed-forward on the stacked gate/up projection's strided halves
    const std::vector<Tensor> gate_up = step.linear(y, w[4], bias(2)).chunk(2, -1);
    const Tensor s = step.ops.gated.redispatch(kCpu, gate_up[0], gate_up[1], "silu");
    std::tie(y, h) = step.norm(step.linear(s, w[5], bias(3)), h, weights[kWeightsPerLayer * (i + 1)], eps[2 * i + 2]);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastarch, CPU, m) { m.impl("_llama_decode_layers", &llama_decode_layers_cpu); }

}  // namespace fastarch::cpu
