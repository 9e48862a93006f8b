// CUDA kernels of the activations (bias_gelu's erf and tanh forms; the gated swiglu and
// geglu: f(gate) up with f = silu, gelu or its tanh form), forward and backward, and their launchers. Included once per dtype and direction by the generated
// activation_{fwd,bwd}_{f32,f16,bf16}.cu, which instantiate only what they use. No torch
// headers: the kernels take the raw-pointer structs of activation_params.h.
//
// One elementwise skeleton. Each thread moves kVec elements (16 bytes) per access when the row
// length, pointers and row strides allow it, else one. Forward: a grid-stride loop over the
// (rows, cols / kVec) vectors. Backward: a block covers kWarpCols vectors of columns and a
// group of rows; its 8 warps step through the group's rows, each thread summing the bias
// gradient of its columns in fp32 registers; the warps' sums meet in shared memory and the
// block writes one row of partials, which a second kernel adds up (fixed order: the same bits
// on every run). Math in fp32, rounded once.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "activation_launch.h"
#include "activations/activation_params.h"

namespace fastarch::cuda::act {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpCols = kActivationWarpCols;  // backward: vectors of columns per block (one per lane)
constexpr int kRowLanes = kThreads / kWarpCols;  // backward: rows a block steps through at once
static_assert(kRowLanes == kActivationRowLanes, "activation_launch.h sizes the workspace with these");
constexpr int kColSumThreads = 256;

// ------------------------------------------------------------------ elements <-> fp32

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ void load(const T* p, float (&out)[kVec]) {
  const Vec<T, kVec> v = *reinterpret_cast<const Vec<T, kVec>*>(p);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = to_float(v.v[i]);
}

template <typename T, int kVec>
__device__ __forceinline__ void store(T* p, const float (&in)[kVec]) {
  Vec<T, kVec> v;
#pragma unroll
  for (int i = 0; i < kVec; ++i) v.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T, kVec>*>(p) = v;
}

// ------------------------------------------------------------------ math

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kTanhCubic = 0.044715f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// sigmoid(v) and 1 - sigmoid(v), each without cancellation: e s with e = exp(-v) where e < 1,
// the subtraction where s <= 1/2 (e there may be inf, and e s NaN).
struct Sigmoid {
  float s, one_minus_s;
};
__device__ __forceinline__ Sigmoid sigmoid(float v) {
  const float e = expf(-v);
  const float s = 1.0f / (1.0f + e);
  return {s, e < 1.0f ? e * s : 1.0f - s};
}

// 0.5 h (1 + tanh u) = h sigmoid(2u), u = sqrt(2/pi) (h + 0.044715 h^3).
__device__ __forceinline__ float tanh_arg2(float h) { return 2.0f * kSqrt2OverPi * h * (1.0f + kTanhCubic * h * h); }

// f(h) and f'(h) of one activation, from one evaluation of what they share; the forward uses
// .value, the single-input backward .grad, and the compiler drops what is unused.
struct ValueGrad {
  float value, grad;
};

// normcdff(h) = Phi(h), accurate in the negative tail (no 1 + erf cancellation). h Phi(h) is
// inf at +inf and NaN at -inf (inf * 0), as torch. The tanh form's derivative: s + g 2
// sqrt(2/pi) (1 + 3 * 0.044715 h^2), g = h s (1 - s), with h^2 kept out of the product: g is
// exactly 0 wherever h^2 would overflow (no inf * 0 for a huge finite h). silu' = s (1 + h (1 - s)).
template <Activation kAct>
__device__ __forceinline__ ValueGrad value_grad(float h) {
  if constexpr (kAct == Activation::silu) {
    const Sigmoid sg = sigmoid(h);
    return {h * sg.s, sg.s * (1.0f + h * sg.one_minus_s)};
  } else if constexpr (kAct == Activation::gelu_tanh) {
    const Sigmoid sg = sigmoid(tanh_arg2(h));
    const float g = h * sg.s * sg.one_minus_s;
    return {h * sg.s, sg.s + g * (2.0f * kSqrt2OverPi) + (g * h) * (h * (6.0f * kTanhCubic * kSqrt2OverPi))};
  } else {
    const float cdf = normcdff(h);
    return {h * cdf, cdf + h * kInvSqrt2Pi * expf(-0.5f * h * h)};
  }
}

// ------------------------------------------------------------------ kernels

// kGated: y = f(a) b (b = up), else y = f(a + bias).
template <typename T, int kVec, Activation kAct, bool kGated>
__global__ void __launch_bounds__(kThreads) activation_fwd_kernel(ActivationForwardParams p) {
  const int64_t vecs_per_row = p.cols / kVec;
  const int64_t total = p.rows * vecs_per_row;
  const T* bias = static_cast<const T*>(p.bias);
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < total; i += int64_t{gridDim.x} * kThreads) {
    const int64_t r = i / vecs_per_row, c = (i - r * vecs_per_row) * kVec;
    float a[kVec], b[kVec], out[kVec];
    load<T, kVec>(static_cast<const T*>(p.a) + r * p.a_row_stride + c, a);
    if constexpr (kGated) {
      load<T, kVec>(static_cast<const T*>(p.b) + r * p.b_row_stride + c, b);
    } else if (bias) {
      load<T, kVec>(bias + c, b);
#pragma unroll
      for (int k = 0; k < kVec; ++k) a[k] += b[k];
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      out[k] = value_grad<kAct>(a[k]).value;
      if constexpr (kGated) out[k] *= b[k];
    }
    store<T, kVec>(static_cast<T*>(p.y) + r * p.cols + c, out);
  }
}

