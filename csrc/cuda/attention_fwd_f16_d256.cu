// Forward and decoding attention kernels for __half, head dim 256 (one translation unit per
// dtype, head dim and direction, so that the build compiles them in parallel).
#include "attention_decode_kernel.cuh"
#include "attention_fwd_kernel.cuh"

namespace fastarch::cuda::attention {

template <>
cudaError_t forward<Dtype::f16, 256>(const AttentionParams& p, cudaStream_t stream) {
  return forward_impl<__half, 256>(p, stream);
}

template <>
int decode_splits<Dtype::f16, 256>(const DecodeParams& p) {
  return decode_splits_impl<__half, 256>(p);
}

template <>
cudaError_t decode<Dtype::f16, 256>(const DecodeParams& p, cudaStream_t stream) {
  return decode_impl<__half, 256>(p, stream);
}

}  // namespace fastarch::cuda::attention
