// Row kernels of the CPU rotary embedding: each turns tokens [begin, end) (token r is
// sequence r / seqlen, step r % seqlen) of one tensor, every head. The glue has checked that
// every position lies inside the table.
#pragma once
#include <cstdint>

#include "rope/rope_params.h"

namespace fastarch::cpu {

enum class RopeDtype { f32, f64, f16, bf16 };

template <RopeDtype D>
void rope_rows_generic(const RopeParams& p, int64_t begin, int64_t end);

}  // namespace fastarch::cpu
