// x's dtype as the CUDA linear kernels' LinearDtype (linear_cuda.cpp, qlinear/qlinear_cuda.cpp),
// or an error naming the op (who) and what was expected.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "linear_launch.h"

namespace fastarch::cuda {

inline LinearDtype linear_dtype_of(const at::Tensor& x, const char* who) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return LinearDtype::f32;
    case at::kHalf:
      return LinearDtype::f16;
    case at::kBFloat16:
      return LinearDtype::bf16;
    default:
      TORCH_CHECK(false, who, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
}

}  // namespace fastarch::cuda
