// CUDA kernels of group_norm (with the fused scale/shift and SiLU), forward and backward, and
// their launchers. Included once per dtype and direction by the generated
// group_norm_{fwd,bwd}_{f32,f16,bf16}.cu, which instantiate only what they use. No torch headers:
// the kernels take the raw-pointer structs of group_norms/group_norm_params.h.
//
// x is (N, C, S) or, channels-last, (N, S, C). Group g of sample n is split over gridDim.y
// blocks, block (n G + g, k) owning positions [k s_per, (k + 1) s_per) of the group's Cg
// channels (group_norm_plan in group_norm_launch.h): at batch 1 with 32 groups a block per
// group would leave most of an H100/H200 idle. The block's threads form tr rows of tc, tc
// along the contiguous axis, each access moving `vec` elements (16 bytes where the runs and
// pointers allow). Every kernel walks the slice as "channel slots" x "position steps":
//   NCHW:          a slot is one channel (a row of threads), a step a vector of positions;
//   channels-last: a slot is a vector of channels (a column of threads), a step a position;
// so that per-channel sums in the backward are sums over the threads of a slot. The forward's
// NCHW kernels instead walk the slice's (channel, vector) pairs flat (Slice::items).
//
// Forward: (1) each block's slice statistics (count, mean, M2: a vector's own two-pass mean
// and M2, merged by Chan's formula, robust where mean >> std) into a workspace; (2) every
// block merges its group's partials (the same fixed order in each, so the same bits), and
// writes y = (x - mean) * mul_c + add_c with mul_c = rstd w_c (1 + scale_nc) and
// add_c = b_c (1 + scale_nc) + shift_nc, then SiLU: one pass, rounded once. The second read of
// x comes from L2 when the tensor fits there (a diffusion UNet's activations at batch 1 do).
// Backward: (1) per block the sums of dxhat and dxhat xhat (for dx) and the per-channel
// partials of dshift, dscale, dbias, dweight; (2) dx; (3) the per-channel partials summed over
// samples and blocks in a fixed order. No atomics: the same bits on every run.
// Statistics and accumulation in fp32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "group_norm_launch.h"
#include "group_norms/group_norm_params.h"

namespace fastarch::cuda::gn {
namespace {

constexpr int kThreads = kGroupNormThreads;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Vectors in flight per thread: the forward keeps 4 (64 bytes), the backward 2 of x and 2 of
// dy (its per-channel accumulators take the registers the forward spends on depth).
constexpr int kFwdUnroll = 4;
constexpr int kBwdUnroll = 2;
constexpr int kWeightGradThreads = 256;

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
__device__ __forceinline__ void load_vec(const T* p, float (&out)[kVec]) {
  const Vec<T, kVec> v = *reinterpret_cast<const Vec<T, kVec>*>(p);
#pragma unroll
  for (int e = 0; e < kVec; ++e) out[e] = to_float(v.v[e]);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[kVec]) {
  Vec<T, kVec> v;
#pragma unroll
  for (int e = 0; e < kVec; ++e) v.v[e] = from_float<T>(in[e]);
  *reinterpret_cast<Vec<T, kVec>*>(p) = v;
}

// ------------------------------------------------------------------ math

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

// Count, mean and M2 (sum of squared deviations) of some elements.
struct Stats {
  float n, mean, m2;
};

// Chan et al.'s merge of two disjoint sets' statistics.
__device__ __forceinline__ Stats merge(const Stats& a, const Stats& b) {
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  const float n = a.n + b.n;
  const float r = b.n / n;
  const float delta = b.mean - a.mean;
  return {n, a.mean + delta * r, a.m2 + b.m2 + delta * delta * (a.n * r)};
}

// ------------------------------------------------------------------ block reductions

// The block's sums of kN values, the same bits in every thread: a shuffle tree per warp, then
// every thread adds the warps' sums in warp order. stage: kN * kWarps floats of shared memory.
// Called by every thread of the block.
template <int kN>
__device__ __forceinline__ void block_sum(float (&v)[kN], float* stage) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
    for (int i = 0; i < kN; ++i) v[i] += __shfl_down_sync(kFullMask, v[i], offset);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kN; ++i) stage[i * kWarps + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += stage[i * kWarps + w];
    v[i] = total;
  }
  __syncthreads();  // stage may be reused
}

