// CPU implementation of fastarch::_linear: checks, the fp32 copy of x's few rows, threading over
// output columns (at::parallel_for, i.e. torch's OpenMP pool and its thread count), and the
// choice between the AVX-512 and portable column kernels.
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "cpu/dtype_of.h"
#include "cpu/isa.h"
#include "linear/linear_glue.h"
#include "linear_cols.h"
#include "cpu/portable.h"

namespace fastarch::cpu {
namespace {

using at::Tensor;

constexpr const char* kWho = "fastarch::_linear (cpu)";

// The W rows (output columns) one task takes at least: enough bytes (~64 KB) that a task's
// time dwarfs a fork of the thread pool.
int64_t linear_grain(const LinearParams& p, int64_t elem_bytes) {
  return std::max<int64_t>(4, (int64_t{64} << 10) / std::max<int64_t>(p.in_features * elem_bytes, 1));
}

void run_cols(Dtype d, const LinearParams& p, int64_t begin, int64_t end) {
  with_dtype(d, [&]<Dtype D>() {
    if (p.w_k_major) {  // (memory-bound at these rows: the portable AVX2 build streams it on AVX-512 CPUs too)
      return with_portable_build([&]<Isa I>() { linear_cols_k_major_generic<I, D>(p, begin, end); });
    }
#ifdef FASTARCH_WITH_AVX512  // (active_isa() is never avx512 in a build without those kernels)
    if constexpr (D != Dtype::f64) {
      if (isa_avx512()) return linear_cols_avx512<D>(p, begin, end);
    }
#endif
    with_portable_build([&]<Isa I>() { linear_cols_generic<I, D>(p, begin, end); });
  });
}

Tensor linear_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu(), kWho, ": x must be on the CPU, got ", x.device());
  const Dtype d = dtype_of(x, kWho, "x");
  linear_glue::check(kWho, x, weight, bias, /*k_major_ok=*/true);
  const int64_t rows = x.size(0), N = weight.size(0);
  const bool k_major = !weight.is_contiguous();  // (the check let only a K-major one through)
  TORCH_CHECK(!k_major || rows <= kKMajorRows, kWho, ": a K-major weight takes at most ", kKMajorRows,
              " rows of x, got ", rows);
  Tensor out = at::empty({rows, N}, x.options());
  if (rows == 0 || N == 0) return out;
  if (x.size(1) == 0) return bias ? out.copy_(bias->expand({rows, N})) : out.zero_();
  // The kernels read x in the compute type: fp16/bf16 rows are widened once here, by vector
  // (x.to(kFloat) cost a decode step's ~200 products ~4 us each in torch's op calls).
  const bool widen = d == Dtype::f16 || d == Dtype::bf16;
  Tensor xc = x.size(1) == 1 ? x.contiguous() : x;  // (a single column may have any stride)
  if (widen) {
    xc = at::empty({rows, x.size(1)}, x.options().dtype(at::kFloat));
    float* wide = xc.data_ptr<float>();
    with_portable_build([&]<Isa I>() {
      auto* fn = d == Dtype::f16 ? &linear_widen_generic<I, Dtype::f16> : &linear_widen_generic<I, Dtype::bf16>;
      fn(x.data_ptr(), rows, x.size(1), x.stride(0), wide);
    });
  }
  LinearParams p{xc.data_ptr(), weight.data_ptr(), bias ? bias->data_ptr() : nullptr, out.data_ptr(),
                 rows, x.size(1), N, xc.stride(0)};
  p.w_k_major = k_major;
  if (d == Dtype::bf16 && isa_bf16()) {
    p.x16 = x.data_ptr();
    p.ldx16 = x.stride(0);
  }
  at::parallel_for(0, N, linear_grain(p, weight.element_size()), [&](int64_t begin, int64_t end) {
    run_cols(d, p, begin, end);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastarch, CPU, m) { m.impl("_linear", &linear_cpu); }

}  // namespace fastarch::cpu
