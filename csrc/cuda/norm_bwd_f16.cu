// Backward norm kernels for __half (one translation unit per dtype and direction, so that the
// build compiles them in parallel).
#include "norm_kernels.cuh"

namespace fastarch::cuda {

template <>
cudaError_t norm_backward_plan<Dtype::f16>(const NormBackwardParams& p, bool weight_grads, NormBackwardPlan* plan) {
  return norm_backward_plan_impl<__half>(p, weight_grads, plan);
}

template <>
cudaError_t norm_backward<Dtype::f16>(
    const NormBackwardPlan& plan, const NormBackwardParams& p, float* partials, void* dweight, void* dbias,
    cudaStream_t stream) {
  return norm_backward_impl<__half>(plan, p, partials, dweight, dbias, stream);
}

}  // namespace fastarch::cuda
