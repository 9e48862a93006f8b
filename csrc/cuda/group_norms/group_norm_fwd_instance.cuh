// The forward group norm kernels for one dtype: the body of a translation unit that setup.py
// generates for each entry of its CUDA_GROUP_NORM_DTYPES list, with FASTARCH_DTYPE (f32, f16,
// bf16) and FASTARCH_ELEMENT (float, __half, __nv_bfloat16) defined first. One unit per entry
// and direction: the build compiles them in parallel.
#include "group_norm_kernels.cuh"

namespace fastarch::cuda::gn {

template <>
cudaError_t group_norm_forward<Dtype::FASTARCH_DTYPE>(const GroupNormForwardParams& p, const GroupNormPlan& plan,
                                                      float* workspace, cudaStream_t stream) {
  return group_norm_launch<FASTARCH_ELEMENT>(p, plan, workspace, stream);
}

}  // namespace fastarch::cuda::gn
