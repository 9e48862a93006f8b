// Forward norm kernels for float (one translation unit per dtype and direction, so that the
// build compiles them in parallel).
#include "norm_kernels.cuh"

namespace fastarch::cuda {

template <>
cudaError_t norm_forward<Dtype::f32>(const NormForwardParams& p, cudaStream_t stream) {
  return norm_forward_impl<float>(p, stream);
}

}  // namespace fastarch::cuda
