// The schema of every fastarch:: kernel op, in one place. Backends only register
// implementations for their dispatch key (csrc/cpu/*, csrc/cuda/*). The public ops
// (fastarch::layer_norm, ...) are defined in Python (fastarch/ops), so that they exist even
// when this extension is missing; they call these kernels through the backend registry.
#include <torch/library.h>

TORCH_LIBRARY(fastarch, m) {
  // Normalization over the last dim of a 2-D x (rows, cols) with contiguous columns.
  // Absent optional results are returned as empty tensors of shape (0,).
  m.def(
      "_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms)"
      " -> (Tensor y, Tensor residual_out, Tensor mean, Tensor rstd)");
  m.def(
      "_norm_bwd(Tensor dy, Tensor? dresidual_out, Tensor xin, Tensor? weight, Tensor? mean,"
      " Tensor rstd, bool need_dweight, bool need_dbias) -> (Tensor dx, Tensor dweight, Tensor dbias)");
}
