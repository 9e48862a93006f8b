// The forward activation kernels for one dtype: the body of a translation unit that setup.py
// generates for each entry of its CUDA_ACTIVATION_DTYPES list, with FASTARCH_DTYPE (f32, f16,
// bf16) and FASTARCH_ELEMENT (float, __half, __nv_bfloat16) defined first.
#include "activation_kernels.cuh"

namespace fastarch::cuda::act {

template <>
cudaError_t activation_forward<Dtype::FASTARCH_DTYPE>(const ActivationForwardParams& p, cudaStream_t stream) {
  return activation_forward_impl<FASTARCH_ELEMENT>(p, stream);
}

}  // namespace fastarch::cuda::act
