// What the CPU and CUDA implementations of the activation kernel ops share: the checks of their
// arguments (beyond the device type and dtypes, which each backend checks itself) and the
// filling of the kernels' parameter structs.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>
#include <utility>

#include "activation_params.h"

namespace fastarch::activation_glue {

using at::Tensor;

inline void check_matrix(const char* who, const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, who, ": ", name, " must be 2-D (rows, cols), got shape ", t.sizes());
  TORCH_CHECK(t.size(1) >= 1, who, ": ", name, " must have at least one column");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, who, ": ", name, " must have contiguous rows");
}

// Rows like a's: same device, shape and dtype, contiguous columns.
inline void check_like(const char* who, const Tensor& t, const char* name, const Tensor& a, const char* a_name) {
  TORCH_CHECK(t.device() == a.device(), who, ": ", name, " must be on ", a_name, "'s device ", a.device(), ", got ",
              t.device());
  TORCH_CHECK(t.sizes() == a.sizes(), who, ": ", name, " must have ", a_name, "'s shape ", a.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == a.scalar_type(), who, ": ", name, " must have dtype ", a.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, who, ": ", name, " must have contiguous rows");
}

inline void check_bias(const char* who, const std::optional<Tensor>& bias, const Tensor& x) {
  if (!bias) return;
  TORCH_CHECK(bias->device() == x.device(), who, ": bias must be on x's device ", x.device(), ", got ",
              bias->device());
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(1) && bias->is_contiguous(), who,
              ": bias must be a contiguous vector of size ", x.size(1), ", got shape ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == x.scalar_type(), who, ": bias must have dtype ", x.scalar_type(), ", got ",
              bias->scalar_type());
}

// The gated kernel ops' act argument: "silu" (swiglu), "gelu" (erf form), "gelu_tanh" (geglu).
inline Activation gated_activation(const char* who, std::string_view act) {
  if (act == "silu") return Activation::silu;
  if (act == "gelu") return Activation::gelu_erf;
  if (act == "gelu_tanh") return Activation::gelu_tanh;
  TORCH_CHECK(false, who, ": act must be 'silu', 'gelu' or 'gelu_tanh', got '", act, "'");
}

// The packed gated op's projection (rows, 2 cols) = [up | gate] (diffusers' GEGLU order): its
// halves as (up, gate) views, rows strided by 2 cols.
inline std::pair<Tensor, Tensor> packed_halves(const char* who, const Tensor& proj) {
  check_matrix(who, proj, "proj");
  TORCH_CHECK(proj.size(1) % 2 == 0, who, ": proj must have an even number of columns (up, then gate), got ",
              proj.size(1));
  const int64_t n = proj.size(1) / 2;
  return {proj.narrow(1, 0, n), proj.narrow(1, n, n)};
}

inline const void* data_or_null(const std::optional<Tensor>& t) { return t ? t->data_ptr() : nullptr; }

inline ActivationForwardParams forward_params(
    Activation act, const Tensor& a, const Tensor* b, const std::optional<Tensor>& bias, const Tensor& y) {
  ActivationForwardParams p{};
  p.a = a.data_ptr();
  p.a_row_stride = a.stride(0);
  p.b = b ? b->data_ptr() : nullptr;
  p.b_row_stride = b ? b->stride(0) : 0;
  p.bias = data_or_null(bias);
  p.y = y.data_ptr();
  p.rows = a.size(0);
  p.cols = a.size(1);
  p.act = act;
  return p;
}

inline ActivationBackwardParams backward_params(
    Activation act, const Tensor& dy, const Tensor& a, const Tensor* b, const std::optional<Tensor>& bias,
    const Tensor& da, const Tensor* db) {
  ActivationBackwardParams p{};
  p.dy = dy.data_ptr();
  p.dy_row_stride = dy.stride(0);
  p.a = a.data_ptr();
  p.a_row_stride = a.stride(0);
  p.b = b ? b->data_ptr() : nullptr;
  p.b_row_stride = b ? b->stride(0) : 0;
  p.bias = data_or_null(bias);
  p.da = da.data_ptr();
  p.da_row_stride = da.stride(0);
  p.db = db ? db->data_ptr() : nullptr;
  p.db_row_stride = db ? db->stride(0) : 0;
  p.rows = a.size(0);
  p.cols = a.size(1);
  p.act = act;
  return p;
}

}  // namespace fastarch::activation_glue
