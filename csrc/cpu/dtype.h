// The element types of the CPU row kernels (norms, activations, group_norm, linear, rotary):
// one enum for all of them, with no torch headers so that the AVX-512 and portable builds
// can take it as a template argument. dtype_of.h maps a tensor to it.
#pragma once

namespace fastarch::cpu {

enum class Dtype { f32, f64, f16, bf16 };

// Calls fn.template operator()<D>() with D = d: the glue's one switch from a tensor's dtype
// to the kernels' template argument.
template <typename Fn>
void with_dtype(Dtype d, Fn&& fn) {
  switch (d) {
    case Dtype::f32:
      return fn.template operator()<Dtype::f32>();
    case Dtype::f64:
      return fn.template operator()<Dtype::f64>();
    case Dtype::f16:
      return fn.template operator()<Dtype::f16>();
    case Dtype::bf16:
      return fn.template operator()<Dtype::bf16>();
  }
}

}  // namespace fastarch::cpu
