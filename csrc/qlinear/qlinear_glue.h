// What the CPU and CUDA implementations of fastarch::_quantized_linear share: the checks of
// their arguments beyond x's device type and dtype, which each backend checks itself.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "qlinear/qlinear_formats.h"

namespace fastarch::qlinear_glue {

using at::Tensor;

inline void check(const char* who, const Tensor& x, const Tensor& blocks, int64_t quant,
                  const std::optional<Tensor>& bias) {
  TORCH_CHECK(quant == 2 || quant == 3 || quant == 8, who, ": quant must be 2 (Q4_0), 3 (Q4_1) or 8 (Q8_0), got ",
              quant);
  TORCH_CHECK(x.dim() == 2, who, ": x must be 2-D (rows, in_features), got ", x.sizes());
  const int64_t K = x.size(1);
  TORCH_CHECK(K <= 1 || x.stride(1) == 1, who, ": x must have a contiguous last dim");
  TORCH_CHECK(K % kQuantBlock == 0, who, ": in_features must be a multiple of 32, got ", K);
  const int64_t row_bytes = K / kQuantBlock * quant_block_bytes(static_cast<Quant>(quant));
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.is_contiguous() &&
                  blocks.size(1) == row_bytes,
              who, ": blocks must be contiguous uint8 (out_features, ", row_bytes, "), got ", blocks.scalar_type(), " ",
              blocks.sizes());
  TORCH_CHECK(blocks.device() == x.device(), who, ": blocks must be on x's device ", x.device(), ", got ",
              blocks.device());
  if (bias) {
    const int64_t N = blocks.size(0);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                who, ": bias must be a contiguous (", N, ",) tensor of x's dtype ", x.scalar_type(), " on x's device ",
                x.device(), ", got ", bias->scalar_type(), " ", bias->sizes(), " on ", bias->device());
  }
}

}  // namespace fastarch::qlinear_glue
