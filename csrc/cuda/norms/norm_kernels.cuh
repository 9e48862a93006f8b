// CUDA kernels of the norms (LayerNorm / RMSNorm over the last dim, optionally fused with the
// pre-norm residual add), forward and backward, and their launchers. Included once per dtype
// and direction by norm_{fwd,bwd}_{f32,f16,bf16}.cu, which instantiate only what they use.
// No torch headers: the kernels take the raw-pointer structs of norm_params.h.
//
// Rows that fit in registers: each row is held by a group of `threads_per_row` threads (a
// power of two up to 32, several groups per warp, or a multiple of 32), each thread owning
// kNv vectors of kVec elements: vector j = t + k * threads_per_row of the row, so that
// neighbouring threads touch neighbouring 16 bytes. Reductions: butterfly shuffles, then a
// shared-memory stage across the warps of a row. Longer rows: one block per row that loops
// over the row once per pass, re-reading it from L2.
//
// Statistics and all accumulation are fp32 (LayerNorm: the corrected two-pass variance, as
// in every backend); y = ((s - mean) - correction) * rstd * w + b is rounded to T once.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>

#include "norms/norm_params.h"
#include "norm_launch.h"

namespace fastarch::cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
// Block size when several short rows share a block.
constexpr int kRowsBlockThreads = 256;
// Register-resident rows, sized so that no instantiation spills (checked with ptxas
// --resource-usage). Forward: a thread holds at most 4 vectors (64 bytes) of its row, which
// fits 64 registers, so up to 1024 threads per row: rows up to 16384 fp32 or 32768 16-bit
// elements. Backward (the fp32 dweight/dbias sums cost two more registers per element): at
// most 16 elements per thread and 512 threads per row, i.e. rows up to 8192 elements.
// Misaligned rows (scalar instantiations): at most 8 elements per thread (a smaller build)
// and 512 threads per row, i.e. rows up to 4096 elements. minBlocksPerSM = 1 in the launch
// bounds: otherwise ptxas may spill a few bytes to reach an occupancy step.
constexpr int kFwdMaxNv = 4;
constexpr int kBwdMaxThreads = 512;
constexpr int kBwdMaxElems = 16;
constexpr int kScalarMaxNv = 8;
// The register-resident backward prefetches the next row for 16-bit types, whose rows take
// half the registers (fp32's largest instantiation has no room for a second row).
template <typename T>
constexpr bool kBwdPrefetch = sizeof(T) == 2;

template <int kVec>
constexpr int fwd_max_threads() {
  return kVec == 1 ? 512 : 1024;
}
// Looped kernels: one block per row, loop_unroll vectors in flight per thread and pass (8
// when they are single elements, for more bytes in flight). They run one or two blocks per
// SM, so their launch bounds say so (minBlocksPerSM = 1): otherwise ptxas trades a few
// bytes of spill for an occupancy they never use.
constexpr int kLoopThreads = 512;
constexpr int loop_unroll(int vec) { return vec == 1 ? 8 : 4; }
// Column sums of the dweight/dbias partials: 32 columns x 32 lanes over the partial rows.
constexpr int kColSumCols = 32;
constexpr int kColSumLanes = 32;
// Looped backward's column kernel: 32 vectors of columns x 8 lanes over rows.
constexpr int kColsVectors = 32;
constexpr int kColsRowLanes = 8;

// ------------------------------------------------------------------ packs of elements

// kVec elements of T moved by one load/store (16 bytes; or one element when the row is
// misaligned), read and written as fp32: get(e) widens element e, set(f) rounds kVec values
// to T (round to nearest even). 16-bit types are held as 32-bit words of two elements, so
// that no register holds a lone 16-bit value and two outputs take one conversion.
template <typename T, int kVec, typename Enable = void>
struct Pack;

template <int kVec>
struct alignas(4 * kVec) Pack<float, kVec> {
  float v[kVec];
  __device__ __forceinline__ float get(int e) const { return v[e]; }
  __device__ __forceinline__ void set(const float (&f)[kVec]) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] = f[e];
  }
  __device__ __forceinline__ void set_zero() {
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] = 0.f;
  }
};

// Bits of 16-bit floats in 32-bit words: element 2i is the low half (lower address).
template <typename T>
struct Bits16;

