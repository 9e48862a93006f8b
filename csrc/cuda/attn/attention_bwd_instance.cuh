// The backward attention kernels for one dtype and head dim: the body of a translation unit
// that setup.py generates for each entry of its CUDA_ATTENTION_* lists (see
// attention_fwd_instance.cuh).
#include "attention_bwd_kernel.cuh"

namespace fastarch::cuda::attention {

template <>
cudaError_t backward<Dtype::FASTARCH_DTYPE, FASTARCH_HEAD_DIM>(const AttentionParams& p, cudaStream_t stream) {
  return backward_impl<FASTARCH_ELEMENT, FASTARCH_HEAD_DIM>(p, stream);
}

}  // namespace fastarch::cuda::attention
