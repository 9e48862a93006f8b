// Column-block kernels of the CPU small-batch linear layer, y = x W^T + b, for a few rows of
// x (a decode step's tokens): each computes output columns [begin, end) of every row. W
// (out_features, in_features) is read once from memory, a few of its rows at a time against
// all of x's rows, so the kernel runs at the speed memory delivers W. Two builds: AVX-512
// (picked at run time when the CPU has it) and portable C++.
#pragma once
#include <cstdint>

#include "cpu/dtype.h"
#include "cpu/isa.h"

namespace fastarch::cpu {

// A weight row is read this many bytes ahead of its products, by software prefetches where one
// weight row streams against the rows of x. The hardware's prefetchers alone left a decode
// step's products below the memory's speed: on an AMD EPYC Zen 3 (AVX2 build, 2 threads,
// SmolLM2-135M's weights, one row of x, side by side in one process) bf16 22.2 -> 18.4 ms, fp16
// 28.6 -> 23.4, 8 rows 1.16-1.26x, other row counts alike; 1024 to 4096 bytes ahead measured
// alike, and so did a prefetch a cache line to L1, L2 or non-temporally. The AVX-512 build on a
// Zen 5: see stream_row.
constexpr int64_t kPrefetchBytes = 2048;

struct LinearParams {
  // x as fp32 (fp64 for fp64) rows: rows x in_features, row stride ldx. The glue widens fp16 and
  // bf16 inputs once (a few rows; W is what costs).
  const void* x;
  const void* w;     // out_features x in_features, contiguous, in the input dtype (w_k_major: below)
  const void* bias;  // out_features or nullptr, in the input dtype
  void* out;         // rows x out_features, contiguous, in the input dtype
  int64_t rows, in_features, out_features, ldx;
  // bf16 x as given (rows x in_features, row stride ldx16, contiguous columns), for the AVX-512
  // build's vdpbf16ps tiles where the CPU has AVX512-BF16; nullptr elsewhere.
  const void* x16 = nullptr;
  int64_t ldx16 = 0;
  // W stored K-major: in_features rows of out_features values (W^T contiguous; transformers'
  // Conv1D), read by linear_cols_k_major_generic.
  bool w_k_major = false;
};

// x's rows (fp16 or bf16: rows x K, row stride ldx, contiguous columns) widened to fp32 rows
// of K values in out (exactly; portable build I).
template <Isa I, Dtype D>
void linear_widen_generic(const void* x, int64_t rows, int64_t K, int64_t ldx, float* out);
template <Isa I, Dtype D>
void linear_cols_generic(const LinearParams& p, int64_t begin, int64_t end);
// fp32, fp16 and bf16 only.
template <Dtype D>
void linear_cols_avx512(const LinearParams& p, int64_t begin, int64_t end);
// Output columns [begin, end) of every row from a K-major W (p.w_k_major; rows <= kKMajorRows).
template <Isa I, Dtype D>
void linear_cols_k_major_generic(const LinearParams& p, int64_t begin, int64_t end);
constexpr int64_t kKMajorRows = 4;

}  // namespace fastarch::cpu
