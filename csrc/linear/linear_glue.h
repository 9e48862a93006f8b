// What the CPU and CUDA implementations of fastarch::_linear share: the checks of their
// arguments beyond the device type and dtype, which each backend checks itself.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fastarch::linear_glue {

using at::Tensor;

// Whether weight (out_features, in_features) is the transpose of a contiguous (in_features,
// out_features) matrix: transformers' Conv1D keeps its weight so (GPT-2), and the CPU kernel
// streams it as it is.
inline bool k_major(const Tensor& weight) {
  return weight.dim() == 2 && weight.size(0) > 1 && weight.size(1) > 1 && weight.stride(0) == 1 &&
         weight.stride(1) == weight.size(0);
}

// k_major_ok: the backend takes a K-major weight (k_major) besides a contiguous one.
inline void check(const char* who, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                  bool k_major_ok = false) {
  TORCH_CHECK(x.dim() == 2, who, ": x must be 2-D (rows, in_features), got ", x.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, who, ": x must have a contiguous last dim");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), who, ": weight must be (out_features, ", x.size(1),
              "), got ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous() || (k_major_ok && k_major(weight)), who, ": weight must be contiguous",
              k_major_ok ? " or the transpose of a contiguous (in_features, out_features) matrix" : "");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(), who,
              ": weight must have x's dtype ", x.scalar_type(), " and device ", x.device());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_contiguous(), who,
                ": bias must be a contiguous (", weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(), who,
                ": bias must have x's dtype ", x.scalar_type(), " and device ", x.device());
  }
}

}  // namespace fastarch::linear_glue
