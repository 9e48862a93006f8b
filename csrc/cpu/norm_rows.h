// Row kernels of the CPU norms: each processes rows [begin, end) of one problem. Two builds of
// the same algorithm: AVX-512 (picked at run time when the CPU has it) and portable C++.
#pragma once
#include <cstdint>

#include "../norm_params.h"

namespace fastarch::cpu {

enum class Dtype { f32, f64, f16, bf16 };

// dweight_acc / dbias_acc: this thread's (cols,) accumulators in the statistics dtype, added
// into; null when that gradient is not wanted.
template <Dtype D>
void norm_forward_rows_generic(const NormForwardParams& p, int64_t begin, int64_t end);
template <Dtype D>
void norm_backward_rows_generic(
    const NormBackwardParams& p, int64_t begin, int64_t end, void* dweight_acc, void* dbias_acc);

template <Dtype D>
void norm_forward_rows_avx512(const NormForwardParams& p, int64_t begin, int64_t end);
template <Dtype D>
void norm_backward_rows_avx512(
    const NormBackwardParams& p, int64_t begin, int64_t end, float* dweight_acc, float* dbias_acc);

}  // namespace fastarch::cpu