// Grid (column blocks, row groups); rows_per_group rows per group. partials: (row groups, cols)
// fp32, or null when the bias gradient is not wanted.
template <typename T, int kVec, Activation kAct, bool kGated>
__global__ void __launch_bounds__(kThreads) activation_bwd_kernel(
    ActivationBackwardParams p, int64_t rows_per_group, float* partials) {
  __shared__ float sums[kRowLanes][kWarpCols * kVec];
  const int lane = threadIdx.x % kWarpCols, row_lane = threadIdx.x / kWarpCols;
  const int64_t c = (int64_t{blockIdx.x} * kWarpCols + lane) * kVec;
  const bool in_cols = c < p.cols;
  const int64_t first = blockIdx.y * rows_per_group;
  const int64_t last = first + rows_per_group < p.rows ? first + rows_per_group : p.rows;
  float bias[kVec] = {}, acc[kVec] = {};
  if constexpr (!kGated) {
    if (p.bias && in_cols) load<T, kVec>(static_cast<const T*>(p.bias) + c, bias);
  }
  for (int64_t r = first + row_lane; in_cols && r < last; r += kRowLanes) {
    float dy[kVec], a[kVec], da[kVec];
    load<T, kVec>(static_cast<const T*>(p.dy) + r * p.dy_row_stride + c, dy);
    load<T, kVec>(static_cast<const T*>(p.a) + r * p.a_row_stride + c, a);
    if constexpr (kGated) {
      // y = f(g) u: dy/dg = u f'(g), dy/du = f(g).
      float u[kVec], db[kVec];
      load<T, kVec>(static_cast<const T*>(p.b) + r * p.b_row_stride + c, u);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const ValueGrad f = value_grad<kAct>(a[k]);
        da[k] = dy[k] * u[k] * f.grad;
        db[k] = dy[k] * f.value;
      }
      store<T, kVec>(static_cast<T*>(p.db) + r * p.db_row_stride + c, db);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        da[k] = dy[k] * value_grad<kAct>(a[k] + bias[k]).grad;
        acc[k] += da[k];
      }
    }
    store<T, kVec>(static_cast<T*>(p.da) + r * p.da_row_stride + c, da);
  }
  if (!partials) return;  // uniform over the block: no thread is left at the barrier
#pragma unroll
  for (int k = 0; k < kVec; ++k) sums[row_lane][lane * kVec + k] = acc[k];
  __syncthreads();
  for (int i = threadIdx.x; i < kWarpCols * kVec; i += kThreads) {
    const int64_t col = int64_t{blockIdx.x} * kWarpCols * kVec + i;
    if (col >= p.cols) continue;
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < kRowLanes; ++j) s += sums[j][i];
    partials[int64_t{blockIdx.y} * p.cols + col] = s;
  }
}

// dbias[c] = sum over the row groups of partials[g][c], in fp32, rounded once.
template <typename T>
__global__ void __launch_bounds__(kColSumThreads) activation_colsum_kernel(
    const float* partials, int64_t groups, int64_t cols, T* dbias) {
  const int64_t c = int64_t{blockIdx.x} * kColSumThreads + threadIdx.x;
  if (c >= cols) return;
  float s = 0.0f;
  for (int64_t g = 0; g < groups; ++g) s += partials[g * cols + c];
  dbias[c] = from_float<T>(s);
}

// ------------------------------------------------------------------ launchers

template <typename T>
bool aligned(const void* ptr, int64_t row_stride, int kVec) {
  return reinterpret_cast<uintptr_t>(ptr) % (sizeof(T) * kVec) == 0 && row_stride % kVec == 0;
}

