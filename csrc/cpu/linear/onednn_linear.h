// oneDNN's matmul as fastarch.ops.linear's cpu backend calls it past its kernel's fp32 rows:
// torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], ""), on the weight as it is
// (no packed copy). For the C++ callers: the one-call LLaMA loops and the quantized linear's
// dequantized GEMM. Looked up on first use (a torch built without oneDNN has no such op, and
// the Python side never asks for it there).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <optional>
#include <string>

namespace fastarch::cpu {

inline at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, weight, bias, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                          std::string("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

}  // namespace fastarch::cpu
