// CPU implementation of fastarch::_rotary: checks, allocation, threading over tokens
// (at::parallel_for, i.e. torch's OpenMP pool and its thread count), and the choice between
// the AVX-512 and portable row kernels.
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "cpu/dtype_of.h"
#include "cpu/isa.h"
#include "rope/rope_glue.h"
#include "rope_rows.h"
#include "cpu/portable.h"
#include "cpu/models/step_ops.h"

namespace fastarch::cpu {
namespace {

using at::Tensor;

constexpr const char* kWho = "fastarch::_rotary (cpu)";

// Reads outside the table are never made: every token's position is checked here first.
void check_positions(const RopeParams& p, const std::optional<Tensor>& positions) {
  if (!positions || positions->numel() == 0 || p.batch * p.seqlen == 0) return;
  auto [lo_t, hi_t] = at::aminmax(*positions);
  const int64_t lo = lo_t.item<int64_t>(), hi = hi_t.item<int64_t>();
  const int64_t last = p.add_s ? p.seqlen - 1 : 0;  // offsets: the last token is offset + S - 1
  TORCH_CHECK(lo >= 0 && hi + last < p.max_pos, kWho, ": positions must lie in 0 .. ", p.max_pos - 1 - last,
              " (the table's ", p.max_pos, " rows", last ? " less the tokens after each offset" : "", "), got ", lo,
              " .. ", hi);
}

void run_rows(Dtype d, const RopeParams& p, int64_t begin, int64_t end) {
  if (begin >= end) return;
  with_dtype(d, [&]<Dtype D>() {
#ifdef FASTARCH_WITH_AVX512  // (active_isa() is never avx512 in a build without those kernels)
    if constexpr (D != Dtype::f64) {
      if (isa_avx512()) return rope_rows_avx512<D>(p, begin, end, isa_bf16());
    }
#endif
    with_portable_build([&]<Isa I>() { rope_rows_generic<I, D>(p, begin, end); });
  });
}

// q's rows then k's, in one parallel region: one fork and join per call, not two.
void run(Dtype d, const RopeParams& pq, const RopeParams& pk) {
  const int64_t rows_q = pq.batch * pq.heads * pq.seqlen;
  const int64_t rows = rows_q + pk.batch * pk.heads * pk.seqlen;
  if (rows == 0) return;
  // Rows per task: enough elements per task (~16K) that threading overhead stays small.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(pq.head_dim, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    run_rows(d, pq, begin, std::min(end, rows_q));
    run_rows(d, pk, std::max(begin, rows_q) - rows_q, end - rows_q);
  });
}

}  // namespace

void rotary_into(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                 const std::optional<Tensor>& positions, bool interleaved, bool inverse, const Tensor& q_out,
                 const Tensor& k_out, bool check) {
  const RopeParams pq = rope_glue::params(q, q_out, cos, sin, positions, interleaved, inverse);
  const RopeParams pk = rope_glue::params(k, k_out, cos, sin, positions, interleaved, inverse);
  if (check) check_positions(pq, positions);
  run(dtype_of(q, kWho, "q"), pq, pk);
}

namespace {

std::tuple<Tensor, Tensor> rotary_cpu(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                      const std::optional<Tensor>& positions, bool interleaved, bool inverse) {
  TORCH_CHECK(q.device().is_cpu(), kWho, ": q must be on the CPU, got ", q.device());
  const Dtype d = dtype_of(q, kWho, "q");
  rope_glue::check(kWho, q, k, cos, sin, positions, d == Dtype::f64 ? at::kDouble : at::kFloat);
  Tensor q_out = at::empty_like(q);
  Tensor k_out = at::empty_like(k);
  rotary_into(q, k, cos, sin, positions, interleaved, inverse, q_out, k_out, true);
  return {q_out, k_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastarch, CPU, m) { m.impl("_rotary", &rotary_cpu); }

}  // namespace fastarch::cpu
