// A LLaMA-family decoder's layers in one call, for a decode step and for a prefill: the loops
// of fastarch/models/llama.py (Llama._decode, Llama._prefill) with no Python between their ops.
// A step of a small model is a few hundred kernel calls of tens of microseconds each; called one
// by one from Python, their argument checks and dispatch cost a fifth of a decode step on a
// 2-core CPU, and most of the time to the first token of a short prompt.
//
// The loops call the same kernels the Python path's registry chose (fastarch::_norm_fwd,
// _linear, _quantized_linear, _rotary, _append_kv, _attention_decode, _attention_fwd, _gated_act_fwd at the CPU
// key), with the same arguments in the same order, so their results equal the Python path's bit
// for bit (tests/models/test_llama_fused_step.py). The Python side calls them only when every op
// chose its CPU kernel, and checks every argument first (shapes fixed by the config, the cache's
// room on the host). The products run where the registry put them (Products below). The decode
// loop runs the small ops (norms, rotary, the gated activation) through step_ops.h, into
// outputs made once per step: what those ops run after their checks and allocation.
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include "cpu/linear/onednn_linear.h"
#include "cpu/models/step_ops.h"

#include <optional>
#include <tuple>
#include <vector>

namespace fastarch::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;


// The kernels, called below autograd at the CPU key (this op only runs without gradients).
template <class Signature>
c10::TypedOperatorHandle<Signature> kernel(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const c10::DispatchKeySet kCpu(c10::DispatchKey::CPU);

struct Kernels {
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, bool, double)>
      norm = kernel<std::tuple<Tensor, Tensor, Tensor, Tensor>(
          const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, bool, double)>(
          "fastarch::_norm_fwd");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const OptTensor&)> linear =
      kernel<Tensor(const Tensor&, const Tensor&, const OptTensor&)>("fastarch::_linear");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, int64_t, const OptTensor&, bool, bool)>
      quantized_linear = kernel<Tensor(const Tensor&, const Tensor&, int64_t, const OptTensor&, bool, bool)>(
          "fastarch::_quantized_linear");
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
  using AttentionFwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                  const OptTensor&, const OptTensor&, const OptTensor&, int64_t,
                                                  int64_t, bool, double, int64_t, int64_t, double, int64_t);
  c10::TypedOperatorHandle<AttentionFwd> attention = kernel<AttentionFwd>("fastarch::_attention_fwd");
};

const Kernels& kernels() {
  static const Kernels k;  // looked up once: the schemas are registered before any call
  return k;
}

// Where the products run, as fastarch.ops.linear's registry chose for the rows of the call
// (fastarch/ops/linear/backends.py): PyTorch's GEMM (the reference backend), the linear kernel
// (a few rows), oneDNN's matmul on the weight as it is (the cpu backend past its kernel's fp32
// rows), or PyTorch's fp32 GEMM on the 16-bit tensors widened, the result rounded once (past its
// 16-bit rows at level avx2: widened_linear there).
enum class Products : int64_t { torch = 0, kernel = 1, onednn = 2, widened = 3 };

// A linear layer of the lists: its weight, format (a ggml type id of _quantized_linear, or 0 for
// a dense weight) and bias; a stacked projection (q/k/v, gate/up) whose parts come in mixed
// block formats (fastarch.nn.QuantizedLinearStack) is one such layer per part, their outputs
// concatenated.
struct Part {
  const Tensor* weight;
  int64_t quant;
  OptTensor bias;
  bool int8 = false;  // x rounded to int8 (a quantized layer's activations "int8")
};
using Projection = std::vector<Part>;

// A layer's weights in the order it runs them.
struct Layer {
  const Tensor* input_norm;
  Projection qkv, o;
  const Tensor* post_norm;
  Projection gate_up, down;
};

constexpr int64_t kMoreParts = 1 << 8;  // a quant's flag: the next weight is this stack's next part
constexpr int64_t kInt8 = 1 << 9;       // a quant's flag: the part's x is rounded to int8
constexpr int64_t kFlags = kMoreParts | kInt8;

