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

struct LinearParams {
  // x as fp32 (fp64 for fp64) rows: rows x in_features, row stride ldx. The glue widens fp16 and
  // bf16 inputs once (a few rows; W is what costs).
  const void* x;
  const void* w;     // out_features x in_features, contiguous, in the input dtype
  const void* bias;  // out_features or nullptr, in the input dtype
  void* out;         // rows x out_features, contiguous, in the input dtype
  int64_t rows, in_features, out_features, ldx;
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

}  // namespace fastarch::cpu