// The block's merged statistics, the same bits in every thread (as block_sum).
__device__ __forceinline__ Stats block_stats(Stats s, Stats* stage) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Stats other{__shfl_down_sync(kFullMask, s.n, offset), __shfl_down_sync(kFullMask, s.mean, offset),
                      __shfl_down_sync(kFullMask, s.m2, offset)};
    s = merge(s, other);  // lane 0's tree reads only lanes that hold real partials
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) stage[warp] = s;
  __syncthreads();
  Stats total{0.f, 0.f, 0.f};
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total = merge(total, stage[w]);
  __syncthreads();
  return total;
}

// ------------------------------------------------------------------ a block's slice

template <int kVec, bool kChannelsLast>
struct Slice {
  int64_t n, g, cg, C, S, s0;
  int64_t base;       // offset of element (n, channel g cg, position 0)
  int64_t slots;      // NCHW: the group's channels; channels-last: its vectors of channels
  int64_t positions;  // NCHW: vectors of positions in the slice; channels-last: positions
  int slot_first, slot_step, pos_first, pos_step;
  int r, t;  // this thread's row and column in the block's tr x tc grid

  __device__ __forceinline__ Slice(int64_t channels, int64_t spatial, int64_t groups, const GroupNormPlan& plan)
      : C(channels), S(spatial) {
    n = blockIdx.x / groups;
    g = blockIdx.x % groups;
    cg = C / groups;
    s0 = int64_t{blockIdx.y} * plan.s_per;
    const int64_t s_len = (S < s0 + plan.s_per ? S : s0 + plan.s_per) - s0;
    base = n * C * S + (kChannelsLast ? g * cg : g * cg * S);
    r = threadIdx.x / plan.tc;
    t = threadIdx.x % plan.tc;
    if constexpr (kChannelsLast) {
      slots = cg / kVec;
      positions = s_len;
      slot_first = t, slot_step = plan.tc, pos_first = r, pos_step = plan.tr;
    } else {
      slots = cg;
      positions = s_len / kVec;  // the plan makes S and s_per multiples of kVec
      slot_first = r, slot_step = plan.tr, pos_first = t, pos_step = plan.tc;
    }
  }

  __device__ __forceinline__ int64_t offset(int64_t slot, int64_t pos) const {
    if constexpr (kChannelsLast) return base + (s0 + pos) * C + slot * kVec;
    return base + slot * S + s0 + pos * kVec;
  }

  // The channel (0 ... C) of element e of a slot's vectors.
  __device__ __forceinline__ int64_t channel(int64_t slot, int e) const {
    if constexpr (kChannelsLast) return g * cg + slot * kVec + e;
    return g * cg + slot;
  }

  // Slot rounds that every thread of the block runs (when a round has a barrier).
  __device__ __forceinline__ int64_t slot_rounds() const { return (slots + slot_step - 1) / slot_step; }

  // The forward's NCHW walk: the slice's (channel, vector) pairs as one flat sequence over all
  // the block's threads, so that none idles when the group's channel count is not a multiple
  // of the block's rows (a UNet's 10, 20 or 40 channels per group). Item i is slot
  // i / positions; the division in 32 bits when the items allow (they always do below 2^32).
  __device__ __forceinline__ int64_t items() const { return slots * positions; }
  __device__ __forceinline__ int64_t item_slot(int64_t i) const {
    if (slots * positions <= int64_t{UINT32_MAX}) {
      return static_cast<uint32_t>(i) / static_cast<uint32_t>(positions);
    }
    return i / positions;
  }
};

