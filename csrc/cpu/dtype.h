// The element types of the CPU row kernels (norms, activations, group_norm, linear, rotary):
// one enum for all of them, with no torch headers so that the AVX-512 and portable builds
// can take it as a template argument. dtype_of.h maps a tensor to it.
#pragma once

namespace fastarch::cpu {

enum class Dtype { f32, f64, f16, bf16 };

}  // namespace fastarch::cpu
