// CUDA kernel of the small-batch linear layer, y = x W^T + b for a few rows of x.
//
// A warp computes one output column (one W row) for up to kRowsPerWarp rows of x: its lanes
// read the W row in 16-byte vectors (each vector once from memory, used for every x row), sum
// x * w in fp32, and the warp's partial sums are added by shuffles; lane 0 adds the bias and
// rounds once. Rows whose length or addresses do not allow 16-byte vectors take an element-wise
// loop. Memory-bound: W's bytes are the traffic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "linear_elem.cuh"
#include "linear_launch.h"

namespace fastarch::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kRowsPerWarp = 4;

template <LinearDtype D>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) linear_kernel(LinearArgs a, bool vectors) {
  using E = Elem<D>;
  using T = typename E::type;
  constexpr int kVec = 16 / sizeof(T);
  const int lane = threadIdx.x % 32;
  const int64_t n = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t m0 = int64_t(blockIdx.y) * kRowsPerWarp;
  if (n >= a.out_features) return;
  const int rows = a.rows - m0 < kRowsPerWarp ? int(a.rows - m0) : kRowsPerWarp;
  const int64_t K = a.in_features;
  const T* w = static_cast<const T*>(a.w) + n * K;
  const T* x = static_cast<const T*>(a.x) + m0 * a.ldx;
  float acc[kRowsPerWarp] = {};
  if (vectors) {
    for (int64_t k = int64_t(lane) * kVec; k < K; k += 32 * kVec) {
      const uint4 wv = __ldg(reinterpret_cast<const uint4*>(w + k));
      const T* wt = reinterpret_cast<const T*>(&wv);
#pragma unroll
      for (int m = 0; m < kRowsPerWarp; ++m) {
        if (m < rows) {
          const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + m * a.ldx + k));
          const T* xt = reinterpret_cast<const T*>(&xv);
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[m] = fmaf(E::widen(wt[i]), E::widen(xt[i]), acc[m]);
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
      const float wk = E::widen(w[k]);
#pragma unroll
      for (int m = 0; m < kRowsPerWarp; ++m)
        if (m < rows) acc[m] = fmaf(wk, E::widen(x[m * a.ldx + k]), acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < kRowsPerWarp; ++m)
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc[m] += __shfl_xor_sync(0xFFFFFFFFu, acc[m], offset);
  if (lane == 0) {
    const float b = a.bias ? E::widen(static_cast<const T*>(a.bias)[n]) : 0.0f;
    T* out = static_cast<T*>(a.out);
    for (int m = 0; m < rows; ++m) out[(m0 + m) * a.out_features + n] = E::narrow(acc[m] + b);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

template <LinearDtype D>
cudaError_t linear_forward(const LinearArgs& a, cudaStream_t stream) {
  constexpr int64_t kVec = 16 / sizeof(typename Elem<D>::type);
  const bool vectors = a.in_features % kVec == 0 && a.ldx % kVec == 0 && aligned16(a.x) && aligned16(a.w);
  const dim3 grid(unsigned((a.out_features + kWarpsPerBlock - 1) / kWarpsPerBlock),
                  unsigned((a.rows + kRowsPerWarp - 1) / kRowsPerWarp));
  linear_kernel<D><<<grid, kWarpsPerBlock * 32, 0, stream>>>(a, vectors);
  return cudaGetLastError();
}

template cudaError_t linear_forward<LinearDtype::f32>(const LinearArgs&, cudaStream_t);
template cudaError_t linear_forward<LinearDtype::f16>(const LinearArgs&, cudaStream_t);
template cudaError_t linear_forward<LinearDtype::bf16>(const LinearArgs&, cudaStream_t);

}  // namespace fastarch::cuda