template <>
struct Bits16<__half> {
  static __device__ __forceinline__ float low(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  }
  static __device__ __forceinline__ float high(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  static __device__ __forceinline__ uint32_t pair(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t w;
    memcpy(&w, &h, sizeof(w));
    return w;
  }
  static __device__ __forceinline__ unsigned short one(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

template <>
struct Bits16<__nv_bfloat16> {
  // bf16 is the top half of an fp32: widening is a shift or a mask.
  static __device__ __forceinline__ float low(uint32_t w) { return __uint_as_float(w << 16); }
  static __device__ __forceinline__ float high(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
  static __device__ __forceinline__ uint32_t pair(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t w;
    memcpy(&w, &h, sizeof(w));
    return w;
  }
  static __device__ __forceinline__ unsigned short one(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

template <typename T, int kVec>
struct alignas(2 * kVec) Pack<T, kVec, std::enable_if_t<sizeof(T) == 2 && kVec % 2 == 0>> {
  uint32_t w[kVec / 2];
  __device__ __forceinline__ float get(int e) const {
    return e % 2 ? Bits16<T>::high(w[e / 2]) : Bits16<T>::low(w[e / 2]);
  }
  __device__ __forceinline__ void set(const float (&f)[kVec]) {
#pragma unroll
    for (int i = 0; i < kVec / 2; ++i) w[i] = Bits16<T>::pair(f[2 * i], f[2 * i + 1]);
  }
  __device__ __forceinline__ void set_zero() {
#pragma unroll
    for (int i = 0; i < kVec / 2; ++i) w[i] = 0u;  // +0.0 in both halves
  }
};

template <typename T>
struct alignas(2) Pack<T, 1, std::enable_if_t<sizeof(T) == 2>> {
  unsigned short u;
  __device__ __forceinline__ float get(int) const { return Bits16<T>::low(u); }
  __device__ __forceinline__ void set(const float (&f)[1]) { u = Bits16<T>::one(f[0]); }
  __device__ __forceinline__ void set_zero() { u = 0; }
};

// Vector j (elements j * kVec ...) of a row.
template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* row, int64_t j) {
  return *reinterpret_cast<const Pack<T, kVec>*>(row + j * kVec);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_pack(T* row, int64_t j, const Pack<T, kVec>& v) {
  *reinterpret_cast<Pack<T, kVec>*>(row + j * kVec) = v;
}

// ------------------------------------------------------------------ reductions

// Sums kN values over the threads_per_row threads of a row; all of them get the same bits
// (each butterfly step adds the same two operands in both lanes). threads_per_row is a power
// of two <= 32 (groups aligned within a warp) or a multiple of 32 (contiguous warps). buf:
// 2 * kN * 32 floats of shared memory, used alternately by consecutive calls (phase), so one
// barrier per call suffices: a thread can only overwrite a half after every thread passed the
// barrier of the call in between, i.e. finished reading that half. Must be called by every
// thread of the block (uniform control flow) when threads_per_row > 32.
template <int kN>
__device__ __forceinline__ void row_allreduce(float (&v)[kN], int threads_per_row, float* buf, int& phase) {
  const int width = threads_per_row < 32 ? threads_per_row : 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    if (offset < width) {
#pragma unroll
      for (int i = 0; i < kN; ++i) v[i] += __shfl_xor_sync(kFullMask, v[i], offset);
    }
  }
  if (threads_per_row <= 32) return;
  float* stage = buf + (phase & 1) * (kN * 32);
  ++phase;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kN; ++i) stage[i * 32 + warp] = v[i];
  }
  __syncthreads();
  const int warps_per_row = threads_per_row >> 5;
  const int first = warp - warp % warps_per_row;
#pragma unroll
  for (int i = 0; i < kN; ++i) v[i] = lane < warps_per_row ? stage[i * 32 + first + lane] : 0.f;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
    for (int i = 0; i < kN; ++i) v[i] += __shfl_xor_sync(kFullMask, v[i], offset);
  }
}

// The __f*_rn intrinsics below round each operation where the reference rounds it: they are
// never fused into an FMA (nvcc fuses a * b + c by default) and stay correctly rounded under
// fast-math flags. E.g. dy * w - mean(dy * w) is then exactly 0 for a row of one element.

// 1 / sqrt(var + eps), correctly rounded (no rsqrt approximation).
__device__ __forceinline__ float inverse_std(float var, float eps) {
  return __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(var, eps)));
}

// Row statistics of a normalization, as every backend computes them. LayerNorm: the corrected
// two-pass variance, from sum_dev = sum(s - mean) and sum_sq = sum((s - mean)^2) over the
// deviations from the fp32 mean: their own mean (`correction`, the mean's rounding error) is
// removed from the variance and from every deviation, and the stored mean is mean +
// correction. No E[x^2] - mean^2 cancellation. RMSNorm: mean = correction = 0, sum_sq =
// sum(s^2).
// A NaN or inf in the row makes var NaN, and so the row's y. A row whose mean square
// mean^2 + var overflows fp32 (|x| beyond ~1.8e19) has no fp32 statistics: LayerNorm's rstd
// is NaN there, as PyTorch's LayerNorm gives (a var of inf would give rstd = 0 and y = bias,
// silently wrong); RMSNorm's is 0 (y = x * 0), as PyTorch's RMSNorm gives.
struct RowStats {
  float mean, correction, rstd;
};

__device__ __forceinline__ RowStats row_stats(bool rms, float mean, float sum_dev, float sum_sq, float n, float eps) {
  if (rms) return {0.f, 0.f, inverse_std(__fdiv_rn(sum_sq, n), eps)};
  const float correction = __fdiv_rn(sum_dev, n);
  float var = __fsub_rn(__fdiv_rn(sum_sq, n), __fmul_rn(correction, correction));
  var = var < 0.f ? 0.f : var;  // rounding can take it below 0; a NaN stays NaN (fmaxf drops it)
  const bool in_range = __fadd_rn(__fmul_rn(mean, mean), var) <= FLT_MAX;
  return {mean, correction, in_range ? inverse_std(var, eps) : __int_as_float(0x7fc00000)};  // quiet NaN
}

// w + offset, in fp32 (Gemma's 1 + weight); w itself without an offset (w + 0 would turn a -0
// weight into +0, and the product's sign with it).
__device__ __forceinline__ float offset_weight(float w, double offset) {
  return offset != 0.0 ? __fadd_rn(w, static_cast<float>(offset)) : w;
}

// ((s - mean) - correction) * rstd * w + b, rounded operation by operation like the reference.
__device__ __forceinline__ float normalize(float s, const RowStats& st, bool has_w, float w, bool has_b, float b) {
  float v = __fmul_rn(__fsub_rn(__fsub_rn(s, st.mean), st.correction), st.rstd);
  if (has_w) v = __fmul_rn(v, w);
  if (has_b) v = __fadd_rn(v, b);
  return v;
}

// The input gradient of one element: rstd * ((g - mean(g)) - xhat * mean(g * xhat)) (+ the
// gradient arriving at residual_out), rounded like the reference.
__device__ __forceinline__ float input_grad(float g, float xhat, float rstd, float c_g, float c_gx) {
  return __fmul_rn(rstd, __fsub_rn(__fsub_rn(g, c_g), __fmul_rn(xhat, c_gx)));
}

// ------------------------------------------------------------------ forward

