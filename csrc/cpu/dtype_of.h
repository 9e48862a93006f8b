// A tensor's element type as the CPU row kernels' Dtype (cpu/dtype.h), for the *_cpu.cpp glue.
#pragma once
#include <ATen/core/Tensor.h>

#include "cpu/dtype.h"

namespace fastarch::cpu {

// x's Dtype; any other element type is an error naming the op (who) and the argument (name).
inline Dtype dtype_of(const at::Tensor& x, const char* who, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return Dtype::f32;
    case at::kDouble:
      return Dtype::f64;
    case at::kHalf:
      return Dtype::f16;
    case at::kBFloat16:
      return Dtype::bf16;
    default:
      TORCH_CHECK(false, who, ": ", name, " must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  }
}

// The kernels' accumulation and statistics type: fp64 for fp64 inputs, fp32 for the rest.
inline at::ScalarType acc_dtype(Dtype d) { return d == Dtype::f64 ? at::kDouble : at::kFloat; }

}  // namespace fastarch::cpu