// Per-element index of a slot's per-channel values: NCHW slots have one channel.
template <bool kChannelsLast>
__device__ __forceinline__ constexpr int lane_of(int e) {
  return kChannelsLast ? e : 0;
}

// weight, bias, 1 + scale, shift of a slot's channels (1, 0, 1, 0 where absent); NCHW slots
// fill element 0 only.
template <int kVec>
struct Affine {
  float w[kVec], b[kVec], a[kVec], t[kVec];
};

template <typename T, int kVec, bool kChannelsLast>
__device__ __forceinline__ Affine<kVec> affine_of(const Slice<kVec, kChannelsLast>& s, int64_t slot, const void* weight,
                                                  const void* bias, const void* scale, const void* shift) {
  Affine<kVec> f;
  constexpr int kLanes = kChannelsLast ? kVec : 1;
#pragma unroll
  for (int e = 0; e < kLanes; ++e) {
    const int64_t c = s.channel(slot, e);
    const int64_t nc = s.n * s.C + c;
    f.w[e] = weight ? to_float(static_cast<const T*>(weight)[c]) : 1.f;
    f.b[e] = bias ? to_float(static_cast<const T*>(bias)[c]) : 0.f;
    f.a[e] = 1.f + (scale ? to_float(static_cast<const T*>(scale)[nc]) : 0.f);
    f.t[e] = shift ? to_float(static_cast<const T*>(shift)[nc]) : 0.f;
  }
  return f;
}

// ------------------------------------------------------------------ forward

// A vector's own mean and M2 (two passes over registers), merged into st.
template <int kVec>
__device__ __forceinline__ void accumulate(Stats& st, const float (&v)[kVec]) {
  float sum = 0.f;
#pragma unroll
  for (int e = 0; e < kVec; ++e) sum += v[e];
  const float mean = sum / kVec;
  float m2 = 0.f;
#pragma unroll
  for (int e = 0; e < kVec; ++e) m2 += (v[e] - mean) * (v[e] - mean);
  st = merge(st, Stats{static_cast<float>(kVec), mean, m2});
}