// Rows held in registers. Blocks of rows_per_block = blockDim.x / threads_per_row rows,
// grid-stride (the loop bound is uniform over the block, so the barriers stay legal).
template <typename T, int kVec, int kNv>
__global__ void __launch_bounds__(fwd_max_threads<kVec>(), 1)
    norm_fwd_rows_kernel(const NormForwardParams p, int threads_per_row) {
  using P = Pack<T, kVec>;
  __shared__ float red[2 * 2 * 32];
  const int tpr = threads_per_row;
  const int rows_per_block = blockDim.x / tpr;
  const int group = threadIdx.x / tpr;
  const int t = threadIdx.x - group * tpr;
  const int64_t nvec = p.cols / kVec;
  const float n = static_cast<float>(p.cols);
  const float eps = static_cast<float>(p.eps);
  const T* w = static_cast<const T*>(p.weight);
  const T* b = static_cast<const T*>(p.bias);
  int phase = 0;
  for (int64_t first_row = static_cast<int64_t>(blockIdx.x) * rows_per_block; first_row < p.rows;
       first_row += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = first_row + group;
    const bool row_ok = row < p.rows;
    bool ok[kNv];
#pragma unroll
    for (int k = 0; k < kNv; ++k) ok[k] = row_ok && t + k * tpr < nvec;

    // The row: x, or x + residual rounded to T (what residual_out holds and what the
    // statistics see). Kept in T, not fp32: exact, and half the registers for 16-bit types.
    // All loads are issued before any use (memory-level parallelism); zeros outside the row.
    P xs[kNv];
    const T* x = static_cast<const T*>(p.x) + (row_ok ? row * p.x_row_stride : 0);
#pragma unroll
    for (int k = 0; k < kNv; ++k) {
      if (ok[k]) {
        xs[k] = load_pack<T, kVec>(x, t + k * tpr);
      } else {
        xs[k].set_zero();
      }
    }
    if (p.residual) {
      const T* r = static_cast<const T*>(p.residual) + (row_ok ? row * p.residual_row_stride : 0);
      T* out = static_cast<T*>(p.residual_out) + (row_ok ? row * p.cols : 0);
      P ra[kNv];
#pragma unroll
      for (int k = 0; k < kNv; ++k) {
        if (ok[k]) ra[k] = load_pack<T, kVec>(r, t + k * tpr);
      }
#pragma unroll
      for (int k = 0; k < kNv; ++k) {
        if (ok[k]) {
          float f[kVec];
#pragma unroll
          for (int e = 0; e < kVec; ++e) f[e] = xs[k].get(e) + ra[k].get(e);
          xs[k].set(f);
          store_pack<T, kVec>(out, t + k * tpr, xs[k]);
        }
      }
    }

    // Statistics (row_stats): the mean, then sum(d) and sum(d^2) of the deviations d.
    float mean = 0.f;
    if (!p.rms) {
      float sum[1] = {0.f};
#pragma unroll
      for (int k = 0; k < kNv; ++k) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) sum[0] += xs[k].get(e);  // 0 outside the row
      }
      row_allreduce<1>(sum, tpr, red, phase);
      mean = __fdiv_rn(sum[0], n);
    }
    float dev[2] = {0.f, 0.f};
#pragma unroll
    for (int k = 0; k < kNv; ++k) {
      if (ok[k]) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float d = xs[k].get(e) - mean;
          dev[0] += d;
          dev[1] += d * d;
        }
      }
    }
    row_allreduce<2>(dev, tpr, red, phase);
    const RowStats st = row_stats(p.rms, mean, dev[0], dev[1], n, eps);

    if (row_ok) {
      T* y = static_cast<T*>(p.y) + row * p.cols;
#pragma unroll
      for (int k = 0; k < kNv; ++k) {
        if (!ok[k]) continue;
        const int j = t + k * tpr;
        P wa, ba;
        if (w) wa = load_pack<T, kVec>(w, j);
        if (b) ba = load_pack<T, kVec>(b, j);
        float f[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float we = w ? offset_weight(wa.get(e), p.weight_offset) : 1.f;
          f[e] = normalize(xs[k].get(e), st, w != nullptr, we, b != nullptr, b ? ba.get(e) : 0.f);
        }
        P o;
        o.set(f);
        store_pack<T, kVec>(y, j, o);
      }
      if (t == 0) {
        if (!p.rms) static_cast<float*>(p.mean)[row] = __fadd_rn(st.mean, st.correction);
        static_cast<float*>(p.rstd)[row] = st.rstd;
      }
    }
  }
}

