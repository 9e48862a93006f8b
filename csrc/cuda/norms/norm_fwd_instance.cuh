// The forward norm kernels for one dtype: the body of a translation unit that setup.py
// generates for each entry of its CUDA_NORM_DTYPES list, with FASTARCH_DTYPE (f32, f16, bf16)
// and FASTARCH_ELEMENT (float, __half, __nv_bfloat16) defined first. One unit per entry: the
// build compiles them in parallel.
#include "norm_kernels.cuh"

namespace fastarch::cuda {

template <>
cudaError_t norm_forward<Dtype::FASTARCH_DTYPE>(const NormForwardParams& p, cudaStream_t stream) {
  return norm_forward_impl<FASTARCH_ELEMENT>(p, stream);
}

}  // namespace fastarch::cuda
