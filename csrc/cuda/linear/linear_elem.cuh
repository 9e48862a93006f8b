// The linear kernels' dtypes on the device (linear_kernels.cu, qlinear/qlinear_kernels.cu): the
// element type of each LinearDtype and its exact widening to fp32 / rounding back (to nearest).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "linear_launch.h"

namespace fastarch::cuda {

template <LinearDtype D>
struct Elem;
template <>
struct Elem<LinearDtype::f32> {
  using type = float;
  static __device__ float widen(float v) { return v; }
  static __device__ float narrow(float v) { return v; }
};
template <>
struct Elem<LinearDtype::f16> {
  using type = __half;
  static __device__ float widen(__half v) { return __half2float(v); }
  static __device__ __half narrow(float v) { return __float2half_rn(v); }
};
template <>
struct Elem<LinearDtype::bf16> {
  using type = __nv_bfloat16;
  static __device__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __nv_bfloat16 narrow(float v) { return __float2bfloat16_rn(v); }
};

}  // namespace fastarch::cuda
