// Forward norm kernels for __half (one translation unit per dtype and direction, so that the
// build compiles them in parallel).
#include "norm_kernels.cuh"

namespace fastarch::cuda {

template <>
cudaError_t norm_forward<Dtype::f16>(const NormForwardParams& p, cudaStream_t stream) {
  return norm_forward_impl<__half>(p, stream);
}

}  // namespace fastarch::cuda