// Rows too long for registers: one block per row (grid-stride over rows), three passes over
// the row (sum, deviations, normalize; RMSNorm skips the second), the later ones re-reading
// it from L2. Every thread reads back only the vectors it wrote itself
// (residual_out), so they need no barrier.
template <typename T, int kVec>
__global__ void __launch_bounds__(kLoopThreads, 1) norm_fwd_looped_kernel(const NormForwardParams p) {
  using P = Pack<T, kVec>;
  constexpr int kLoopUnroll = loop_unroll(kVec);
  constexpr int64_t kStep = static_cast<int64_t>(kLoopThreads) * kLoopUnroll;
  __shared__ float red[2 * 2 * 32];
  const int64_t nvec = p.cols / kVec;
  const float n = static_cast<float>(p.cols);
  const float eps = static_cast<float>(p.eps);
  const T* w = static_cast<const T*>(p.weight);
  const T* b = static_cast<const T*>(p.bias);
  int phase = 0;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    const T* src = x;
    // Pass 1: the sum (LayerNorm) or the sum of squares (RMSNorm); writes residual_out.
    float acc[1] = {0.f};
    if (p.residual) {
      const T* r = static_cast<const T*>(p.residual) + row * p.residual_row_stride;
      T* out = static_cast<T*>(p.residual_out) + row * p.cols;
      for (int64_t base = threadIdx.x; base < nvec; base += kStep) {
        P xs[kLoopUnroll], ra[kLoopUnroll];
#pragma unroll
        for (int u = 0; u < kLoopUnroll; ++u) {
          const int64_t j = base + u * kLoopThreads;
          if (j < nvec) {
            xs[u] = load_pack<T, kVec>(x, j);
            ra[u] = load_pack<T, kVec>(r, j);
          }
        }
#pragma unroll
        for (int u = 0; u < kLoopUnroll; ++u) {
          const int64_t j = base + u * kLoopThreads;
          if (j < nvec) {
            float f[kVec];
#pragma unroll
            for (int e = 0; e < kVec; ++e) f[e] = xs[u].get(e) + ra[u].get(e);
            xs[u].set(f);
            store_pack<T, kVec>(out, j, xs[u]);
#pragma unroll
            for (int e = 0; e < kVec; ++e) {
              const float s = xs[u].get(e);
              acc[0] += p.rms ? s * s : s;
            }
          }
        }
      }
      src = out;
    } else {
      for (int64_t base = threadIdx.x; base < nvec; base += kStep) {
        P xs[kLoopUnroll];
#pragma unroll
        for (int u = 0; u < kLoopUnroll; ++u) {
          const int64_t j = base + u * kLoopThreads;
          if (j < nvec) xs[u] = load_pack<T, kVec>(x, j);
        }
#pragma unroll
        for (int u = 0; u < kLoopUnroll; ++u) {
          const int64_t j = base + u * kLoopThreads;
          if (j < nvec) {
#pragma unroll
            for (int e = 0; e < kVec; ++e) {
              const float s = xs[u].get(e);
              acc[0] += p.rms ? s * s : s;
            }
          }
        }
      }
    }
    row_allreduce<1>(acc, kLoopThreads, red, phase);
    float mean = 0.f, dev[2] = {0.f, acc[0]};
    if (!p.rms) {
      mean = __fdiv_rn(acc[0], n);
      // Pass 2: sum(d) and sum(d^2) of the deviations d from the mean (row_stats).
      dev[1] = 0.f;
      for (int64_t base = threadIdx.x; base < nvec; base += kStep) {
        P xs[kLoopUnroll];
#pragma unroll
        for (int u = 0; u < kLoopUnroll; ++u) {
          const int64_t j = base + u * kLoopThreads;
          if (j < nvec) xs[u] = load_pack<T, kVec>(src, j);
        }
#pragma unroll
        for (int u = 0; u < kLoopUnroll; ++u) {
          const int64_t j = base + u * kLoopThreads;
          if (j < nvec) {
#pragma unroll
            for (int e = 0; e < kVec; ++e) {
              const float d = xs[u].get(e) - mean;
              dev[0] += d;
              dev[1] += d * d;
            }
          }
        }
      }
      row_allreduce<2>(dev, kLoopThreads, red, phase);
    }
    const RowStats st = row_stats(p.rms, mean, dev[0], dev[1], n, eps);
    // Pass 3: normalize.
    T* y = static_cast<T*>(p.y) + row * p.cols;
    for (int64_t base = threadIdx.x; base < nvec; base += kStep) {
      P xs[kLoopUnroll];
#pragma unroll
      for (int u = 0; u < kLoopUnroll; ++u) {
        const int64_t j = base + u * kLoopThreads;
        if (j < nvec) xs[u] = load_pack<T, kVec>(src, j);
      }
#pragma unroll
      for (int u = 0; u < kLoopUnroll; ++u) {
        const int64_t j = base + u * kLoopThreads;
        if (j < nvec) {
          P wa, ba;
          if (w) wa = load_pack<T, kVec>(w, j);
          if (b) ba = load_pack<T, kVec>(b, j);
          float f[kVec];
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float we = w ? offset_weight(wa.get(e), p.weight_offset) : 1.f;
            f[e] = normalize(xs[u].get(e), st, w != nullptr, we, b != nullptr, b ? ba.get(e) : 0.f);
          }
          P o;
          o.set(f);
          store_pack<T, kVec>(y, j, o);
        }
      }
    }
    if (threadIdx.x == 0) {
      if (!p.rms) static_cast<float*>(p.mean)[row] = __fadd_rn(st.mean, st.correction);
      static_cast<float*>(p.rstd)[row] = st.rstd;
    }
  }
}

// ------------------------------------------------------------------ backward

