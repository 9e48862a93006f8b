// CPU implementation of the activation kernel ops (fastarch::_bias_gelu_fwd / _bias_gelu_bwd,
// _gated_act_fwd / _gated_act_bwd, which serve swiglu and geglu):
// checks, allocation, threading over rows (at::parallel_for: torch's OpenMP pool and its thread
// count), and the choice between the AVX-512 and portable row kernels.
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>
#include <tuple>

#include "activations/activation_glue.h"
#include "activation_rows.h"
#include "cpu/dtype_of.h"
#include "cpu/isa.h"
#include "cpu/portable.h"
#include "cpu/models/step_ops.h"

namespace fastarch::cpu::act {
namespace {

using at::Tensor;

constexpr const char* kWho = "fastarch cpu activation";

// Rows per task: enough work per task (~16K elements) that threading overhead stays small.
int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// Rows per partial sum of the bias gradient (see backward()).
constexpr int64_t kDbiasRows = 64;

// Large outputs are written with streaming stores (stream_output, cpu/isa.h).
bool can_stream(const Tensor& out) {
  const int64_t chunk_bytes = 16 * out.element_size();
  return stream_output(out.nbytes()) && out.size(1) % 16 == 0 &&
      (out.size(0) <= 1 || out.stride(0) % 16 == 0) && reinterpret_cast<uintptr_t>(out.data_ptr()) % chunk_bytes == 0;
}

// rows[0] += rows[1] + ... + rows[n - 1], as a pairwise tree over the (n, cols) rows.
template <typename Acc>
void add_rows_pairwise(Acc* rows, int64_t n, int64_t cols) {
  for (int64_t stride = 1; stride < n; stride *= 2) {
    for (int64_t r = 0; r + stride < n; r += 2 * stride) {
      Acc* into = rows + r * cols;
      const Acc* from = rows + (r + stride) * cols;
      for (int64_t c = 0; c < cols; ++c) into[c] += from[c];
    }
  }
}

// The AVX-512 kernels take the bias in fp32, converted once per call.
struct Avx512Inputs {
  Tensor bias;  // fp32, or undefined
  bool stream = false;
  Avx512RowArgs args() const {
    return {bias.defined() ? bias.data_ptr<float>() : nullptr, stream, isa_bf16()};
  }
};

Avx512Inputs avx512_inputs(Dtype d, const std::optional<Tensor>& bias, bool stream) {
  Avx512Inputs in;
  if (!use_avx512(d)) return in;
  if (bias) in.bias = bias->to(at::kFloat).contiguous();
  in.stream = stream;
  return in;
}

void forward_rows(Dtype d, const ActivationForwardParams& p, int64_t begin, int64_t end, const Avx512Inputs& in) {
  with_dtype(d, [&]<Dtype D>() {
#ifdef FASTARCH_WITH_AVX512  // (active_isa() is never avx512 in a build without those kernels)
    if constexpr (D != Dtype::f64) {
      if (isa_avx512()) return activation_forward_rows_avx512<D>(p, begin, end, in.args());
    }
#else
    (void)in;
#endif
    with_portable_build([&]<Isa I>() { activation_forward_rows_generic<I, D>(p, begin, end); });
  });
}

void backward_rows(
    Dtype d, const ActivationBackwardParams& p, int64_t begin, int64_t end, void* dbias_acc, const Avx512Inputs& in) {
  with_dtype(d, [&]<Dtype D>() {
#ifdef FASTARCH_WITH_AVX512
    if constexpr (D != Dtype::f64) {
      if (isa_avx512()) {
        return activation_backward_rows_avx512<D>(p, begin, end, static_cast<float*>(dbias_acc), in.args());
      }
    }
#else
    (void)in;
#endif
    with_portable_build([&]<Isa I>() { activation_backward_rows_generic<I, D>(p, begin, end, dbias_acc); });
  });
}

void forward_into(Activation act, const Tensor& a, const Tensor* b, const std::optional<Tensor>& bias, const Tensor& y) {
  const Dtype d = dtype_of(a, kWho, b ? "gate" : "x");
  const ActivationForwardParams p = activation_glue::forward_params(act, a, b, bias, y);
  const Avx512Inputs in = avx512_inputs(d, bias, can_stream(y));
  at::parallel_for(0, p.rows, grain_rows(p.cols), [&](int64_t begin, int64_t end) { forward_rows(d, p, begin, end, in); });
}

Tensor forward(Activation act, const Tensor& a, const Tensor* b, const std::optional<Tensor>& bias) {
  Tensor y = at::empty({a.size(0), a.size(1)}, a.options());
  forward_into(act, a, b, bias, y);
  return y;
}

// Into da (and db for the gated activations), (rows, cols) with contiguous columns; returns
// dbias (the column sums of da in the accumulation dtype, rounded once) when need_dbias, else
// an empty tensor.
Tensor backward_into(
    Activation act, const Tensor& dy, const Tensor& a, const Tensor* b, const std::optional<Tensor>& bias,
    bool need_dbias, const Tensor& da, const Tensor& db) {
  const Dtype d = dtype_of(a, kWho, b ? "gate" : "x");
  const int64_t rows = a.size(0), cols = a.size(1);
  const ActivationBackwardParams p =
      activation_glue::backward_params(act, dy, a, b, bias, da, b ? &db : nullptr);
  const Avx512Inputs in = avx512_inputs(d, bias, can_stream(da) && (!b || can_stream(db)));
  if (!need_dbias) {
    at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
      backward_rows(d, p, begin, end, nullptr, in);
    });
    return at::empty({0}, a.options());
  }
  // Chunks of kDbiasRows rows, each summed into its own (cols,) row of partial sums (zeroed by
  // its task, inside the one parallel region: on a busy machine every extra region waits for
  // its slowest thread), then added pairwise in a fixed order: the bias gradient's rounding
  // error grows with kDbiasRows + log2(chunks), and its bits do not depend on the thread count.
  const int64_t chunks = std::max<int64_t>(1, (rows + kDbiasRows - 1) / kDbiasRows);
  Tensor partial = at::empty({chunks, cols}, a.options().dtype(acc_dtype(d)));
  char* base = static_cast<char*>(partial.data_ptr());
  const int64_t row_bytes = cols * partial.element_size();
  at::parallel_for(0, chunks, std::max<int64_t>(1, grain_rows(cols) / kDbiasRows), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      std::memset(base + c * row_bytes, 0, row_bytes);
      backward_rows(d, p, c * kDbiasRows, std::min(rows, (c + 1) * kDbiasRows), base + c * row_bytes, in);
    }
  });
  if (d == Dtype::f64) {
    add_rows_pairwise(partial.data_ptr<double>(), chunks, cols);
  } else {
    add_rows_pairwise(partial.data_ptr<float>(), chunks, cols);
  }
  // copy=true: dbias must not share storage with the scratch buffer
  return partial[0].to(a.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
}

