// Arguments of the group norm kernels, shared by the CPU and CUDA backends. Plain pointers, so
// the kernel translation units need no torch headers.
//
// x is (N, C, S) when channels_last is false and (N, S, C) when true, contiguous (S: the product
// of the spatial dims). Group g of sample n holds channels [g C/G, (g + 1) C/G) at every s.
//   xhat = (x - mean_ng) rstd_ng,  u = xhat weight_c + bias_c,  z = u (1 + scale_nc) + shift_nc,
//   y = silu(z) if silu else z.
// Statistics in fp32 (fp64 for fp64 x); semantics: fastarch/ops/group_norms/reference.py.
#pragma once
#include <cstdint>

namespace fastarch {

struct GroupNormForwardParams {
  const void* x;
  const void* weight;  // (C,) in x's dtype, or null (ones)
  const void* bias;    // (C,), or null (zeros)
  const void* scale;   // (N, C) contiguous, or null (zeros)
  const void* shift;   // (N, C) contiguous, or null (zeros)
  void* y;             // x's shape and layout, contiguous
  void* mean;          // (N, G) in the statistics dtype
  void* rstd;          // (N, G): 1 / sqrt(var + eps), biased variance
  int64_t batch;       // N
  int64_t channels;    // C
  int64_t spatial;     // S >= 1
  int64_t groups;      // G, divides C
  double eps;
  bool silu;
  bool channels_last;
};

// Gradients. u and z are recomputed from x, mean and rstd. Output pointers are null when that
// gradient is not wanted; dweight/dbias are (C,) and dscale/dshift (N, C), all in x's dtype.
struct GroupNormBackwardParams {
  const void* dy;  // x's shape and layout, contiguous
  const void* x;
  const void* mean;  // (N, G) statistics dtype
  const void* rstd;
  const void* weight;  // as in the forward; bias, scale and shift are needed to recompute z for silu
  const void* bias;
  const void* scale;
  const void* shift;
  void* dx;  // x's shape and layout, contiguous
  void* dweight;
  void* dbias;
  void* dscale;
  void* dshift;
  int64_t batch;
  int64_t channels;
  int64_t spatial;
  int64_t groups;
  bool silu;
  bool channels_last;
};

}  // namespace fastarch
