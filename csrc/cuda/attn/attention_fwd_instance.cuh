// The forward and decoding attention kernels for one dtype and head dim: the body of a
// translation unit that setup.py generates for each entry of its CUDA_ATTENTION_* lists, with
// FASTARCH_DTYPE (f16, bf16), FASTARCH_ELEMENT (__half, __nv_bfloat16) and FASTARCH_HEAD_DIM
// defined first. One unit per entry: the build compiles them in parallel.
#include "attention_decode_kernel.cuh"
#include "attention_fwd_kernel.cuh"

namespace fastarch::cuda::attention {

template <>
cudaError_t forward<Dtype::FASTARCH_DTYPE, FASTARCH_HEAD_DIM>(const AttentionParams& p, cudaStream_t stream) {
  return forward_impl<FASTARCH_ELEMENT, FASTARCH_HEAD_DIM>(p, stream);
}

template <>
int decode_splits<Dtype::FASTARCH_DTYPE, FASTARCH_HEAD_DIM>(const DecodeParams& p) {
  return decode_splits_impl<FASTARCH_ELEMENT, FASTARCH_HEAD_DIM>(p);
}

template <>
cudaError_t decode<Dtype::FASTARCH_DTYPE, FASTARCH_HEAD_DIM>(const DecodeParams& p, cudaStream_t stream) {
  return decode_impl<FASTARCH_ELEMENT, FASTARCH_HEAD_DIM>(p, stream);
}

}  // namespace fastarch::cuda::attention
