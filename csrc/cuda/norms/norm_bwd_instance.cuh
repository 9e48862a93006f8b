// The backward norm kernels for one dtype: the body of a translation unit that setup.py
// generates for each entry of its CUDA_NORM_DTYPES list (see norm_fwd_instance.cuh).
#include "norm_kernels.cuh"

namespace fastarch::cuda {

template <>
cudaError_t norm_backward_plan<Dtype::FASTARCH_DTYPE>(const NormBackwardParams& p, bool weight_grads,
                                                     NormBackwardPlan* plan) {
  return norm_backward_plan_impl<FASTARCH_ELEMENT>(p, weight_grads, plan);
}

template <>
cudaError_t norm_backward<Dtype::FASTARCH_DTYPE>(const NormBackwardPlan& plan, const NormBackwardParams& p,
                                                float* partials, void* dweight, void* dbias, cudaStream_t stream) {
  return norm_backward_impl<FASTARCH_ELEMENT>(plan, p, partials, dweight, dbias, stream);
}

}  // namespace fastarch::cuda