template <typename T, int kVec, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads) group_norm_stats_kernel(GroupNormForwardParams p, GroupNormPlan plan,
                                                                     float* partials) {
  const Slice<kVec, kChannelsLast> s(p.channels, p.spatial, p.groups, plan);
  const T* x = static_cast<const T*>(p.x);
  Stats st{0.f, 0.f, 0.f};
  if constexpr (!kChannelsLast) {
    const int64_t items = s.items();
    for (int64_t i = threadIdx.x; i < items; i += int64_t{kThreads} * kFwdUnroll) {
      float v[kFwdUnroll][kVec];
#pragma unroll
      for (int u = 0; u < kFwdUnroll; ++u) {
        const int64_t q = i + int64_t{u} * kThreads;
        if (q < items) {
          const int64_t slot = s.item_slot(q);
          load_vec<T, kVec>(x + s.offset(slot, q - slot * s.positions), v[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kFwdUnroll; ++u) {
        if (i + int64_t{u} * kThreads < items) accumulate<kVec>(st, v[u]);
      }
    }
  } else {
    for (int64_t slot = s.slot_first; slot < s.slots; slot += s.slot_step) {
      for (int64_t pos = s.pos_first; pos < s.positions; pos += int64_t{s.pos_step} * kFwdUnroll) {
        float v[kFwdUnroll][kVec];
#pragma unroll
        for (int u = 0; u < kFwdUnroll; ++u) {
          const int64_t q = pos + int64_t{u} * s.pos_step;
          if (q < s.positions) load_vec<T, kVec>(x + s.offset(slot, q), v[u]);
        }
#pragma unroll
        for (int u = 0; u < kFwdUnroll; ++u) {
          if (pos + int64_t{u} * s.pos_step < s.positions) accumulate<kVec>(st, v[u]);
        }
      }
    }
  }
  __shared__ Stats stage[kWarps];
  st = block_stats(st, stage);
  if (threadIdx.x == 0) {
    float* out = partials + (int64_t{blockIdx.x} * gridDim.y + blockIdx.y) * 2;
    out[0] = st.mean;
    out[1] = st.m2;
  }
}

template <typename T, int kVec, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads) group_norm_apply_kernel(GroupNormForwardParams p, GroupNormPlan plan,
                                                                     const float* partials) {
  const Slice<kVec, kChannelsLast> s(p.channels, p.spatial, p.groups, plan);
  // The group's statistics from its gridDim.y partials (slice k holds cg positions' worth of
  // its s_per positions, fewer in the last).
  Stats st{0.f, 0.f, 0.f};
  for (int64_t k = threadIdx.x; k < gridDim.y; k += kThreads) {
    const int64_t end = (k + 1) * plan.s_per < p.spatial ? (k + 1) * plan.s_per : p.spatial;
    const float* part = partials + (int64_t{blockIdx.x} * gridDim.y + k) * 2;
    st = merge(st, Stats{static_cast<float>(s.cg * (end - k * plan.s_per)), part[0], part[1]});
  }
  __shared__ Stats stage[kWarps];
  st = block_stats(st, stage);
  const float mean = st.mean;
  const float var = st.m2 / static_cast<float>(s.cg * p.spatial);
  float rstd = 1.f / sqrtf(var + static_cast<float>(p.eps));
  // A group whose mean square overflows fp32 has no statistics: NaN, as the reference (var =
  // inf would give rstd = 0 and y = bias, silently wrong). Also false for a NaN mean.
  if (!(mean * mean + var <= FLT_MAX)) rstd = __int_as_float(0x7fc00000);
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    static_cast<float*>(p.mean)[blockIdx.x] = mean;
    static_cast<float*>(p.rstd)[blockIdx.x] = rstd;
  }

  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  if constexpr (!kChannelsLast) {
    const int64_t items = s.items();
    for (int64_t i = threadIdx.x; i < items; i += int64_t{kThreads} * kFwdUnroll) {
      float v[kFwdUnroll][kVec];
      int64_t slots[kFwdUnroll], offsets[kFwdUnroll];
#pragma unroll
      for (int u = 0; u < kFwdUnroll; ++u) {
        const int64_t q = i + int64_t{u} * kThreads;
        if (q < items) {
          slots[u] = s.item_slot(q);
          offsets[u] = s.offset(slots[u], q - slots[u] * s.positions);
          load_vec<T, kVec>(x + offsets[u], v[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kFwdUnroll; ++u) {
        if (i + int64_t{u} * kThreads >= items) continue;
        // The channel's parameters: a few bytes, from L1 (every vector of a run shares them).
        const Affine<kVec> f = affine_of<T, kVec, kChannelsLast>(s, slots[u], p.weight, p.bias, p.scale, p.shift);
        const float mul = rstd * f.w[0] * f.a[0];
        const float add = f.b[0] * f.a[0] + f.t[0];
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float z = (v[u][e] - mean) * mul + add;
          v[u][e] = p.silu ? z * sigmoid(z).s : z;
        }
        store_vec<T, kVec>(y + offsets[u], v[u]);
      }
    }
  } else {
    for (int64_t slot = s.slot_first; slot < s.slots; slot += s.slot_step) {
      const Affine<kVec> f = affine_of<T, kVec, kChannelsLast>(s, slot, p.weight, p.bias, p.scale, p.shift);
      float mul[kVec], add[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        mul[e] = rstd * f.w[e] * f.a[e];
        add[e] = f.b[e] * f.a[e] + f.t[e];
      }
      for (int64_t pos = s.pos_first; pos < s.positions; pos += int64_t{s.pos_step} * kFwdUnroll) {
        float v[kFwdUnroll][kVec];
#pragma unroll
        for (int u = 0; u < kFwdUnroll; ++u) {
          const int64_t q = pos + int64_t{u} * s.pos_step;
          if (q < s.positions) load_vec<T, kVec>(x + s.offset(slot, q), v[u]);
        }
#pragma unroll
        for (int u = 0; u < kFwdUnroll; ++u) {
          const int64_t q = pos + int64_t{u} * s.pos_step;
          if (q >= s.positions) continue;
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float z = (v[u][e] - mean) * mul[e] + add[e];
            v[u][e] = p.silu ? z * sigmoid(z).s : z;
          }
          store_vec<T, kVec>(y + s.offset(slot, q), v[u]);
        }
      }
    }
  }
}

// ------------------------------------------------------------------ backward

// One element's backward: xhat, u = xhat w + b, dz = dy silu'(z) (or dy), du = dz (1 + scale).
struct ElementGrad {
  float xhat, u, dz, du;
};

__device__ __forceinline__ ElementGrad element_grad(float x, float dy, float mean, float rstd, float w, float b,
                                                    float a, float t, bool silu) {
  ElementGrad g;
  g.xhat = (x - mean) * rstd;
  g.u = g.xhat * w + b;
  g.dz = dy;
  if (silu) {
    const float z = g.u * a + t;
    const Sigmoid sg = sigmoid(z);
    g.dz = dy * (sg.s + z * sg.s * sg.one_minus_s);
  }
  g.du = g.dz * a;
  return g;
}

// Sums acc (4 quantities x the slot's channels) over the threads that share the slot and
// writes them at out[q * plane + channel]. NCHW: the slot's threads are the tc threads of one
// row (contiguous lanes); channels-last: the tr threads of one column. Called by every thread.
template <int kVec, bool kChannelsLast>
__device__ __forceinline__ void store_channel_partials(float (&acc)[4][kVec], const Slice<kVec, kChannelsLast>& s,
                                                       int64_t slot, bool valid, const GroupNormPlan& plan,
                                                       float* stage, float* out, int64_t plane) {
  if constexpr (!kChannelsLast) {
    float v[4] = {acc[0][0], acc[1][0], acc[2][0], acc[3][0]};
    const int width = plan.tc < 32 ? plan.tc : 32;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      if (offset < width) {
#pragma unroll
        for (int q = 0; q < 4; ++q) v[q] += __shfl_xor_sync(kFullMask, v[q], offset);
      }
    }
    if (plan.tc > 32) {  // the row spans tc / 32 warps: their sums meet in shared memory
      const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
      if (lane == 0) {
#pragma unroll
        for (int q = 0; q < 4; ++q) stage[q * kWarps + warp] = v[q];
      }
      __syncthreads();
      const int warps_per_row = plan.tc / 32;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float total = 0.f;
        for (int w = 0; w < warps_per_row; ++w) total += stage[q * kWarps + s.r * warps_per_row + w];
        v[q] = total;
      }
      __syncthreads();
    }
    if (valid && s.t == 0) {
      const int64_t c = s.channel(slot, 0);
#pragma unroll
      for (int q = 0; q < 4; ++q) out[q * plane + c] = v[q];
    }
  } else {
    // stage: kThreads * kVec floats; one quantity at a time, summed over the rows in order.
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) stage[e * kThreads + threadIdx.x] = acc[q][e];
      __syncthreads();
      if (valid && s.r == 0) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          float total = 0.f;
          for (int row = 0; row < plan.tr; ++row) total += stage[e * kThreads + row * plan.tc + s.t];
          out[q * plane + s.channel(slot, e)] = total;
        }
      }
      __syncthreads();
    }
  }
}