// The layers of the lists (see csrc/ops.cpp), checked: per layer, weights (input norm, the qkv
// projection's parts, o, post-attention norm, gate_up's parts, down; contiguous CPU tensors of
// x's dtype, or uint8 blocks), a quant per weight and a bias per projection part; per layer 2
// eps and (where given, as caches) a k and a v cache; then the final norm's weight and eps.
std::vector<Layer> layers_of(const char* who, at::TensorList weights, at::IntArrayRef quants,
                             const c10::List<OptTensor>& biases, at::TensorList k_caches, at::TensorList v_caches,
                             at::ArrayRef<double> eps, bool caches, at::ScalarType dtype) {
  TORCH_CHECK(quants.size() == weights.size(), who, ": expected a quant per weight, got ", quants.size(), " for ",
              weights.size(), " weights");
  TORCH_CHECK(eps.size() % 2 == 1, who, ": expected 2 eps per layer and the final norm's, got ", eps.size());
  const int64_t L = static_cast<int64_t>(eps.size()) / 2;
  TORCH_CHECK(!caches || (static_cast<int64_t>(k_caches.size()) == L && static_cast<int64_t>(v_caches.size()) == L),
              who, ": expected a k and a v cache per layer (", L, "), got ", k_caches.size(), "/", v_caches.size());
  size_t w = 0, b = 0;
  auto next = [&](bool part) -> size_t {
    TORCH_CHECK(w < weights.size() && (!part || b < biases.size()), who, ": the lists end early: ", weights.size(),
                " weights and ", biases.size(), " biases for ", L, " layers");
    const int64_t quant = quants[w] & ~kFlags;
    const Tensor& t = weights[w];
    TORCH_CHECK(t.scalar_type() == (quant == 0 ? dtype : at::kByte) && (part || quants[w] == 0), who, ": weight ", w,
                " is ", t.scalar_type(), " with quant ", quants[w], " (a norm's weight and a dense projection's: x's ",
                dtype, " and quant 0; uint8 blocks: their format's id)");
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), who, ": weight ", w, " must be a contiguous CPU tensor");
    if (part && biases.get(b).has_value()) {
      const Tensor& bias = *biases.get(b);
      TORCH_CHECK(bias.scalar_type() == dtype && bias.device().is_cpu() && bias.is_contiguous(), who, ": bias ", b,
                  " must be a contiguous CPU tensor of x's dtype ", dtype, ", got ", bias.scalar_type());
    }
    return w++;
  };
  auto norm = [&]() { return &weights[next(false)]; };
  auto projection = [&](bool stack) {
    Projection p;
    bool more = true;
    while (more) {
      const size_t j = next(true);
      more = (quants[j] & kMoreParts) != 0;
      TORCH_CHECK(!more || stack, who, ": weight ", j,
                  " is marked as a part of a stack where a layer takes one weight");
      TORCH_CHECK(!(quants[j] & kInt8) || (quants[j] & ~kFlags) != 0, who, ": weight ", j,
                  " is marked for int8 activations but is not quantized blocks");
      p.push_back({&weights[j], quants[j] & ~kFlags, biases.get(b++), (quants[j] & kInt8) != 0});
    }
    return p;
  };
  std::vector<Layer> layers;
  for (int64_t i = 0; i < L; ++i) {
    Layer layer;
    layer.input_norm = norm();
    layer.qkv = projection(true);
    layer.o = projection(false);
    layer.post_norm = norm();
    layer.gate_up = projection(true);
    layer.down = projection(false);
    layers.push_back(std::move(layer));
  }
  norm();  // the final norm's weight: weights.back()
  TORCH_CHECK(w == weights.size() && b == biases.size(), who, ": expected ", w, " weights and ", b, " biases for ", L,
              " layers, got ", weights.size(), " and ", biases.size());
  return layers;
}

struct Step {
  const Kernels& ops;
  Products products;
  bool quantized_onednn = false;  // quantized layers past their kernel's rows: on oneDNN's matmul

  Tensor linear(const Tensor& x, const Part& part) const {
    const Tensor& weight = *part.weight;
    const OptTensor& bias = part.bias;
    if (part.quant != 0) {
      return ops.quantized_linear.redispatch(kCpu, x, weight, part.quant, bias, quantized_onednn, part.int8);
    }
    switch (products) {
      case Products::kernel:
        return ops.linear.redispatch(kCpu, x, weight, bias);
      case Products::onednn:
        return onednn_linear(x, weight, bias);
      case Products::widened: {
        const OptTensor wide_bias = bias.has_value() ? OptTensor(bias->to(at::kFloat)) : std::nullopt;
        return at::linear(x.to(at::kFloat), weight.to(at::kFloat), wide_bias).to(x.scalar_type());
      }
      case Products::torch:
        break;
    }
    return at::linear(x, weight, bias);
  }
  Tensor linear(const Tensor& x, const Projection& p) const {
    if (p.size() == 1) return linear(x, p[0]);
    std::vector<Tensor> outs;
    for (const Part& part : p) outs.push_back(linear(x, part));
    return at::cat(outs, -1);
  }
  // RMSNorm of x (+ residual): (y, the new residual stream)
  std::tuple<Tensor, Tensor> norm(const Tensor& x, const OptTensor& residual, const Tensor& weight, double eps) const {
    auto [y, residual_out, mean, rstd] = ops.norm.redispatch(kCpu, x, residual, weight, std::nullopt, eps, true, 0.0);
    return {y, residual.has_value() ? residual_out : x};
  }
  // The rest of layer i after its attention (rows, H D): o_proj, the post-attention norm, the
  // SwiGLU feed-forward on the stacked gate/up projection's strided halves, and the next norm
  // (next_norm: the next layer's input norm, or after the last layer the final one). Updates y
  // and the residual h.
  void finish_layer(const Tensor& attended, const Layer& layer, const Tensor& next_norm, at::ArrayRef<double> eps,
                    int64_t i, Tensor& y, Tensor& h) const {
    const Tensor a = linear(attended, layer.o);
    std::tie(y, h) = norm(a, h, *layer.post_norm, eps[2 * i + 1]);
    const std::vector<Tensor> gate_up = linear(y, layer.gate_up).chunk(2, -1);
    const Tensor s = ops.gated.redispatch(kCpu, gate_up[0], gate_up[1], "silu");
    std::tie(y, h) = norm(linear(s, layer.down), h, next_norm, eps[2 * i + 2]);
  }
};

