// GGUF's block formats that fastarch::_quantized_linear reads (fastarch/ops/qlinear/reference.py),
// shared by the CPU and CUDA kernels: no torch headers, so device code may include it.
#pragma once
#include <cstdint>

namespace fastarch {

// ggml's type ids of the formats (gguf's GGMLQuantizationType).
enum class Quant : int64_t { q4_0 = 2, q4_1 = 3, q8_0 = 8 };
constexpr int64_t kQuantBlock = 32;  // values per block, in every format here

// Bytes per block: an fp16 scale d (Q4_1: then an fp16 offset m), then the values: Q4_0 and
// Q4_1 16 bytes of 4-bit values (byte j: value j in its low nibble, value j + 16 in its high),
// Q8_0 32 int8. A value is Q4_0 (q - 8) * d, Q4_1 q * d + m, Q8_0 q * d.
constexpr int64_t quant_block_bytes(Quant q) { return q == Quant::q4_0 ? 18 : q == Quant::q4_1 ? 20 : 34; }

}  // namespace fastarch
