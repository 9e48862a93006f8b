// CPU implementation of fastarch::_norm_fwd / _norm_bwd: checks, allocation, threading over
// rows (at::parallel_for, i.e. torch's OpenMP pool and its thread count), and the choice
// between the AVX-512 and portable row kernels.
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <tuple>

#include "norms/norm_glue.h"
#include "cpu/dtype_of.h"
#include "cpu/isa.h"
#include "norm_rows.h"
#include "cpu/models/step_ops.h"
#include "cpu/portable.h"

namespace fastarch::cpu {
namespace {

using at::Tensor;

// Rows per task: enough work per task (~16K elements) that threading overhead stays small.
int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// Streaming stores write whole aligned 16-element chunks.
bool can_stream(const Tensor& out) {
  const int64_t chunk_bytes = 16 * out.element_size();
  return stream_output(out.nbytes()) && out.size(1) % 16 == 0 && reinterpret_cast<uintptr_t>(out.data_ptr()) % chunk_bytes == 0;
}

// The row kernels' extra arguments: the weight and bias in the statistics dtype, the weight's
// offset added (converted once per call, not once per row: the AVX-512 kernels always take
// them, fp32; the portable ones where there is an offset) and whether to stream the outputs
// (the portable forward's too). The scratch row is per thread.
struct RowInputs {
  Tensor weight, bias;  // in the statistics dtype, or undefined
  bool stream;