Tensor llama_decode_layers_cpu(const Tensor& x, at::TensorList weights, at::IntArrayRef quants,
                               const c10::List<OptTensor>& biases,
                               at::TensorList k_caches, at::TensorList v_caches, const Tensor& cos, const Tensor& sin,
                               const Tensor& offsets, const Tensor& seqlens_before, const Tensor& seqlens_after,
                               at::ArrayRef<double> eps, int64_t batch, int64_t n_head, int64_t n_kv,
                               int64_t head_dim, double scale, int64_t window_left, bool linear_kernel) {
  const std::vector<Layer> layers =
      layers_of("fastarch::_llama_decode_layers", weights, quants, biases, k_caches, v_caches, eps, true,
                x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) % batch == 0, "fastarch::_llama_decode_layers: x must be (batch * n, hidden)");
  const int64_t n = x.size(0) / batch, H = n_head, Hkv = n_kv, D = head_dim, L = layers.size();
  const int64_t rows = x.size(0), hidden = x.size(1);
  const Step step{kernels(), linear_kernel ? Products::kernel : Products::torch};
  // The small ops' outputs, made once per step (step_ops.h): the norms' y and the residual
  // stream (two, taking turns: a norm reads one and writes the other), their statistics, the
  // rotated q and k, the gated activation (made at the first layer, once its width is known).
  const at::TensorOptions options = x.options(), stats = options.dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const Tensor y = at::empty({rows, hidden}, options), none = at::empty({0}, options);
  const Tensor streams[2] = {at::empty({rows, hidden}, options), at::empty({rows, hidden}, options)};
  const Tensor no_mean = at::empty({0}, stats), rstd = at::empty({rows}, stats);
  const Tensor q_out = at::empty({batch, H, n, D}, options), k_out = at::empty({batch, Hkv, n, D}, options);
  Tensor gated;
  auto norm = [&](const Tensor& in, const Tensor* residual, const Tensor& weight, double eps, const Tensor& sum) {
    norm_forward_into(in, residual ? std::optional<Tensor>(*residual) : std::nullopt, weight, std::nullopt, eps, true, y,
                      sum, no_mean, rstd);
  };
  norm(x, nullptr, L > 0 ? *layers[0].input_norm : weights.back(), eps[0], none);
  Tensor h = x;  // the residual stream
  for (int64_t i = 0; i < L; ++i) {
    // attention: (B n, (H + 2 Hkv) D) -> q (B, H, n, D), k, v (B, Hkv, n, D), views
    const Tensor heads = step.linear(y, layers[i].qkv).view({batch, n, H + 2 * Hkv, D}).transpose(1, 2);
    const std::vector<Tensor> qkv = heads.split_with_sizes({H, Hkv, Hkv}, 1);
    rotary_into(qkv[0], qkv[1], cos, sin, offsets, false, false, q_out, k_out, /*check_positions=*/i == 0);
    step.ops.append.redispatch(kCpu, k_caches[i], v_caches[i], k_out, qkv[2], seqlens_before);
    auto [out, lse] =
        step.ops.decode.redispatch(kCpu, q_out, k_caches[i], v_caches[i], seqlens_after, true, scale, window_left);
    // the rest of the layer (Step::finish_layer, with the outputs above)
    const Tensor a = step.linear(out.transpose(1, 2).reshape({batch * n, H * D}), layers[i].o);
    norm(a, &h, *layers[i].post_norm, eps[2 * i + 1], streams[0]);
    h = streams[0];
    const std::vector<Tensor> gate_up = step.linear(y, layers[i].gate_up).chunk(2, -1);
    if (!gated.defined()) gated = at::empty({rows, gate_up[0].size(1)}, options);
    gated_act_into(gate_up[0], gate_up[1], "silu", gated);
    const Tensor& next_norm = i + 1 < L ? *layers[i + 1].input_norm : weights.back();
    norm(step.linear(gated, layers[i].down), &h, next_norm, eps[2 * i + 2], streams[1]);
    h = streams[1];
  }
  return y;
}