// dx for rows held in registers, fused with the dweight/dbias sums. Persistent grid
// (grid-stride over blocks of rows): each thread adds dy * xhat and dy over its rows for the
// columns it owns (the same columns in every row); at the end the block's row groups are
// added in shared memory and the block writes one partial row to dw_part/db_part
// (gridDim.x, cols). dw_part == null: no weight gradients.
//   xhat = (x - mean) * rstd, g = dy * w, dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   (+ dresidual_out); RMSNorm: mean = 0 and no mean(g) term.
template <typename T, int kVec, int kNv>
__global__ void __launch_bounds__(kBwdMaxThreads)
    norm_bwd_rows_kernel(const NormBackwardParams p, float* dw_part, float* db_part, int threads_per_row) {
  using P = Pack<T, kVec>;
  __shared__ float red[2 * 2 * 32];
  // Used only when several rows share a block (then blockDim.x <= kRowsBlockThreads).
  __shared__ float acc_smem[kRowsBlockThreads * kNv * kVec];
  const int tpr = threads_per_row;
  const int rows_per_block = blockDim.x / tpr;
  const int group = threadIdx.x / tpr;
  const int t = threadIdx.x - group * tpr;
  const int64_t nvec = p.cols / kVec;
  const float n = static_cast<float>(p.cols);
  const bool weight_grads = dw_part != nullptr;
  const T* w = static_cast<const T*>(p.weight);
  const float* mean_in = static_cast<const float*>(p.mean);
  const float* rstd_in = static_cast<const float*>(p.rstd);
  float dw[kNv][kVec], db[kNv][kVec];
#pragma unroll
  for (int k = 0; k < kNv; ++k) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) dw[k][e] = db[k][e] = 0.f;
  }
  // x and dy stay in T across the reduction (half the registers of fp32 for 16-bit types);
  // xhat and g are recomputed for dx. Outside the row x = dy = w = 0, so g = 0 and every
  // product with dy or g is 0 (xhat = -mean * rstd is finite there unless the row's own
  // xhat are not; rows past the end have mean = rstd = 0).
  const auto load_row = [&](int64_t row, P (&xs)[kNv], P (&ds)[kNv]) {
    const bool row_ok = row < p.rows;
    const T* x = static_cast<const T*>(p.xin) + (row_ok ? row * p.xin_row_stride : 0);
    const T* dy = static_cast<const T*>(p.dy) + (row_ok ? row * p.dy_row_stride : 0);
#pragma unroll
    for (int k = 0; k < kNv; ++k) {
      if (row_ok && t + k * tpr < nvec) {
        xs[k] = load_pack<T, kVec>(x, t + k * tpr);
        ds[k] = load_pack<T, kVec>(dy, t + k * tpr);
      } else {
        xs[k].set_zero();
        ds[k].set_zero();
      }
    }
  };
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  P xa[kNv], da[kNv];
  if (kBwdPrefetch<T>) load_row(static_cast<int64_t>(blockIdx.x) * rows_per_block + group, xa, da);
  int phase = 0;
  for (int64_t first_row = static_cast<int64_t>(blockIdx.x) * rows_per_block; first_row < p.rows;
       first_row += row_step) {
    const int64_t row = first_row + group;
    const bool row_ok = row < p.rows;
    bool ok[kNv];
#pragma unroll
    for (int k = 0; k < kNv; ++k) ok[k] = row_ok && t + k * tpr < nvec;
    // 16-bit types: this row's packs were loaded during the previous row's work and the next
    // row's are loaded now, so two rows' bytes are in flight per block (a block of 512 threads
    // fills an SM's registers; with one row in flight bf16 ran at 35% of copy bandwidth on an
    // H200, fp32 at 90%).
    P xn[kNv], dn[kNv];
    if (kBwdPrefetch<T>) {
      load_row(row + row_step, xn, dn);
    } else {
      load_row(row, xa, da);
    }
    const float mean = row_ok && !p.rms ? mean_in[row] : 0.f;
    const float rstd = row_ok ? rstd_in[row] : 0.f;

    float sums[2] = {0.f, 0.f};  // sum(g), sum(g * xhat)
#pragma unroll
    for (int k = 0; k < kNv; ++k) {
      P wa;
      if (w) {
        if (ok[k]) {
          wa = load_pack<T, kVec>(w, t + k * tpr);
        } else {
          wa.set_zero();
        }
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float d = da[k].get(e);
        const float xh = (xa[k].get(e) - mean) * rstd;
        const float g = w ? __fmul_rn(d, offset_weight(wa.get(e), p.weight_offset)) : d;
        if (weight_grads) {
          dw[k][e] += d * xh;
          db[k][e] += d;
        }
        sums[0] += g;
        sums[1] += g * xh;
      }
    }
    row_allreduce<2>(sums, tpr, red, phase);
    const float c_g = p.rms ? 0.f : __fdiv_rn(sums[0], n);
    const float c_gx = __fdiv_rn(sums[1], n);

    if (row_ok) {
      T* dx = static_cast<T*>(p.dx) + row * p.cols;
      const T* dres =
          p.dresidual_out ? static_cast<const T*>(p.dresidual_out) + row * p.dresidual_out_row_stride : nullptr;
#pragma unroll
      for (int k = 0; k < kNv; ++k) {
        if (!ok[k]) continue;
        const int j = t + k * tpr;
        P wa, ra;
        if (w) wa = load_pack<T, kVec>(w, j);
        if (dres) ra = load_pack<T, kVec>(dres, j);
        float f[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float d = da[k].get(e);
          const float xh = (xa[k].get(e) - mean) * rstd;
          const float g = w ? __fmul_rn(d, offset_weight(wa.get(e), p.weight_offset)) : d;
          f[e] = input_grad(g, xh, rstd, c_g, c_gx);
          if (dres) f[e] = __fadd_rn(f[e], ra.get(e));
        }
        P o;
        o.set(f);
        store_pack<T, kVec>(dx, j, o);
      }
    }
    if (kBwdPrefetch<T>) {
#pragma unroll
      for (int k = 0; k < kNv; ++k) {
        xa[k] = xn[k];
        da[k] = dn[k];
      }
    }
  }

  if (!weight_grads) return;
  // This block's partial row. Column c = (t + k * tpr) * kVec + e belongs to thread t of each
  // row group; every column < cols is written (a group that got no rows holds zeros).
  float* dw_out = dw_part + static_cast<int64_t>(blockIdx.x) * p.cols;
  float* db_out = db_part + static_cast<int64_t>(blockIdx.x) * p.cols;
  if (rows_per_block == 1) {
#pragma unroll
    for (int k = 0; k < kNv; ++k) {
      const int j = t + k * tpr;
      if (j < nvec) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          dw_out[static_cast<int64_t>(j) * kVec + e] = dw[k][e];
          db_out[static_cast<int64_t>(j) * kVec + e] = db[k][e];
        }
      }
    }
    return;
  }
  // Several row groups (blockDim.x <= kRowsBlockThreads): acc_smem[group * slots + c], with
  // slots = tpr * kNv * kVec >= cols columns per group; then the groups are added per column
  // pairwise (a tree: the rounding error grows with log2 of the up to 256 groups, not with
  // their number; added one after another, 333 rows of 3 columns ran 7x torch's dweight error
  // on an H200).
  const int slots = tpr * kNv * kVec;
#pragma unroll
  for (int pass = 0; pass < 2; ++pass) {
    float* out = pass == 0 ? dw_out : db_out;
#pragma unroll
    for (int k = 0; k < kNv; ++k) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        acc_smem[group * slots + (t + k * tpr) * kVec + e] = pass == 0 ? dw[k][e] : db[k][e];
      }
    }
    __syncthreads();
    for (int groups = rows_per_block; groups > 1;) {
      const int half = (groups + 1) / 2;  // groups [half, groups) are added onto [0, groups - half)
      for (int i = threadIdx.x; i < (groups - half) * slots; i += blockDim.x) acc_smem[i] += acc_smem[i + half * slots];
      groups = half;
      __syncthreads();
    }
    for (int c = threadIdx.x; c < p.cols; c += blockDim.x) out[c] = acc_smem[c];
    __syncthreads();  // acc_smem is rewritten by the next pass
  }
}

