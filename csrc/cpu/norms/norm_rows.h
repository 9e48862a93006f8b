// Row kernels of the CPU norms: each processes rows [begin, end) of one problem. Two builds of
// the same algorithm: AVX-512 (picked at run time when the CPU has it) and portable C++.
#pragma once
#include <cstdint>

#include "cpu/dtype.h"
#include "cpu/isa.h"
#include "norms/norm_params.h"

namespace fastarch::cpu {

// Rows of at least this many bytes have the next one prefetched during their last pass (both
// builds; the AVX-512 backward too): the hardware prefetchers stop at a 4 KB page, so from
// there a row's first lines came from memory only once its first pass asked, after the previous
// row's arithmetic instead of during it. AMD EPYC Zen 5, 2 threads, in-process A/B at 2048x4096
// and 1024x8192, fp32 and bf16: AVX-512 forward rms_norm 1.2-1.66x, layer_norm 1.03-1.55x,
// add_rms_norm 1.04-1.55x, forward + backward 1.04-1.24x; narrower rows 0.85-1.07x, so they go
// without.
constexpr int64_t kPrefetchRowBytes = 4096;

// dweight_acc / dbias_acc: this thread's (cols,) accumulators in the statistics dtype, added
// into; null when that gradient is not wanted. weight, bias: the vectors in the statistics
// dtype, p.weight_offset added to the weight (null: p.weight and p.bias as they are, which
// have no offset then).
template <Isa I, Dtype D>
void norm_forward_rows_generic(const NormForwardParams& p, int64_t begin, int64_t end, bool stream, const void* weight,
                               const void* bias);
template <Isa I, Dtype D>
void norm_backward_rows_generic(
    const NormBackwardParams& p, int64_t begin, int64_t end, void* dweight_acc, void* dbias_acc, const void* weight);

// What the AVX-512 build needs beyond the params.
struct Avx512RowArgs {
  const float* weight;  // fp32 weight (+ p.weight_offset) and bias (the tensors themselves for fp32); null if absent
  const float* bias;
  float* scratch;  // this thread's fp32 scratch, 2 * cols values
  bool stream;     // write outputs with streaming stores: cols % 16 == 0, outputs aligned to 16 elements
  bool bf16_instructions;  // the CPU has AVX512-BF16 (one instruction rounds fp32 to bf16)
};

template <Dtype D>
void norm_forward_rows_avx512(const NormForwardParams& p, int64_t begin, int64_t end, const Avx512RowArgs& a);
template <Dtype D>
void norm_backward_rows_avx512(
    const NormBackwardParams& p, int64_t begin, int64_t end, float* dweight_acc, float* dbias_acc,
    const Avx512RowArgs& a);

}  // namespace fastarch::cpu
