// Backward attention kernels for __half, head dim 128 (one translation unit per dtype, head
// dim and direction, so that the build compiles them in parallel).
#include "attention_bwd_kernel.cuh"

namespace fastarch::cuda::attention {

template <>
cudaError_t backward<Dtype::f16, 128>(const AttentionParams& p, cudaStream_t stream) {
  return backward_impl<__half, 128>(p, stream);
}

}  // namespace fastarch::cuda::attention
