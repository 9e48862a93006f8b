// Arguments of the elementwise activation kernels, shared by the CPU and CUDA backends. Plain
// pointers, so the kernel translation units need no torch headers.
//
// One skeleton for the family: y = f(a [+ bias]) for the single-input activations (bias_gelu),
// y = f(a, b) for the gated ones (swiglu: a = gate, b = up), over (rows, cols) matrices whose
// columns are contiguous and whose rows may be strided. Math in fp32 (fp64 for fp64 inputs on
// the CPU), results rounded once to the inputs' dtype.
#pragma once
#include <cstdint>

namespace fastarch {

enum class Activation {
  gelu_erf,   // h Phi(h), h = a + bias
  gelu_tanh,  // h sigmoid(2 sqrt(2/pi) (h + 0.044715 h^3)) = 0.5 h (1 + tanh(...))
  swiglu,     // silu(a) b = a sigmoid(a) b
};

inline bool is_gated(Activation act) { return act == Activation::swiglu; }

struct ActivationForwardParams {
  const void* a;
  int64_t a_row_stride;
  const void* b;  // gated activations only, else null
  int64_t b_row_stride;
  const void* bias;  // (cols,) in the inputs' dtype, single-input activations only; may be null
  void* y;           // (rows, cols), contiguous
  int64_t rows;
  int64_t cols;
  Activation act;
};

// da = dy * df/da (and db = dy * df/db for the gated ones). The bias gradient (the column sums
// of da, before rounding) is accumulated by the backends themselves.
struct ActivationBackwardParams {
  const void* dy;
  int64_t dy_row_stride;
  const void* a;
  int64_t a_row_stride;
  const void* b;
  int64_t b_row_stride;
  const void* bias;
  void* da;  // (rows, cols), contiguous
  void* db;  // (rows, cols), contiguous; gated only
  int64_t rows;
  int64_t cols;
  Activation act;
};

}  // namespace fastarch