// dx for rows too long for registers: one block per row (grid-stride), two passes (the row
// sums, then dx), the second re-reading the row from L2. The weight gradients come from
// norm_bwd_cols_kernel.
template <typename T, int kVec>
__global__ void __launch_bounds__(kLoopThreads, 1) norm_bwd_looped_kernel(const NormBackwardParams p) {
  using P = Pack<T, kVec>;
  constexpr int kLoopUnroll = loop_unroll(kVec);
  constexpr int64_t kStep = static_cast<int64_t>(kLoopThreads) * kLoopUnroll;
  __shared__ float red[2 * 2 * 32];
  const int64_t nvec = p.cols / kVec;
  const float n = static_cast<float>(p.cols);
  const T* w = static_cast<const T*>(p.weight);
  int phase = 0;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.xin) + row * p.xin_row_stride;
    const T* dy = static_cast<const T*>(p.dy) + row * p.dy_row_stride;
    const float mean = p.rms ? 0.f : static_cast<const float*>(p.mean)[row];
    const float rstd = static_cast<const float*>(p.rstd)[row];
    // Pass 1: sum(g), sum(g * xhat).
    float sums[2] = {0.f, 0.f};
    for (int64_t base = threadIdx.x; base < nvec; base += kStep) {
      P xa[kLoopUnroll], da[kLoopUnroll];
#pragma unroll
      for (int u = 0; u < kLoopUnroll; ++u) {
        const int64_t j = base + u * kLoopThreads;
        if (j < nvec) {
          xa[u] = load_pack<T, kVec>(x, j);
          da[u] = load_pack<T, kVec>(dy, j);
        }
      }
#pragma unroll
      for (int u = 0; u < kLoopUnroll; ++u) {
        const int64_t j = base + u * kLoopThreads;
        if (j < nvec) {
          P wa;
          if (w) wa = load_pack<T, kVec>(w, j);
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float xh = (xa[u].get(e) - mean) * rstd;
            const float d = da[u].get(e);
            const float g = w ? __fmul_rn(d, offset_weight(wa.get(e), p.weight_offset)) : d;
            sums[0] += g;
            sums[1] += g * xh;
          }
        }
      }
    }
    row_allreduce<2>(sums, kLoopThreads, red, phase);
    const float c_g = p.rms ? 0.f : __fdiv_rn(sums[0], n);
    const float c_gx = __fdiv_rn(sums[1], n);
    // Pass 2: dx.
    T* dx = static_cast<T*>(p.dx) + row * p.cols;
    const T* dres =
        p.dresidual_out ? static_cast<const T*>(p.dresidual_out) + row * p.dresidual_out_row_stride : nullptr;
    for (int64_t base = threadIdx.x; base < nvec; base += kStep) {
      P xa[kLoopUnroll], da[kLoopUnroll];
#pragma unroll
      for (int u = 0; u < kLoopUnroll; ++u) {
        const int64_t j = base + u * kLoopThreads;
        if (j < nvec) {
          xa[u] = load_pack<T, kVec>(x, j);
          da[u] = load_pack<T, kVec>(dy, j);
        }
      }
#pragma unroll
      for (int u = 0; u < kLoopUnroll; ++u) {
        const int64_t j = base + u * kLoopThreads;
        if (j < nvec) {
          P wa, ra;
          if (w) wa = load_pack<T, kVec>(w, j);
          if (dres) ra = load_pack<T, kVec>(dres, j);
          float f[kVec];
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float xh = (xa[u].get(e) - mean) * rstd;
            const float d = da[u].get(e);
            const float g = w ? __fmul_rn(d, offset_weight(wa.get(e), p.weight_offset)) : d;
            f[e] = input_grad(g, xh, rstd, c_g, c_gx);
            if (dres) f[e] = __fadd_rn(f[e], ra.get(e));
          }
          P o;
          o.set(f);
          store_pack<T, kVec>(dx, j, o);
        }
      }
    }
  }
}

// dweight/dbias partials for the looped backward. Block (bx, by) covers kColsVectors vectors
// of columns and the rows by * kColsRowLanes + ty + i * gridDim.y * kColsRowLanes; its sums
// go to row by of dw_part/db_part (gridDim.y, cols).
template <typename T, int kVec>
__global__ void __launch_bounds__(kColsVectors * kColsRowLanes)
    norm_bwd_cols_kernel(const NormBackwardParams p, float* dw_part, float* db_part) {
  using P = Pack<T, kVec>;
  __shared__ float sw[kColsRowLanes][kColsVectors * kVec];
  __shared__ float sb[kColsRowLanes][kColsVectors * kVec];
  const int tx = threadIdx.x % kColsVectors, ty = threadIdx.x / kColsVectors;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColsVectors + tx;
  const bool col_ok = j < p.cols / kVec;
  const float* mean_in = static_cast<const float*>(p.mean);
  const float* rstd_in = static_cast<const float*>(p.rstd);
  float dw[kVec], db[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) dw[e] = db[e] = 0.f;
  if (col_ok) {
    const int64_t stride = static_cast<int64_t>(gridDim.y) * kColsRowLanes;
#pragma unroll 4
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * kColsRowLanes + ty; r < p.rows; r += stride) {
      const P xa = load_pack<T, kVec>(static_cast<const T*>(p.xin) + r * p.xin_row_stride, j);
      const P da = load_pack<T, kVec>(static_cast<const T*>(p.dy) + r * p.dy_row_stride, j);
      const float mean = p.rms ? 0.f : mean_in[r];
      const float rstd = rstd_in[r];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float d = da.get(e);
        dw[e] += d * ((xa.get(e) - mean) * rstd);
        db[e] += d;
      }
    }
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    sw[ty][tx * kVec + e] = dw[e];
    sb[ty][tx * kVec + e] = db[e];
  }
  __syncthreads();
  if (ty == 0 && col_ok) {
    float* dw_out = dw_part + static_cast<int64_t>(blockIdx.y) * p.cols + j * kVec;
    float* db_out = db_part + static_cast<int64_t>(blockIdx.y) * p.cols + j * kVec;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      float sum_w = 0.f, sum_b = 0.f;
      for (int i = 0; i < kColsRowLanes; ++i) {
        sum_w += sw[i][tx * kVec + e];
        sum_b += sb[i][tx * kVec + e];
      }
      dw_out[e] = sum_w;
      db_out[e] = sum_b;
    }
  }
}

// dweight[c] = the sum over the partial rows of dw_part[:, c] (likewise dbias), always in the
// same order (deterministic). Block: kColSumCols columns x kColSumLanes lanes over the rows.
template <typename T>
__global__ void __launch_bounds__(kColSumCols * kColSumLanes) norm_colsum_kernel(
    const float* dw_part, const float* db_part, int64_t parts, int64_t cols, T* dweight, T* dbias) {
  using P = Pack<T, 1>;
  __shared__ float sw[kColSumLanes][kColSumCols];
  __shared__ float sb[kColSumLanes][kColSumCols];
  const int tx = threadIdx.x % kColSumCols, ty = threadIdx.x / kColSumCols;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColSumCols + tx;
  float sum_w = 0.f, sum_b = 0.f;
  if (c < cols) {
    for (int64_t i = ty; i < parts; i += kColSumLanes) {
      if (dweight) sum_w += dw_part[i * cols + c];
      if (dbias) sum_b += db_part[i * cols + c];
    }
  }
  sw[ty][tx] = sum_w;
  sb[ty][tx] = sum_b;
  __syncthreads();
  if (ty == 0 && c < cols) {
    for (int i = 1; i < kColSumLanes; ++i) {
      sum_w += sw[i][tx];
      sum_b += sb[i][tx];
    }
    P o;
    if (dweight) {
      o.set({sum_w});
      store_pack<T, 1>(dweight, c, o);
    }
    if (dbias) {
      o.set({sum_b});
      store_pack<T, 1>(dbias, c, o);
    }
  }
}

