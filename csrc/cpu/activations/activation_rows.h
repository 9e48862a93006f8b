// Row kernels of the CPU activations: each processes rows [begin, end) of one problem. Two
// builds of the same math: AVX-512 (picked at run time when the CPU has it) and portable C++.
#pragma once
#include <cstdint>

#include "activations/activation_params.h"
#include "cpu/dtype.h"
#include "cpu/isa.h"

namespace fastarch::cpu::act {

// dbias_acc: this thread's (cols,) accumulator (fp32; fp64 for fp64 inputs), added into; null
// when the bias gradient is not wanted.
template <Isa I, Dtype D>
void activation_forward_rows_generic(const ActivationForwardParams& p, int64_t begin, int64_t end);
template <Isa I, Dtype D>
void activation_backward_rows_generic(const ActivationBackwardParams& p, int64_t begin, int64_t end, void* dbias_acc);

// What the AVX-512 build needs beyond the params.
struct Avx512RowArgs {
  const float* bias;  // fp32 copy of the bias (the tensor itself for fp32); null if absent
  bool stream;        // write outputs with streaming stores: cols % 16 == 0, outputs aligned to 16 elements
  bool bf16_instructions;  // the CPU has AVX512-BF16 (one instruction rounds fp32 to bf16)
};

template <Dtype D>
void activation_forward_rows_avx512(const ActivationForwardParams& p, int64_t begin, int64_t end, const Avx512RowArgs& a);
template <Dtype D>
void activation_backward_rows_avx512(
    const ActivationBackwardParams& p, int64_t begin, int64_t end, float* dbias_acc, const Avx512RowArgs& a);

}  // namespace fastarch::cpu::act
