// What the CPU and CUDA implementations of fastarch::_norm_fwd / _norm_bwd share: the checks of
// their arguments (beyond the device type and dtypes, which each backend checks itself) and
// the filling of the kernels' parameter structs.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "norm_params.h"

namespace fastarch::norm_glue {

using at::Tensor;

inline const void* data_or_null(const std::optional<Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

inline void check_same_device(const char* who, const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), who, ": ", name, " must be on x's device ", x.device(), ", got ", t.device());
}

// Rows like x's: same shape and dtype, contiguous columns.
inline void check_rows(const char* who, const Tensor& t, const char* name, const Tensor& x) {
  check_same_device(who, t, name, x);
  TORCH_CHECK(t.sizes() == x.sizes(), who, ": ", name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), who, ": ", name, " must have dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, who, ": ", name, " must have contiguous rows");
}

// A (cols,) vector in x's dtype.
inline void check_vector(const char* who, const Tensor& t, const char* name, const Tensor& x) {
  check_same_device(who, t, name, x);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1) && t.is_contiguous(), who, ": ", name,
              " must be a contiguous vector of size ", x.size(1), ", got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), who, ": ", name, " must have dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
}

inline void check_matrix(const char* who, const Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, who, ": ", name, " must be 2-D (rows, cols), got shape ", x.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, who, ": ", name, " must have contiguous rows");
}

inline void check_forward(
    const char* who, const Tensor& x, const std::optional<Tensor>& residual, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias) {
  check_matrix(who, x, "x");
  TORCH_CHECK(x.size(1) >= 1, who, ": x must have at least one column");
  if (residual) check_rows(who, *residual, "residual", x);
  if (weight) check_vector(who, *weight, "weight", x);
  if (bias) check_vector(who, *bias, "bias", x);
}

// stats: the dtype of mean and rstd (fp32; fp64 for fp64 inputs on the CPU).
inline void check_backward(
    const char* who, const Tensor& dy, const std::optional<Tensor>& dresidual_out, const Tensor& xin,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& mean, const Tensor& rstd, bool need_dweight,
    at::ScalarType stats) {
  check_matrix(who, xin, "xin");
  check_rows(who, dy, "dy", xin);
  if (dresidual_out) check_rows(who, *dresidual_out, "dresidual_out", xin);
  if (weight) check_vector(who, *weight, "weight", xin);
  const int64_t rows = xin.size(0);
  for (const Tensor* t : {&rstd, mean ? &*mean : nullptr}) {
    if (!t) continue;
    const char* name = t == &rstd ? "rstd" : "mean";
    check_same_device(who, *t, name, xin);
    TORCH_CHECK(t->scalar_type() == stats && t->is_contiguous() && t->numel() == rows, who, ": ", name,
                " must be a contiguous ", stats, " vector of size ", rows, ", got ", t->scalar_type(), " of shape ",
                t->sizes());
  }
  TORCH_CHECK(!need_dweight || weight, who, ": need_dweight without a weight");
}

// A weight offset needs a weight (the public ops say so first).
inline void check_weight_offset(const char* who, const std::optional<Tensor>& weight, double weight_offset) {
  TORCH_CHECK(weight_offset == 0.0 || weight, who, ": weight_offset=", weight_offset, " needs a weight");
}

inline NormForwardParams forward_params(
    const Tensor& x, const std::optional<Tensor>& residual, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& y, const Tensor& residual_out, const Tensor& mean,
    const Tensor& rstd, double eps, bool rms, double weight_offset = 0.0) {
  NormForwardParams p{};
  p.x = x.data_ptr();
  p.x_row_stride = x.stride(0);
  p.residual = data_or_null(residual);
  p.residual_row_stride = residual ? residual->stride(0) : 0;
  p.weight = data_or_null(weight);
  p.bias = data_or_null(bias);
  p.y = y.data_ptr();
  p.residual_out = residual ? residual_out.data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.data_ptr();
  p.rstd = rstd.data_ptr();
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.eps = eps;
  p.rms = rms;
  p.weight_offset = weight_offset;
  return p;
}

inline NormBackwardParams backward_params(
    const Tensor& dy, const std::optional<Tensor>& dresidual_out, const Tensor& xin,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& mean, const Tensor& rstd, const Tensor& dx,
    double weight_offset = 0.0) {
  NormBackwardParams p{};
  p.dy = dy.data_ptr();
  p.dy_row_stride = dy.stride(0);
  p.dresidual_out = data_or_null(dresidual_out);
  p.dresidual_out_row_stride = dresidual_out ? dresidual_out->stride(0) : 0;
  p.xin = xin.data_ptr();
  p.xin_row_stride = xin.stride(0);
  p.weight = data_or_null(weight);
  p.mean = data_or_null(mean);
  p.rstd = rstd.data_ptr();
  p.dx = dx.data_ptr();
  p.rows = xin.size(0);
  p.cols = xin.size(1);
  p.rms = !mean.has_value();
  p.weight_offset = weight_offset;
  return p;
}

}  // namespace fastarch::norm_glue