// ------------------------------------------------------------------ launch configuration

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Rows at ptr with this row stride allow kVec-element (16-byte) vector access.
inline bool vector_ok(const void* ptr, int64_t row_stride, int64_t rows, int kVec) {
  return aligned16(ptr) && (rows <= 1 || row_stride % kVec == 0);
}

struct RowsConfig {
  int nv = 0;  // vectors per thread; 0: the row does not fit in registers
  int threads_per_row = 0;
  int rows_per_block = 0;
};

// Threads per row and vectors per thread for a row of nvec vectors: the most vectors per
// thread (fewest threads: fewer barriers, more loads in flight per thread) that leaves at
// most a quarter of the slots (threads_per_row * nv >= nvec) idle; failing that, the fewest
// slots. threads_per_row: a power of two up to 16 (several rows per warp), else a multiple
// of 32; several rows share a block of kRowsBlockThreads when they are short.
template <typename MaxThreads>
RowsConfig choose_rows_config(int64_t nvec, int nv_max, MaxThreads max_threads_for_nv) {
  RowsConfig best;
  int64_t best_slots = INT64_MAX;
  for (int nv = nv_max; nv >= 1; nv /= 2) {
    const int64_t per_thread = ceil_div(nvec, nv);
    int64_t threads = 1;
    if (per_thread <= 16) {
      while (threads < per_thread) threads *= 2;
    } else {
      threads = ceil_div(per_thread, 32) * 32;
    }
    if (threads > max_threads_for_nv(nv)) continue;
    const int64_t slots = threads * nv;
    const bool good = slots * 3 <= nvec * 4;
    if (good || slots < best_slots) {
      best.nv = nv;
      best.threads_per_row = static_cast<int>(threads);
      best_slots = slots;
      if (good) break;
    }
  }
  if (best.nv > 0) best.rows_per_block = std::max(1, kRowsBlockThreads / best.threads_per_row);
  return best;
}

struct DeviceInfo {
  int sms = 0;
  int64_t l2_bytes = 0;
};

inline cudaError_t device_info(DeviceInfo* info) {
  int device = 0, l2 = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&info->sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device);
  info->l2_bytes = l2;
  return err;
}

// Resident blocks per SM of `kernel` at `threads` threads per block (the occupancy
// calculator; cached, it is called for every backward).
inline cudaError_t blocks_per_sm(const void* kernel, int threads, int* blocks) {
  struct Entry {
    const void* kernel;
    int device, threads, blocks;
  };
  static std::mutex mutex;
  static Entry cache[64];
  static int cached = 0;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    for (int i = 0; i < cached; ++i) {
      if (cache[i].kernel == kernel && cache[i].device == device && cache[i].threads == threads) {
        *blocks = cache[i].blocks;
        return cudaSuccess;
      }
    }
  }
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, threads, 0);
  if (err != cudaSuccess) return err;
  *blocks = std::max(*blocks, 1);
  const std::lock_guard<std::mutex> lock(mutex);
  if (cached < 64) cache[cached++] = Entry{kernel, device, threads, *blocks};
  return cudaSuccess;
}

// Blocks of a looped kernel (one row per block at a time, rows re-read from L2): two per SM
// when the rows in flight, footprint_bytes each, stay within half the L2, else one; and no
// more than fit (occupancy) or than there are rows.
inline cudaError_t looped_grid(const void* kernel, int64_t rows, int64_t footprint_bytes, int64_t* grid) {
  DeviceInfo dev;
  cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  int resident = 1;
  err = blocks_per_sm(kernel, kLoopThreads, &resident);
  if (err != cudaSuccess) return err;
  const int per_sm = std::min(resident, 2 * dev.sms * footprint_bytes <= dev.l2_bytes / 2 ? 2 : 1);
  *grid = std::min<int64_t>(rows, static_cast<int64_t>(per_sm) * dev.sms);
  return cudaSuccess;
}

// Calls fn(std::integral_constant<int, nv>) for the run-time nv among kNvMax, kNvMax / 2,
// ..., 1 (only those instantiations exist).
template <int kNv, typename Fn>
cudaError_t with_nv(int nv, Fn&& fn) {
  if (nv == kNv) return fn(std::integral_constant<int, kNv>{});
  if constexpr (kNv > 1) {
    return with_nv<kNv / 2>(nv, fn);
  } else {
    return cudaErrorInvalidValue;
  }
}

// ------------------------------------------------------------------ forward launcher

template <int kVec>
constexpr int fwd_nv_max() {
  return kVec == 1 ? kScalarMaxNv : kFwdMaxNv;
}

