// The rotary kernel for one dtype: the body of a translation unit that setup.py generates for
// each entry of its CUDA_ROPE_DTYPES list, with FASTARCH_DTYPE (f32, f16, bf16) and
// FASTARCH_ELEMENT (float, __half, __nv_bfloat16) defined first.
#include "rope_kernels.cuh"

namespace fastarch::cuda {

template <>
cudaError_t rope_forward<RopeDtype::FASTARCH_DTYPE>(const RopeParams& p, cudaStream_t stream) {
  return rope_forward_impl<FASTARCH_ELEMENT>(p, stream);
}

}  // namespace fastarch::cuda
