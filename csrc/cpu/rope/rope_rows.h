// Row kernels of the CPU rotary embedding: each turns tokens [begin, end) (token r is
// sequence r / seqlen, step r % seqlen) of one tensor, every head. The glue has checked that
// every position lies inside the table. Two builds: AVX-512 (picked at run time when the CPU
// has it) and portable C++.
#pragma once
#include <cstdint>

#include "rope/rope_params.h"

namespace fastarch::cpu {

enum class RopeDtype { f32, f64, f16, bf16 };

template <RopeDtype D>
void rope_rows_generic(const RopeParams& p, int64_t begin, int64_t end);
// fp32, fp16 and bf16 only; bf16_instructions: the CPU has AVX512-BF16.
template <RopeDtype D>
void rope_rows_avx512(const RopeParams& p, int64_t begin, int64_t end, bool bf16_instructions);

}  // namespace fastarch::cpu
