// The small ops of a decode step, into outputs the caller allocated once: what the CPU
// implementations of fastarch::_norm_fwd, _rotary and _gated_act_fwd run after their argument
// checks and allocation (each op calls its function here, so the two give the same bits).
// llama_layers_cpu.cpp's decode loop calls them with buffers made once per step: one row of a
// small model is ~1 us of work per op, against ~4-6 us for the op's checks, allocations and
// dispatch when a layer's weights have just pushed them out of the caches (SmolLM2-135M: ~1 ms
// of a ~6 ms step on a 2-core AMD EPYC Zen 4, 30 layers).
//
// The arguments are not checked: the caller passes what the op would have accepted, with
// outputs of the op's shapes, dtype and layout (contiguous).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

namespace fastarch::cpu {

// fastarch::_norm_fwd: y (rows, cols), residual_out (x + residual, or unused), mean (LayerNorm
// only) and rstd (rows, fp32).
void norm_forward_into(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                       const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                       bool rms, const at::Tensor& y, const at::Tensor& residual_out, const at::Tensor& mean,
                       const at::Tensor& rstd, double weight_offset = 0.0);

// fastarch::_rotary into q_out and k_out (contiguous, q's and k's shapes). check_positions:
// whether to read positions and check them against the table (the op always does; the decode
// loop once per step, as every layer has the same positions).
void rotary_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                 const std::optional<at::Tensor>& positions, bool interleaved, bool inverse, const at::Tensor& q_out,
                 const at::Tensor& k_out, bool check_positions);

// fastarch::_gated_act_fwd into y (gate's shape, contiguous).
void gated_act_into(const at::Tensor& gate, const at::Tensor& up, std::string_view act, const at::Tensor& y);

}  // namespace fastarch::cpu
