// The backward group norm kernels for one dtype: the body of a translation unit that setup.py
// generates for each entry of its CUDA_GROUP_NORM_DTYPES list (see group_norm_fwd_instance.cuh).
#include "group_norm_kernels.cuh"

namespace fastarch::cuda::gn {

template <>
cudaError_t group_norm_backward<Dtype::FASTARCH_DTYPE>(const GroupNormBackwardParams& p, const GroupNormPlan& plan,
                                                       float* workspace, cudaStream_t stream) {
  return group_norm_launch<FASTARCH_ELEMENT>(p, plan, workspace, stream);
}

}  // namespace fastarch::cuda::gn
