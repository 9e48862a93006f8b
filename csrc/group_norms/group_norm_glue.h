// What the CPU and CUDA implementations of fastarch::_group_norm_fwd / _group_norm_bwd share:
// the checks of their arguments (beyond the device type and x's dtype, which each backend
// checks itself) and the filling of the kernels' parameter structs. `who` names the op and the
// backend in every message: "fastarch::_group_norm_fwd (cpu)".
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <tuple>

#include "group_norm_params.h"

namespace fastarch::group_norm_glue {

using at::Tensor;

inline const void* data_or_null(const std::optional<Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// x: 3-D contiguous, (N, C, S) or (N, S, C).
inline int64_t channels_of(const Tensor& x, bool channels_last) { return x.size(channels_last ? 2 : 1); }
inline int64_t spatial_of(const Tensor& x, bool channels_last) { return x.size(channels_last ? 1 : 2); }

inline void check_x(const char* who, const Tensor& x, const char* name, int64_t num_groups, bool channels_last) {
  TORCH_CHECK(x.dim() == 3, who, ": ", name, " must be 3-D ", channels_last ? "(N, S, C)" : "(N, C, S)",
              ", got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), who, ": ", name, " must be contiguous, got strides ", x.strides());
  const int64_t c = channels_of(x, channels_last), s = spatial_of(x, channels_last);
  TORCH_CHECK(num_groups >= 1, who, ": num_groups must be at least 1, got ", num_groups);
  TORCH_CHECK(c >= 1 && c % num_groups == 0, who, ": the channel count C = ", c,
              " must be a positive multiple of num_groups = ", num_groups);
  TORCH_CHECK(s >= 1, who, ": ", name, " must have at least one spatial position (S >= 1), got shape ", x.sizes());
}

inline void check_like(const char* who, const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), who, ": ", name, " must be on x's device ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), who, ": ", name, " must have x's dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
}

// weight, bias: (C,) contiguous.
inline void check_channel_vector(const char* who, const std::optional<Tensor>& t, const char* name, const Tensor& x,
                                 int64_t c) {
  if (!t) return;
  check_like(who, *t, name, x);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == c && t->is_contiguous(), who, ": ", name,
              " must be a contiguous vector of shape (C,) = (", c, "), got shape ", t->sizes(), " and strides ",
              t->strides());
}

// scale, shift: (N, C) contiguous.
inline void check_sample_matrix(const char* who, const std::optional<Tensor>& t, const char* name, const Tensor& x,
                                int64_t n, int64_t c) {
  if (!t) return;
  check_like(who, *t, name, x);
  TORCH_CHECK(t->dim() == 2 && t->size(0) == n && t->size(1) == c, who, ": ", name, " must have shape (N, C) = (",
              n, ", ", c, "), got ", t->sizes());
  TORCH_CHECK(t->is_contiguous(), who, ": ", name, " must be contiguous, got strides ", t->strides());
}

inline void check_parameters(
    const char* who, const Tensor& x, bool channels_last, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& scale, const std::optional<Tensor>& shift) {
  const int64_t n = x.size(0), c = channels_of(x, channels_last);
  check_channel_vector(who, weight, "weight", x, c);
  check_channel_vector(who, bias, "bias", x, c);
  check_sample_matrix(who, scale, "scale", x, n, c);
  check_sample_matrix(who, shift, "shift", x, n, c);
}

inline void check_forward(
    const char* who, const Tensor& x, int64_t num_groups, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& scale, const std::optional<Tensor>& shift,
    double eps, bool channels_last) {
  check_x(who, x, "x", num_groups, channels_last);
  check_parameters(who, x, channels_last, weight, bias, scale, shift);
  TORCH_CHECK(eps >= 0, who, ": eps must be >= 0, got ", eps);
}

// stats: the dtype of mean and rstd (fp32; fp64 for fp64 x).
inline void check_backward(
    const char* who, const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& rstd, int64_t num_groups,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, const std::optional<Tensor>& scale,
    const std::optional<Tensor>& shift, bool channels_last, at::ScalarType stats) {
  check_x(who, x, "x", num_groups, channels_last);
  check_like(who, dy, "dy", x);
  TORCH_CHECK(dy.sizes() == x.sizes(), who, ": dy must have x's shape ", x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(dy.is_contiguous(), who, ": dy must be contiguous, got strides ", dy.strides());
  check_parameters(who, x, channels_last, weight, bias, scale, shift);
  const int64_t n = x.size(0);
  for (const Tensor* t : {&mean, &rstd}) {
    const char* name = t == &mean ? "mean" : "rstd";
    TORCH_CHECK(t->device() == x.device(), who, ": ", name, " must be on x's device ", x.device(), ", got ",
                t->device());
    TORCH_CHECK(t->scalar_type() == stats && t->dim() == 2 && t->size(0) == n && t->size(1) == num_groups &&
                    t->is_contiguous(),
                who, ": ", name, " must be a contiguous ", stats, " tensor of shape (N, num_groups) = (", n, ", ",
                num_groups, "), got ", t->scalar_type(), " of shape ", t->sizes());
  }
}

// The outputs are allocated by the caller; pass undefined tensors for gradients not wanted.
inline GroupNormForwardParams forward_params(
    const Tensor& x, int64_t num_groups, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& scale, const std::optional<Tensor>& shift, double eps, bool silu,
    bool channels_last, const Tensor& y, const Tensor& mean, const Tensor& rstd) {
  GroupNormForwardParams p{};
  p.x = x.data_ptr();
  p.weight = data_or_null(weight);
  p.bias = data_or_null(bias);
  p.scale = data_or_null(scale);
  p.shift = data_or_null(shift);
  p.y = y.data_ptr();
  p.mean = mean.data_ptr();
  p.rstd = rstd.data_ptr();
  p.batch = x.size(0);
  p.channels = channels_of(x, channels_last);
  p.spatial = spatial_of(x, channels_last);
  p.groups = num_groups;
  p.eps = eps;
  p.silu = silu;
  p.channels_last = channels_last;
  return p;
}

// The gradients of the weights, allocated (uninitialized) or empty (numel 0) by the schema's rule:
// dweight iff need_dweight and weight given, dbias iff need_dweight and bias given, dscale iff
// need_dscale and scale given, dshift iff need_dscale and shift given; all in x's dtype.
inline std::tuple<Tensor, Tensor, Tensor, Tensor> weight_gradients(
    const Tensor& x, bool channels_last, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& scale, const std::optional<Tensor>& shift, bool need_dweight, bool need_dscale) {
  const int64_t n = x.size(0), c = channels_of(x, channels_last);
  const auto make = [&](bool wanted, std::initializer_list<int64_t> shape) {
    return wanted ? at::empty(shape, x.options()) : at::empty({0}, x.options());
  };
  return {make(need_dweight && weight.has_value(), {c}), make(need_dweight && bias.has_value(), {c}),
          make(need_dscale && scale.has_value(), {n, c}), make(need_dscale && shift.has_value(), {n, c})};
}

// An empty gradient is a null pointer: not wanted, or dscale/dshift of N == 0 samples (nothing to
// write). dweight/dbias of N == 0 samples are zeros, which the kernels write.
inline void* data_if_defined(const Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr() : nullptr; }

inline GroupNormBackwardParams backward_params(
    const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& rstd, int64_t num_groups,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, const std::optional<Tensor>& scale,
    const std::optional<Tensor>& shift, bool silu, bool channels_last, const Tensor& dx, const Tensor& dweight,
    const Tensor& dbias, const Tensor& dscale, const Tensor& dshift) {
  GroupNormBackwardParams p{};
  p.dy = dy.data_ptr();
  p.x = x.data_ptr();
  p.mean = mean.data_ptr();
  p.rstd = rstd.data_ptr();
  p.weight = data_or_null(weight);
  p.bias = data_or_null(bias);
  p.scale = data_or_null(scale);
  p.shift = data_or_null(shift);
  p.dx = dx.data_ptr();
  p.dweight = data_if_defined(dweight);
  p.dbias = data_if_defined(dbias);
  p.dscale = data_if_defined(dscale);
  p.dshift = data_if_defined(dshift);
  p.batch = x.size(0);
  p.channels = channels_of(x, channels_last);
  p.spatial = spatial_of(x, channels_last);
  p.groups = num_groups;
  p.silu = silu;
  p.channels_last = channels_last;
  return p;
}

}  // namespace fastarch::group_norm_glue