template <typename T, int kVec>
cudaError_t norm_forward_vec(const NormForwardParams& p, cudaStream_t stream) {
  const RowsConfig c = choose_rows_config(p.cols / kVec, fwd_nv_max<kVec>(), [](int) { return fwd_max_threads<kVec>(); });
  if (c.nv == 0) {
    const auto kernel = norm_fwd_looped_kernel<T, kVec>;
    // Between pass 1 and the re-reads, every block streams x (and residual, residual_out).
    const int64_t footprint = p.cols * static_cast<int64_t>(sizeof(T)) * (p.residual ? 3 : 1);
    int64_t grid = 0;
    cudaError_t err = looped_grid(reinterpret_cast<const void*>(kernel), p.rows, footprint, &grid);
    if (err != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(grid), kLoopThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  const int64_t grid = std::min<int64_t>(ceil_div(p.rows, c.rows_per_block), INT32_MAX);
  const int block = c.rows_per_block * c.threads_per_row;
  return with_nv<fwd_nv_max<kVec>()>(c.nv, [&](auto nv) {
    norm_fwd_rows_kernel<T, kVec, decltype(nv)::value>
        <<<static_cast<unsigned>(grid), block, 0, stream>>>(p, c.threads_per_row);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t norm_forward_impl(const NormForwardParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = p.cols % kVec == 0 && vector_ok(p.x, p.x_row_stride, p.rows, kVec) &&
      (!p.residual || vector_ok(p.residual, p.residual_row_stride, p.rows, kVec)) && aligned16(p.weight) &&
      aligned16(p.bias) && aligned16(p.y) && aligned16(p.residual_out);
  return vec ? norm_forward_vec<T, kVec>(p, stream) : norm_forward_vec<T, 1>(p, stream);
}

// ------------------------------------------------------------------ backward launchers

template <int kVec>
constexpr int bwd_nv_max() {
  return kVec == 1 ? kScalarMaxNv : kBwdMaxElems / kVec;
}

template <typename T, int kVec>
cudaError_t norm_backward_plan_vec(const NormBackwardParams& p, bool weight_grads, NormBackwardPlan* plan) {
  DeviceInfo dev;
  cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  const int64_t nvec = p.cols / kVec;
  const RowsConfig c = choose_rows_config(nvec, bwd_nv_max<kVec>(), [](int) { return kBwdMaxThreads; });
  plan->weight_grads = weight_grads;
  plan->vec = kVec;
  if (c.nv > 0) {
    plan->looped = false;
    plan->vectors_per_thread = c.nv;
    plan->threads_per_row = c.threads_per_row;
    plan->rows_per_block = c.rows_per_block;
    const int block = c.rows_per_block * c.threads_per_row;
    int per_sm = 1;
    err = with_nv<bwd_nv_max<kVec>()>(c.nv, [&](auto nv) {
      return blocks_per_sm(
          reinterpret_cast<const void*>(norm_bwd_rows_kernel<T, kVec, decltype(nv)::value>), block, &per_sm);
    });
    if (err != cudaSuccess) return err;
    // Persistent: one wave, and every block gets at least one block of rows.
    plan->grid = std::min<int64_t>(ceil_div(p.rows, c.rows_per_block), static_cast<int64_t>(per_sm) * dev.sms);
    plan->partial_rows = weight_grads ? plan->grid : 0;
  } else {
    plan->looped = true;
    err = looped_grid(reinterpret_cast<const void*>(norm_bwd_looped_kernel<T, kVec>), p.rows,
                      2 * p.cols * static_cast<int64_t>(sizeof(T)), &plan->grid);
    if (err != cudaSuccess) return err;
    plan->col_blocks = ceil_div(nvec, kColsVectors);
    // About 4 blocks of 256 threads per SM, each with at least kColsRowLanes rows.
    const int64_t splits = std::min<int64_t>(
        {std::max<int64_t>(1, ceil_div(4 * static_cast<int64_t>(dev.sms), plan->col_blocks)),
         ceil_div(p.rows, kColsRowLanes), 65535});
    plan->partial_rows = weight_grads ? splits : 0;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t norm_backward_plan_impl(const NormBackwardParams& p, bool weight_grads, NormBackwardPlan* plan) {
  constexpr int kVec = 16 / sizeof(T);
  *plan = NormBackwardPlan{};
  const bool vec = p.cols % kVec == 0 && vector_ok(p.dy, p.dy_row_stride, p.rows, kVec) &&
      (!p.dresidual_out || vector_ok(p.dresidual_out, p.dresidual_out_row_stride, p.rows, kVec)) &&
      vector_ok(p.xin, p.xin_row_stride, p.rows, kVec) && aligned16(p.weight) && aligned16(p.dx);
  return vec ? norm_backward_plan_vec<T, kVec>(p, weight_grads, plan)
             : norm_backward_plan_vec<T, 1>(p, weight_grads, plan);
}

template <typename T, int kVec>
cudaError_t norm_backward_vec(
    const NormBackwardPlan& plan, const NormBackwardParams& p, float* partials, T* dweight, T* dbias,
    cudaStream_t stream) {
  float* dw_part = plan.weight_grads ? partials : nullptr;
  float* db_part = plan.weight_grads ? partials + plan.partial_rows * p.cols : nullptr;
  cudaError_t err = cudaSuccess;
  if (!plan.looped) {
    const int block = plan.rows_per_block * plan.threads_per_row;
    err = with_nv<bwd_nv_max<kVec>()>(plan.vectors_per_thread, [&](auto nv) {
      norm_bwd_rows_kernel<T, kVec, decltype(nv)::value>
          <<<static_cast<unsigned>(plan.grid), block, 0, stream>>>(p, dw_part, db_part, plan.threads_per_row);
      return cudaGetLastError();
    });
  } else {
    norm_bwd_looped_kernel<T, kVec><<<static_cast<unsigned>(plan.grid), kLoopThreads, 0, stream>>>(p);
    err = cudaGetLastError();
    if (err == cudaSuccess && plan.weight_grads) {
      const dim3 grid(static_cast<unsigned>(plan.col_blocks), static_cast<unsigned>(plan.partial_rows));
      norm_bwd_cols_kernel<T, kVec><<<grid, kColsVectors * kColsRowLanes, 0, stream>>>(p, dw_part, db_part);
      err = cudaGetLastError();
    }
  }
  if (err != cudaSuccess || !plan.weight_grads) return err;
  const auto blocks = static_cast<unsigned>(ceil_div(p.cols, kColSumCols));
  norm_colsum_kernel<T>
      <<<blocks, kColSumCols * kColSumLanes, 0, stream>>>(dw_part, db_part, plan.partial_rows, p.cols, dweight, dbias);
  return cudaGetLastError();
}

template <typename T>
cudaError_t norm_backward_impl(
    const NormBackwardPlan& plan, const NormBackwardParams& p, float* partials, void* dweight, void* dbias,
    cudaStream_t stream) {
  T* dw = static_cast<T*>(dweight);
  T* db = static_cast<T*>(dbias);
  if (plan.vec == 1) return norm_backward_vec<T, 1>(plan, p, partials, dw, db, stream);
  return norm_backward_vec<T, 16 / sizeof(T)>(plan, p, partials, dw, db, stream);
}

}  // namespace
}  // namespace fastarch::cuda
