// Arguments of the elementwise activation kernels, shared by the CPU and CUDA backends. Plain
// pointers, so the kernel translation units need no torch headers.
//
// One skeleton for the family: y = f(a + bias) for the single-input activations (bias_gelu),
// y = f(a) b for the gated ones (a = gate, b = up: swiglu with f = silu, geglu with f = gelu),
// over (rows, cols) matrices whose columns are contiguous and whose rows may be strided (the
// gate and up halves of one projection are read in place). Math in fp32 (fp64 for fp64 inputs
// on the CPU), results rounded once to the inputs' dtype.
#pragma once
#include <cstdint>

namespace fastarch {

// f, the activation applied to a (+ bias); gated or not is whether b is given.
enum class Activation {
  gelu_erf,   // h Phi(h)
  gelu_tanh,  // h sigmoid(2 sqrt(2/pi) (h + 0.044715 h^3)) = 0.5 h (1 + tanh(...))
  silu,       // h sigmoid(h)
};

struct ActivationForwardParams {
  const void* a;
  int64_t a_row_stride;
  const void* b;  // up, for the gated activations (y = f(a) b); null for the single-input ones
  int64_t b_row_stride;
  const void* bias;  // (cols,) in the inputs' dtype, single-input activations only; may be null
  void* y;           // (rows, cols), contiguous
  int64_t rows;
  int64_t cols;
  Activation act;
};

// da = dy f'(a) (gated: dy b f'(a), and db = dy f(a)). The bias gradient (the column sums
// of da, before rounding) is accumulated by the backends themselves.
struct ActivationBackwardParams {
  const void* dy;
  int64_t dy_row_stride;
  const void* a;
  int64_t a_row_stride;
  const void* b;
  int64_t b_row_stride;
  const void* bias;
  void* da;  // (rows, cols), rows strided by da_row_stride (the halves of one (rows, 2 cols)
  void* db;  // gradient for the packed gated op; else contiguous); db: gated only
  int64_t da_row_stride;
  int64_t db_row_stride;
  int64_t rows;
  int64_t cols;
  Activation act;
};

}  // namespace fastarch