// The prefill of packed prompts: x (total, hidden), the real tokens of every row, row b's at
// cu_seqlens[b] .. cu_seqlens[b + 1] (int32, on the CPU), at positions (total,) int64. seqlen:
// the prompts' padded length (the attention's bound on a row's length). With caches (empty;
// none: no cache), row b's keys and values go to its slots 0 .. len - 1 and its slots len ..
// seqlen - 1 are zeroed, as KVCache.write_packed leaves them.
Tensor llama_prefill_layers_cpu(const Tensor& x, at::TensorList weights, at::IntArrayRef quants,
                                const c10::List<OptTensor>& biases,
                                at::TensorList k_caches, at::TensorList v_caches, const Tensor& cos, const Tensor& sin,
                                const Tensor& positions, const Tensor& cu_seqlens, int64_t seqlen,
                                at::ArrayRef<double> eps, int64_t n_head, int64_t n_kv, int64_t head_dim,
                                double scale, int64_t window_left, int64_t products) {
  const char* who = "fastarch::_llama_prefill_layers";
  const bool cached = !k_caches.empty();
  const std::vector<Layer> layers =
      layers_of(who, weights, quants, biases, k_caches, v_caches, eps, cached, x.scalar_type());
  const int64_t L = layers.size();
  TORCH_CHECK(x.dim() == 2, who, ": x must be (total, hidden)");
  TORCH_CHECK(products >= 0 && products <= 7, who,
              ": products must be 0 (torch), 1 (kernel), 2 (onednn) or 3 (widened), + 4 for quantized layers on"
              " oneDNN, got ", products);
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 && cu_seqlens.is_cpu() &&
                  cu_seqlens.is_contiguous() && cu_seqlens.size(0) >= 1,
              who, ": cu_seqlens must be a contiguous int32 CPU tensor (rows + 1,)");
  const int64_t total = x.size(0), H = n_head, Hkv = n_kv, D = head_dim;
  const int64_t rows = cu_seqlens.size(0) - 1;
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const Step step{kernels(), static_cast<Products>(products & 3), (products & 4) != 0};
  auto [y, h] = step.norm(x, std::nullopt, L > 0 ? *layers[0].input_norm : weights.back(), eps[0]);
  for (int64_t i = 0; i < L; ++i) {
    // (total, (H + 2 Hkv) D) -> q (total, H, D), k, v (total, Hkv, D), views
    const std::vector<Tensor> qkv =
        step.linear(y, layers[i].qkv).view({total, H + 2 * Hkv, D}).split_with_sizes({H, Hkv, Hkv}, 1);
    auto [q, k] = step.ops.rotary.redispatch(kCpu, qkv[0], qkv[1], cos, sin, positions, false, false);
    if (cached) {
      for (int64_t b = 0; b < rows; ++b) {
        const int64_t len = cu[b + 1] - cu[b];
        for (const auto& [cache, src] : {std::pair{k_caches[i], k}, std::pair{v_caches[i], qkv[2]}}) {
          const Tensor row = cache.select(0, b);  // (Hkv, max_len, D)
          row.narrow(1, 0, len).copy_(src.narrow(0, cu[b], len).transpose(0, 1));
          row.narrow(1, len, seqlen - len).zero_();
        }
      }
    }
    // the packed layout as 4-D views (1, heads, total, D), as fastarch.ops.attention passes it
    auto as4d = [](const Tensor& t) { return t.permute({1, 0, 2}).unsqueeze(0); };
    auto [out, lse] = step.ops.attention.redispatch(kCpu, as4d(q), as4d(k), as4d(qkv[2].contiguous()), std::nullopt,
                                                    std::nullopt, cu_seqlens, cu_seqlens, seqlen, seqlen,
                                                    true, scale, window_left, -1, 0.0, 0);
    const Tensor& next_norm = i + 1 < L ? *layers[i + 1].input_norm : weights.back();
    step.finish_layer(out[0].permute({1, 0, 2}).reshape({total, H * D}), layers[i], next_norm, eps, i, y, h);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastarch, CPU, m) {
  m.impl("_llama_decode_layers", &llama_decode_layers_cpu);
  m.impl("_llama_prefill_layers", &llama_prefill_layers_cpu);
}

}  // namespace fastarch::cpu