// gpart: (N G, split, 2) sums of dxhat and dxhat xhat; cpart: (4, N, split, C) per-channel
// partials of dshift, dscale, dbias, dweight, or null when no such gradient is wanted.
// Two blocks per SM at least: unbounded, the channels-last 16-byte instance takes 156 registers
// (its 4 x 8 per-channel accumulators), one block per SM; bounded, 128 and a 12-byte spill
// (ptxas, sm_90; not measured on a GPU yet).
template <typename T, int kVec, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads, 2) group_norm_bwd_partials_kernel(GroupNormBackwardParams p,
                                                                            GroupNormPlan plan, float* gpart,
                                                                            float* cpart) {
  const Slice<kVec, kChannelsLast> s(p.channels, p.spatial, p.groups, plan);
  const float mean = static_cast<const float*>(p.mean)[blockIdx.x];
  const float rstd = static_cast<const float*>(p.rstd)[blockIdx.x];
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  __shared__ float stage[kThreads * kVec];
  const int64_t plane = p.batch * gridDim.y * p.channels;
  float* part_row = cpart ? cpart + (s.n * gridDim.y + blockIdx.y) * p.channels : nullptr;
  float sums[2] = {0.f, 0.f};  // dxhat, dxhat xhat
  const int64_t rounds = s.slot_rounds();
  for (int64_t i = 0; i < rounds; ++i) {
    const int64_t slot = s.slot_first + i * s.slot_step;
    const bool valid = slot < s.slots;
    float acc[4][kVec];  // dz, dz u, du, du xhat per channel of the slot
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[q][e] = 0.f;
    }
    if (valid) {
      const Affine<kVec> f = affine_of<T, kVec, kChannelsLast>(s, slot, p.weight, p.bias, p.scale, p.shift);
      for (int64_t pos = s.pos_first; pos < s.positions; pos += int64_t{s.pos_step} * kBwdUnroll) {
        float xv[kBwdUnroll][kVec], dyv[kBwdUnroll][kVec];
#pragma unroll
        for (int u = 0; u < kBwdUnroll; ++u) {
          const int64_t q = pos + int64_t{u} * s.pos_step;
          if (q < s.positions) {
            load_vec<T, kVec>(x + s.offset(slot, q), xv[u]);
            load_vec<T, kVec>(dy + s.offset(slot, q), dyv[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < kBwdUnroll; ++u) {
          if (pos + int64_t{u} * s.pos_step >= s.positions) continue;
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const int l = lane_of<kChannelsLast>(e);
            const ElementGrad g = element_grad(xv[u][e], dyv[u][e], mean, rstd, f.w[l], f.b[l], f.a[l], f.t[l], p.silu);
            acc[0][l] += g.dz;
            acc[1][l] += g.dz * g.u;
            acc[2][l] += g.du;
            acc[3][l] += g.du * g.xhat;
            const float dxhat = g.du * f.w[l];
            sums[0] += dxhat;
            sums[1] += dxhat * g.xhat;
          }
        }
      }
    }
    if (part_row) store_channel_partials<kVec, kChannelsLast>(acc, s, slot, valid, plan, stage, part_row, plane);
  }
  block_sum<2>(sums, stage);
  if (threadIdx.x == 0) {
    float* out = gpart + (int64_t{blockIdx.x} * gridDim.y + blockIdx.y) * 2;
    out[0] = sums[0];
    out[1] = sums[1];
  }
}

template <typename T, int kVec, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads) group_norm_bwd_dx_kernel(GroupNormBackwardParams p, GroupNormPlan plan,
                                                                      const float* gpart) {
  const Slice<kVec, kChannelsLast> s(p.channels, p.spatial, p.groups, plan);
  const float mean = static_cast<const float*>(p.mean)[blockIdx.x];
  const float rstd = static_cast<const float*>(p.rstd)[blockIdx.x];
  float sums[2] = {0.f, 0.f};
  for (int64_t k = threadIdx.x; k < gridDim.y; k += kThreads) {
    const float* part = gpart + (int64_t{blockIdx.x} * gridDim.y + k) * 2;
    sums[0] += part[0];
    sums[1] += part[1];
  }
  __shared__ float stage[2 * kWarps];
  block_sum<2>(sums, stage);
  const float total = static_cast<float>(s.cg * p.spatial);
  const float mean_dxhat = sums[0] / total;
  const float mean_dxhat_xhat = sums[1] / total;

  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  // dx of one vector, written over xv.
  const auto dx_of = [&](float(&xv)[kVec], const float(&dyv)[kVec], const Affine<kVec>& f) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int l = lane_of<kChannelsLast>(e);
      const ElementGrad g = element_grad(xv[e], dyv[e], mean, rstd, f.w[l], f.b[l], f.a[l], f.t[l], p.silu);
      const float dxhat = g.du * f.w[l];  // as in the partials: a lone element's dx is exactly 0
      xv[e] = rstd * (dxhat - mean_dxhat - g.xhat * mean_dxhat_xhat);
    }
  };
  if constexpr (!kChannelsLast) {  // the flat walk of the forward's NCHW kernels
    const int64_t items = s.items();
    for (int64_t i = threadIdx.x; i < items; i += int64_t{kThreads} * kBwdUnroll) {
      float xv[kBwdUnroll][kVec], dyv[kBwdUnroll][kVec];
      int64_t slots[kBwdUnroll], offsets[kBwdUnroll];
#pragma unroll
      for (int u = 0; u < kBwdUnroll; ++u) {
        const int64_t q = i + int64_t{u} * kThreads;
        if (q < items) {
          slots[u] = s.item_slot(q);
          offsets[u] = s.offset(slots[u], q - slots[u] * s.positions);
          load_vec<T, kVec>(x + offsets[u], xv[u]);
          load_vec<T, kVec>(dy + offsets[u], dyv[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kBwdUnroll; ++u) {
        if (i + int64_t{u} * kThreads >= items) continue;
        dx_of(xv[u], dyv[u], affine_of<T, kVec, kChannelsLast>(s, slots[u], p.weight, p.bias, p.scale, p.shift));
        store_vec<T, kVec>(dx + offsets[u], xv[u]);
      }
    }
  } else {
    for (int64_t slot = s.slot_first; slot < s.slots; slot += s.slot_step) {
      const Affine<kVec> f = affine_of<T, kVec, kChannelsLast>(s, slot, p.weight, p.bias, p.scale, p.shift);
      for (int64_t pos = s.pos_first; pos < s.positions; pos += int64_t{s.pos_step} * kBwdUnroll) {
        float xv[kBwdUnroll][kVec], dyv[kBwdUnroll][kVec];
#pragma unroll
        for (int u = 0; u < kBwdUnroll; ++u) {
          const int64_t q = pos + int64_t{u} * s.pos_step;
          if (q < s.positions) {
            load_vec<T, kVec>(x + s.offset(slot, q), xv[u]);
            load_vec<T, kVec>(dy + s.offset(slot, q), dyv[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < kBwdUnroll; ++u) {
          const int64_t q = pos + int64_t{u} * s.pos_step;
          if (q >= s.positions) continue;
          dx_of(xv[u], dyv[u], f);
          store_vec<T, kVec>(dx + s.offset(slot, q), xv[u]);
        }
      }
    }
  }
}

// dshift, dscale (N, C): the partials summed over the split; dbias, dweight (C,): over samples
// and split. Fixed order, fp32, rounded once.
template <typename T>
__global__ void __launch_bounds__(kWeightGradThreads) group_norm_weight_grads_kernel(GroupNormBackwardParams p,
                                                                                     int64_t split,
                                                                                     const float* cpart) {
  const int64_t i = int64_t{blockIdx.x} * kWeightGradThreads + threadIdx.x;
  const int64_t C = p.channels, plane = p.batch * split * C;
  if (i < p.batch * C) {
    const int64_t n = i / C, c = i % C;
    void* outs[2] = {p.dshift, p.dscale};
    for (int q = 0; q < 2; ++q) {
      if (!outs[q]) continue;
      float total = 0.f;
      for (int64_t k = 0; k < split; ++k) total += cpart[q * plane + (n * split + k) * C + c];
      static_cast<T*>(outs[q])[i] = from_float<T>(total);
    }
  }
  if (i < C) {
    void* outs[2] = {p.dbias, p.dweight};
    for (int q = 0; q < 2; ++q) {
      if (!outs[q]) continue;
      float total = 0.f;
      for (int64_t row = 0; row < p.batch * split; ++row) total += cpart[(2 + q) * plane + row * C + i];
      static_cast<T*>(outs[q])[i] = from_float<T>(total);
    }
  }
}

// ------------------------------------------------------------------ launchers

dim3 group_grid(int64_t batch, int64_t groups, const GroupNormPlan& plan) {
  return dim3(static_cast<unsigned>(batch * groups), static_cast<unsigned>(plan.split));
}

template <typename T, int kVec, bool kChannelsLast>
cudaError_t forward_launch(const GroupNormForwardParams& p, const GroupNormPlan& plan, float* workspace,
                           cudaStream_t stream) {
  const dim3 grid = group_grid(p.batch, p.groups, plan);
  group_norm_stats_kernel<T, kVec, kChannelsLast><<<grid, kThreads, 0, stream>>>(p, plan, workspace);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  group_norm_apply_kernel<T, kVec, kChannelsLast><<<grid, kThreads, 0, stream>>>(p, plan, workspace);
  return cudaGetLastError();
}

template <typename T, int kVec, bool kChannelsLast>
cudaError_t backward_launch(const GroupNormBackwardParams& p, const GroupNormPlan& plan, float* workspace,
                            cudaStream_t stream) {
  const dim3 grid = group_grid(p.batch, p.groups, plan);
  const bool weight_grads = p.dweight || p.dbias || p.dscale || p.dshift;
  float* gpart = workspace;
  float* cpart = weight_grads ? workspace + p.batch * p.groups * plan.split * 2 : nullptr;
  group_norm_bwd_partials_kernel<T, kVec, kChannelsLast><<<grid, kThreads, 0, stream>>>(p, plan, gpart, cpart);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  group_norm_bwd_dx_kernel<T, kVec, kChannelsLast><<<grid, kThreads, 0, stream>>>(p, plan, gpart);
  err = cudaGetLastError();
  if (err != cudaSuccess || !weight_grads) return err;
  const int64_t blocks = (p.batch * p.channels + kWeightGradThreads - 1) / kWeightGradThreads;
  group_norm_weight_grads_kernel<T>
      <<<static_cast<unsigned>(blocks), kWeightGradThreads, 0, stream>>>(p, plan.split, cpart);
  return cudaGetLastError();
}

// plan.vec -> the kernels of that vector width (16 bytes at most).
template <typename T, bool kChannelsLast, typename Params>
cudaError_t launch_vec(const Params& p, const GroupNormPlan& plan, float* workspace, cudaStream_t stream) {
  constexpr bool kForward = std::is_same_v<Params, GroupNormForwardParams>;
  const auto run = [&](auto vec) -> cudaError_t {
    constexpr int kVec = decltype(vec)::value;
    if constexpr (kForward) {
      return forward_launch<T, kVec, kChannelsLast>(p, plan, workspace, stream);
    } else {
      return backward_launch<T, kVec, kChannelsLast>(p, plan, workspace, stream);
    }
  };
  switch (plan.vec) {
    case 1:
      return run(std::integral_constant<int, 1>{});
    case 2:
      return run(std::integral_constant<int, 2>{});
    case 4:
      return run(std::integral_constant<int, 4>{});
    case 8:
      if constexpr (sizeof(T) == 2) return run(std::integral_constant<int, 8>{});
      break;
  }
  return cudaErrorInvalidValue;
}

template <typename T, typename Params>
cudaError_t group_norm_launch(const Params& p, const GroupNormPlan& plan, float* workspace, cudaStream_t stream) {
  return p.channels_last ? launch_vec<T, true>(p, plan, workspace, stream)
                         : launch_vec<T, false>(p, plan, workspace, stream);
}

}  // namespace
}  // namespace fastarch::cuda::gn
