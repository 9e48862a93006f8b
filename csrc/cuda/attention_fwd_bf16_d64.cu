// Forward and decoding attention kernels for __nv_bfloat16, head dim 64 (one translation unit per
// dtype, head dim and direction, so that the build compiles them in parallel).
#include "attention_decode_kernel.cuh"
#include "attention_fwd_kernel.cuh"

namespace fastarch::cuda::attention {

template <>
cudaError_t forward<Dtype::bf16, 64>(const AttentionParams& p, cudaStream_t stream) {
  return forward_impl<__nv_bfloat16, 64>(p, stream);
}

template <>
int decode_splits<Dtype::bf16, 64>(const DecodeParams& p) {
  return decode_splits_impl<__nv_bfloat16, 64>(p);
}

template <>
cudaError_t decode<Dtype::bf16, 64>(const DecodeParams& p, cudaStream_t stream) {
  return decode_impl<__nv_bfloat16, 64>(p, stream);
}

}  // namespace fastarch::cuda::attention