std::tuple<Tensor, Tensor, Tensor> backward(
    Activation act, const Tensor& dy, const Tensor& a, const Tensor* b, const std::optional<Tensor>& bias,
    bool need_dbias) {
  Tensor da = at::empty({a.size(0), a.size(1)}, a.options());
  Tensor db = b ? at::empty({a.size(0), a.size(1)}, a.options()) : Tensor();
  Tensor dbias = backward_into(act, dy, a, b, bias, need_dbias, da, db);
  return {da, db, dbias};
}

Tensor bias_gelu_fwd_cpu(const Tensor& x, const std::optional<Tensor>& bias, bool tanh) {
  TORCH_CHECK(x.device().is_cpu(), kWho, ": x must be on the CPU, got ", x.device());
  activation_glue::check_matrix(kWho, x, "x");
  activation_glue::check_bias(kWho, bias, x);
  return forward(tanh ? Activation::gelu_tanh : Activation::gelu_erf, x, nullptr, bias);
}

std::tuple<Tensor, Tensor> bias_gelu_bwd_cpu(
    const Tensor& dy, const Tensor& x, const std::optional<Tensor>& bias, bool tanh, bool need_dbias) {
  TORCH_CHECK(x.device().is_cpu(), kWho, " backward: x must be on the CPU, got ", x.device());
  activation_glue::check_matrix(kWho, x, "x");
  activation_glue::check_like(kWho, dy, "dy", x, "x");
  activation_glue::check_bias(kWho, bias, x);
  TORCH_CHECK(!need_dbias || bias, kWho, " backward: need_dbias without a bias");
  auto [dx, unused, dbias] = backward(tanh ? Activation::gelu_tanh : Activation::gelu_erf, dy, x, nullptr, bias, need_dbias);
  return {dx, dbias};
}

