// Backward norm kernels for __nv_bfloat16 (one translation unit per dtype and direction, so that the
// build compiles them in parallel).
#include "norm_kernels.cuh"

namespace fastarch::cuda {

template <>
cudaError_t norm_backward_plan<Dtype::bf16>(const NormBackwardParams& p, bool weight_grads, NormBackwardPlan* plan) {
  return norm_backward_plan_impl<__nv_bfloat16>(p, weight_grads, plan);
}

template <>
cudaError_t norm_backward<Dtype::bf16>(
    const NormBackwardPlan& plan, const NormBackwardParams& p, float* partials, void* dweight, void* dbias,
    cudaStream_t stream) {
  return norm_backward_impl<__nv_bfloat16>(plan, p, partials, dweight, dbias, stream);
}

}  // namespace fastarch::cuda
