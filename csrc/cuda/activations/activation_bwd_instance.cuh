// The backward activation kernels for one dtype: the body of a translation unit that setup.py
// generates for each entry of its CUDA_ACTIVATION_DTYPES list (see activation_fwd_instance.cuh).
#include "activation_kernels.cuh"

namespace fastarch::cuda::act {

template <>
cudaError_t activation_backward<Dtype::FASTARCH_DTYPE>(const ActivationBackwardParams& p, float* partials, void* dbias,
                                                      cudaStream_t stream) {
  return activation_backward_impl<FASTARCH_ELEMENT>(p, partials, dbias, stream);
}

}  // namespace fastarch::cuda::act