  Avx512RowArgs for_thread(float* scratch) const {
    return {weight.defined() ? weight.data_ptr<float>() : nullptr, bias.defined() ? bias.data_ptr<float>() : nullptr,
            scratch, stream, isa_bf16()};
  }
  const void* portable_weight() const { return weight.defined() ? weight.data_ptr() : nullptr; }
  const void* portable_bias() const { return bias.defined() ? bias.data_ptr() : nullptr; }
};

// t in the statistics dtype, plus offset: computed as Gemma computes 1 + weight.float().
Tensor as_stats(const std::optional<Tensor>& t, Dtype d, double offset = 0.0) {
  if (!t.has_value()) return Tensor();
  const Tensor v = t->to(acc_dtype(d)).contiguous();
  return offset == 0.0 ? v : v.add(offset);
}

// The portable kernels take the converted vectors where the weight has an offset (else x's
// own dtype, as they are).
RowInputs row_inputs(Dtype d, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double offset,
                     bool stream) {
  if (use_avx512(d) || (offset != 0.0 && weight)) return {as_stats(weight, d, offset), as_stats(bias, d), stream};
  return {Tensor(), Tensor(), stream};
}

#ifdef FASTARCH_WITH_AVX512
// Two fp32 rows, whole 16-element chunks each.
std::unique_ptr<float[]> scratch_rows(int64_t cols) { return std::unique_ptr<float[]>(new float[2 * 16 * ((cols + 15) / 16)]); }
#endif

void forward_rows(Dtype d, const NormForwardParams& p, int64_t begin, int64_t end, const RowInputs& in) {
  with_dtype(d, [&]<Dtype D>() {
#ifdef FASTARCH_WITH_AVX512  // (active_isa() is never avx512 in a build without those kernels)
    if constexpr (D != Dtype::f64) {
      if (isa_avx512()) {
        const auto scratch = scratch_rows(p.cols);
        return norm_forward_rows_avx512<D>(p, begin, end, in.for_thread(scratch.get()));
      }
    }
#else
    (void)in;
#endif
    with_portable_build([&]<Isa I>() {
      norm_forward_rows_generic<I, D>(p, begin, end, in.stream, in.portable_weight(), in.portable_bias());
    });
  });
}

void backward_rows(
    Dtype d, const NormBackwardParams& p, int64_t begin, int64_t end, void* dw, void* db, const RowInputs& in) {
  with_dtype(d, [&]<Dtype D>() {
#ifdef FASTARCH_WITH_AVX512
    if constexpr (D != Dtype::f64) {
      if (isa_avx512()) {
        const auto scratch = scratch_rows(p.cols);
        return norm_backward_rows_avx512<D>(p, begin, end, static_cast<float*>(dw), static_cast<float*>(db),
                                            in.for_thread(scratch.get()));
      }
    }
#else
    (void)in;
#endif
    with_portable_build([&]<Isa I>() { norm_backward_rows_generic<I, D>(p, begin, end, dw, db, in.portable_weight()); });
  });
}

}  // namespace

void norm_forward_into(const Tensor& x, const std::optional<Tensor>& residual, const std::optional<Tensor>& weight,
                       const std::optional<Tensor>& bias, double eps, bool rms, const Tensor& y,
                       const Tensor& residual_out, const Tensor& mean, const Tensor& rstd, double weight_offset) {
  const Dtype d = dtype_of(x, "fastarch cpu norm", "x");
  const NormForwardParams p =
      norm_glue::forward_params(x, residual, weight, bias, y, residual_out, mean, rstd, eps, rms, weight_offset);
  const RowInputs in =
      row_inputs(d, weight, bias, weight_offset, can_stream(y) && (!residual || can_stream(residual_out)));
  at::parallel_for(0, x.size(0), grain_rows(x.size(1)), [&](int64_t begin, int64_t end) {
    forward_rows(d, p, begin, end, in);
  });
}

namespace {

constexpr const char* kWho = "fastarch cpu norm";

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_cpu(
    const Tensor& x, const std::optional<Tensor>& residual, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, double eps, bool rms, double weight_offset) {
  TORCH_CHECK(x.device().is_cpu(), kWho, ": x must be on the CPU, got ", x.device());
  norm_glue::check_forward(kWho, x, residual, weight, bias);
  norm_glue::check_weight_offset(kWho, weight, weight_offset);
  const Dtype d = dtype_of(x, kWho, "x");
  const int64_t rows = x.size(0), cols = x.size(1);
  const auto stats = x.options().dtype(acc_dtype(d));
  Tensor y = at::empty({rows, cols}, x.options());
  Tensor residual_out = residual ? at::empty({rows, cols}, x.options()) : at::empty({0}, x.options());
  Tensor mean = at::empty({rms ? 0 : rows}, stats);
  Tensor rstd = at::empty({rows}, stats);
  norm_forward_into(x, residual, weight, bias, eps, rms, y, residual_out, mean, rstd, weight_offset);
  return {y, residual_out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd_cpu(
    const Tensor& dy, const std::optional<Tensor>& dresidual_out, const Tensor& xin,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& mean, const Tensor& rstd, bool need_dweight,
    bool need_dbias, double weight_offset) {
  TORCH_CHECK(xin.device().is_cpu(), kWho, " backward: xin must be on the CPU, got ", xin.device());
  const Dtype d = dtype_of(xin, kWho, "xin");
  norm_glue::check_backward(kWho, dy, dresidual_out, xin, weight, mean, rstd, need_dweight, acc_dtype(d));
  norm_glue::check_weight_offset(kWho, weight, weight_offset);
  const int64_t rows = xin.size(0), cols = xin.size(1);
  const auto stats = acc_dtype(d);
  Tensor dx = at::empty({rows, cols}, xin.options());
  const NormBackwardParams p =
      norm_glue::backward_params(dy, dresidual_out, xin, weight, mean, rstd, dx, weight_offset);

  // One chunk of rows per thread, each with its own (2, cols) dweight/dbias accumulator;
  // the chunks' sums are added at the end.
  const bool weight_grads = need_dweight || need_dbias;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  Tensor partial = weight_grads ? at::zeros({chunks, 2, cols}, xin.options().dtype(stats)) : Tensor();
  const int64_t elem = at::elementSize(stats);
  char* base = weight_grads ? static_cast<char*>(partial.data_ptr()) : nullptr;
  const RowInputs in = row_inputs(d, weight, std::nullopt, weight_offset, can_stream(dx));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      void* dw = weight_grads ? base + (2 * c) * cols * elem : nullptr;
      void* db = weight_grads ? base + (2 * c + 1) * cols * elem : nullptr;
      backward_rows(d, p, rows * c / chunks, rows * (c + 1) / chunks, dw, db, in);
    }
  });
  Tensor dweight = at::empty({0}, xin.options());
  Tensor dbias = at::empty({0}, xin.options());
  if (weight_grads) {
    Tensor sums = chunks == 1 ? partial[0] : at::sum(partial, {0});
    // copy=true: the results must not share storage with each other or the scratch buffer
    if (need_dweight) dweight = sums[0].to(xin.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
    if (need_dbias) dbias = sums[1].to(xin.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  }
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastarch, CPU, m) {
  m.impl("_norm_fwd", &norm_fwd_cpu);
  m.impl("_norm_bwd", &norm_bwd_cpu);
}

}  // namespace fastarch::cpu
