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
  TORCH_CHECK(quant_known(quant), who,
              ": quant must be a ggml type id of Q4_0 (2), Q4_1 (3), Q5_0 (6), Q5_1 (7), Q8_0 (8), Q4_K (12), Q5_K (13),"
              " Q6_K (14), IQ4_NL (20) or IQ4_XS (23), got ", quant);
  const Quant q = static_cast<Quant>(quant);
  TORCH_CHECK(x.dim() == 2, who, ": x must be 2-D (rows, in_features), got ", x.sizes());
  const int64_t K = x.size(1), block = quant_block_values(q);
  TORCH_CHECK(K <= 1 || x.stride(1) == 1, who, ": x must have a contiguous last dim");
  TORCH_CHECK(K % block == 0, who, ": in_features must be a multiple of ", block, " (the format's block), got ", K);
  const int64_t row_bytes = K / block * quant_block_bytes(q);
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