// act: "silu" (swiglu), "gelu" or "gelu_tanh" (geglu); see activation_glue::gated_activation.
Tensor gated_act_fwd_cpu(const Tensor& gate, const Tensor& up, c10::string_view act) {
  TORCH_CHECK(gate.device().is_cpu(), kWho, ": gate must be on the CPU, got ", gate.device());
  const Activation f = activation_glue::gated_activation(kWho, std::string_view(act.data(), act.size()));
  activation_glue::check_matrix(kWho, gate, "gate");
  activation_glue::check_like(kWho, up, "up", gate, "gate");
  return forward(f, gate, &up, std::nullopt);
}

std::tuple<Tensor, Tensor> gated_act_bwd_cpu(const Tensor& dy, const Tensor& gate, const Tensor& up, c10::string_view act) {
  TORCH_CHECK(gate.device().is_cpu(), kWho, " backward: gate must be on the CPU, got ", gate.device());
  const Activation f = activation_glue::gated_activation(kWho, std::string_view(act.data(), act.size()));
  activation_glue::check_matrix(kWho, gate, "gate");
  activation_glue::check_like(kWho, up, "up", gate, "gate");
  activation_glue::check_like(kWho, dy, "dy", gate, "gate");
  auto [dgate, dup, unused] = backward(f, dy, gate, &up, std::nullopt, false);
  return {dgate, dup};
}

// The gradient of the packed projection [up | gate] in one (rows, 2 cols) tensor, each half
// written in place: no concatenation of dup and dgate afterwards.
Tensor gated_act_bwd_packed_cpu(const Tensor& dy, const Tensor& proj, c10::string_view act) {
  TORCH_CHECK(proj.device().is_cpu(), kWho, " backward: proj must be on the CPU, got ", proj.device());
  const Activation f = activation_glue::gated_activation(kWho, std::string_view(act.data(), act.size()));
  const auto [up, gate] = activation_glue::packed_halves(kWho, proj);
  activation_glue::check_like(kWho, dy, "dy", gate, "a half of proj");
  Tensor dproj = at::empty({proj.size(0), proj.size(1)}, proj.options());
  const auto [dup, dgate] = activation_glue::packed_halves(kWho, dproj);
  backward_into(f, dy, gate, &up, std::nullopt, false, dgate, dup);
  return dproj;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastarch, CPU, m) {
  m.impl("_bias_gelu_fwd", &bias_gelu_fwd_cpu);
  m.impl("_bias_gelu_bwd", &bias_gelu_bwd_cpu);
  m.impl("_gated_act_fwd", &gated_act_fwd_cpu);
  m.impl("_gated_act_bwd", &gated_act_bwd_cpu);
  m.impl("_gated_act_bwd_packed", &gated_act_bwd_packed_cpu);
}

}  // namespace fastarch::cpu::act

namespace fastarch::cpu {

void gated_act_into(const at::Tensor& gate, const at::Tensor& up, std::string_view act, const at::Tensor& y) {
  act::forward_into(activation_glue::gated_activation(act::kWho, act), gate, &up, std::nullopt, y);
}

}  // namespace fastarch::cpu
