// CUDA kernel of the rotary embedding and its launcher. Included once per dtype by the
// rope_{f32,f16,bf16}.cu units setup.py generates. No torch headers: the kernel takes
// rope_params.h's raw-pointer struct.
//
// One block per token: its threads first turn every (head, pair) of the token, thread i
// taking pair i % half of head i / half, so that neighbouring threads touch neighbouring
// elements of a head; then copy the pass-through channels. The token's cos/sin row is read
// by every head and stays in L1. Memory-bound: each element is read once and written once.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "rope/rope_params.h"
#include "rope_launch.h"

namespace fastarch::cuda {
namespace rope_detail {

constexpr int kMaxThreads = 256;

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) rope_kernel(const RopeParams p) {
  const int64_t token = blockIdx.x;
  const int64_t b = token / p.seqlen, s = token % p.seqlen;
  int64_t pos = p.positions ? p.positions[b * p.pos_stride_b + s * p.pos_stride_s] : 0;
  if (p.add_s) pos += s;
  // The op asserts positions on the device before launching (asynchronously); a position
  // past the table still never reads outside it, and gives NaN.
  const bool inside = pos >= 0 && pos < p.max_pos;
  const float* cos = static_cast<const float*>(p.cos) + (inside ? pos : 0) * p.half;
  const float* sin = static_cast<const float*>(p.sin) + (inside ? pos : 0) * p.half;
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b + s * p.x_stride_s;
  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + s * p.out_stride_s;
  const float nan = __int_as_float(0x7fc00000);

  const int64_t pairs = p.heads * p.half;
  for (int64_t i = threadIdx.x; i < pairs; i += blockDim.x) {
    const int64_t h = i / p.half, j = i % p.half;
    const int64_t i1 = p.interleaved ? 2 * j : j;
    const int64_t i2 = p.interleaved ? 2 * j + 1 : j + p.half;
    const float c = inside ? cos[j] : nan;
    const float sn = p.inverse ? -sin[j] : sin[j];
    const T* xh = x + h * p.x_stride_h;
    T* oh = out + h * p.out_stride_h;
    const float x1 = to_float<T>(xh[i1]), x2 = to_float<T>(xh[i2]);
    oh[i1] = from_float<T>(x1 * c - x2 * sn);
    oh[i2] = from_float<T>(x2 * c + x1 * sn);
  }
  const int64_t rot = 2 * p.half, pass = p.head_dim - rot;
  if (pass > 0) {
    for (int64_t i = threadIdx.x; i < p.heads * pass; i += blockDim.x) {
      const int64_t h = i / pass, j = rot + i % pass;
      out[h * p.out_stride_h + j] = x[h * p.x_stride_h + j];
    }
  }
}

}  // namespace rope_detail

template <typename T>
cudaError_t rope_forward_impl(const RopeParams& p, cudaStream_t stream) {
  const int64_t tokens = p.batch * p.seqlen;
  if (tokens == 0 || p.heads == 0) return cudaSuccess;
  // A warp per 32 pairs of the token, at most kMaxThreads: decode (one token, many heads)
  // and prefill (many tokens) both keep every thread busy.
  const int64_t pairs = p.heads * std::max<int64_t>(p.half, p.head_dim - 2 * p.half);
  const int threads = static_cast<int>(std::min<int64_t>(rope_detail::kMaxThreads, (pairs + 31) / 32 * 32));
  if (tokens > 0x7fffffff) return cudaErrorInvalidValue;  // the grid's x limit
  rope_detail::rope_kernel<T><<<static_cast<unsigned>(tokens), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fastarch::cuda
