// Backward attention kernels for __nv_bfloat16, head dim 256 (one translation unit per dtype, head
// dim and direction, so that the build compiles them in parallel).
#include "attention_bwd_kernel.cuh"

namespace fastarch::cuda::attention {

template <>
cudaError_t backward<Dtype::bf16, 256>(const AttentionParams& p, cudaStream_t stream) {
  return backward_impl<__nv_bfloat16, 256>(p, stream);
}

}  // namespace fastarch::cuda::attention
