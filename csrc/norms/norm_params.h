// Arguments of the norm kernels, shared by the CPU and CUDA backends. Plain pointers, so the
// kernel translation units need no torch headers (they compile in seconds).
#pragma once
#include <cstdint>

namespace fastarch {

// One normalization over the last dimension of a (rows, cols) matrix whose columns are
// contiguous and whose rows may be strided. Absent tensors are null pointers.
struct NormForwardParams {
  const void* x;
  int64_t x_row_stride;
  const void* residual;  // added to x before normalizing (the pre-norm residual stream)
  int64_t residual_row_stride;
  const void* weight;  // (cols,), same dtype as x
  const void* bias;    // (cols,)
  void* y;             // (rows, cols), contiguous
  void* residual_out;  // (rows, cols), contiguous: x + residual rounded to x's dtype
  void* mean;          // (rows,) in the statistics dtype (fp32; fp64 for fp64 inputs); null for RMS
  void* rstd;          // (rows,) 1 / sqrt(var + eps), or 1 / sqrt(mean(x^2) + eps) for RMS
  int64_t rows;
  int64_t cols;
  double eps;
  bool rms;
  double weight_offset;  // y = xhat * (weight + weight_offset) (+ bias): Gemma's 1 + weight, added in fp32
};

// Gradients of the normalization. dx = d(loss)/d(x) (also the residual's gradient for the
// fused add variants, since residual_out = x + residual).
struct NormBackwardParams {
  const void* dy;
  int64_t dy_row_stride;
  const void* dresidual_out;  // gradient arriving at residual_out, added to dx; may be null
  int64_t dresidual_out_row_stride;
  const void* xin;  // the normalization's input: x, or residual_out for the fused add variants
  int64_t xin_row_stride;
  const void* weight;  // may be null (treated as ones)
  const void* mean;    // null for RMS
  const void* rstd;
  void* dx;  // (rows, cols), contiguous
  int64_t rows;
  int64_t cols;
  bool rms;
  double weight_offset;  // as in the forward: dx sees weight + weight_offset (dweight does not change)
};

}  // namespace fastarch