// The vector width every tensor of the problem allows: 16 bytes, or one element.
template <typename T>
int vector_width(int64_t cols, std::initializer_list<std::pair<const void*, int64_t>> tensors) {
  constexpr int kVec = 16 / sizeof(T);
  if (cols % kVec != 0) return 1;
  for (const auto& [ptr, stride] : tensors) {
    if (ptr && !aligned<T>(ptr, stride, kVec)) return 1;
  }
  return kVec;
}

template <typename T, int kVec, Activation kAct, bool kGated>
cudaError_t launch_forward(const ActivationForwardParams& p, cudaStream_t stream) {
  const int64_t total = p.rows * (p.cols / kVec);
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{current_sm_count()} * 16);
  activation_fwd_kernel<T, kVec, kAct, kGated><<<static_cast<unsigned>(std::max<int64_t>(blocks, 1)), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kVec, bool kGated>
cudaError_t forward_act(const ActivationForwardParams& p, cudaStream_t stream) {
  switch (p.act) {
    case Activation::gelu_erf:
      return launch_forward<T, kVec, Activation::gelu_erf, kGated>(p, stream);
    case Activation::gelu_tanh:
      return launch_forward<T, kVec, Activation::gelu_tanh, kGated>(p, stream);
    case Activation::silu:
      return launch_forward<T, kVec, Activation::silu, kGated>(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, int kVec>
cudaError_t forward_vec(const ActivationForwardParams& p, cudaStream_t stream) {
  return p.b ? forward_act<T, kVec, true>(p, stream) : forward_act<T, kVec, false>(p, stream);
}

template <typename T>
cudaError_t activation_forward_impl(const ActivationForwardParams& p, cudaStream_t stream) {
  const int vec = vector_width<T>(p.cols, {{p.a, p.a_row_stride}, {p.b, p.b_row_stride}, {p.bias, 0}, {p.y, p.cols}});
  return vec == 1 ? forward_vec<T, 1>(p, stream) : forward_vec<T, 16 / sizeof(T)>(p, stream);
}

template <typename T, int kVec, Activation kAct, bool kGated>
cudaError_t launch_backward(const ActivationBackwardParams& p, float* partials, void* dbias, cudaStream_t stream) {
  const int64_t col_blocks = (p.cols + kWarpCols * kVec - 1) / (kWarpCols * kVec);
  const int64_t groups = activation_backward_partial_rows(p.rows, p.cols);
  const int64_t rows_per_group = (p.rows + groups - 1) / groups;
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(groups));
  activation_bwd_kernel<T, kVec, kAct, kGated><<<grid, kThreads, 0, stream>>>(p, rows_per_group, partials);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !partials) return err;
  const unsigned colsum_blocks = static_cast<unsigned>((p.cols + kColSumThreads - 1) / kColSumThreads);
  activation_colsum_kernel<T><<<colsum_blocks, kColSumThreads, 0, stream>>>(partials, groups, p.cols, static_cast<T*>(dbias));
  return cudaGetLastError();
}

template <typename T, int kVec, bool kGated>
cudaError_t backward_act(const ActivationBackwardParams& p, float* partials, void* dbias, cudaStream_t stream) {
  switch (p.act) {
    case Activation::gelu_erf:
      return launch_backward<T, kVec, Activation::gelu_erf, kGated>(p, partials, dbias, stream);
    case Activation::gelu_tanh:
      return launch_backward<T, kVec, Activation::gelu_tanh, kGated>(p, partials, dbias, stream);
    case Activation::silu:
      return launch_backward<T, kVec, Activation::silu, kGated>(p, partials, dbias, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, int kVec>
cudaError_t backward_vec(const ActivationBackwardParams& p, float* partials, void* dbias, cudaStream_t stream) {
  return p.b ? backward_act<T, kVec, true>(p, partials, dbias, stream)
             : backward_act<T, kVec, false>(p, partials, dbias, stream);
}

template <typename T>
cudaError_t activation_backward_impl(const ActivationBackwardParams& p, float* partials, void* dbias, cudaStream_t stream) {
  const int vec = vector_width<T>(p.cols, {{p.dy, p.dy_row_stride}, {p.a, p.a_row_stride}, {p.b, p.b_row_stride},
                                           {p.bias, 0}, {p.da, p.da_row_stride}, {p.db, p.db_row_stride}});
  return vec == 1 ? backward_vec<T, 1>(p, partials, dbias, stream)
                  : backward_vec<T, 16 / sizeof(T)>(p, partials, dbias, stream);
}

}  // namespace
}  // namespace fastarch::cuda::act
