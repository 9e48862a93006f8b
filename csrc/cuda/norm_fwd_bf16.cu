// Forward norm kernels for __nv_bfloat16 (one translation unit per dtype and direction, so that the
// build compiles them in parallel).
#include "norm_kernels.cuh"

namespace fastarch::cuda {

template <>
cudaError_t norm_forward<Dtype::bf16>(const NormForwardParams& p, cudaStream_t stream) {
  return norm_forward_impl<__nv_bfloat16>(p, stream);
}

}  // namespace fastarch::cuda
