// GGUF's block formats that fastarch::_quantized_linear reads (fastarch/ops/qlinear/formats.py,
// the definition of each), shared by the CPU and CUDA kernels: no torch headers, so device code
// may include it.
#pragma once
#include <cstdint>

namespace fastarch {

// ggml's type ids of the formats (gguf's GGMLQuantizationType).
enum class Quant : int64_t {
  q4_0 = 2, q4_1 = 3, q5_0 = 6, q5_1 = 7, q8_0 = 8, q4_k = 12, q5_k = 13, q6_k = 14, iq4_nl = 20, iq4_xs = 23
};
constexpr int64_t kQuantBlock = 32;  // values per block of the formats that are not k-quants
constexpr int64_t kQuantSuperBlock = 256;  // values per super-block of the k-quants and IQ4_XS

// X(Quant::...) for every format: the CPU kernels' instantiations and dispatch in one list.
#define FASTARCH_QUANTS(X)                                                                           \
  X(Quant::q4_0) X(Quant::q4_1) X(Quant::q5_0) X(Quant::q5_1) X(Quant::q8_0) X(Quant::q4_k) X(Quant::q5_k) \
  X(Quant::q6_k) X(Quant::iq4_nl) X(Quant::iq4_xs)

constexpr bool quant_known(int64_t q) {
  return q == 2 || q == 3 || q == 6 || q == 7 || q == 8 || q == 12 || q == 13 || q == 14 || q == 20 || q == 23;
}
// The formats of 256-value super-blocks (sub-blocks of 32 or 16 values with their own scales).
constexpr bool quant_is_k(Quant q) {
  return q == Quant::q4_k || q == Quant::q5_k || q == Quant::q6_k || q == Quant::iq4_xs;
}
// Values per block: 32, or 256 for the k-quants and IQ4_XS.
constexpr int64_t quant_block_values(Quant q) { return quant_is_k(q) ? kQuantSuperBlock : kQuantBlock; }

// Bytes per block (fp16 fields little-endian; formats.py spells out each layout):
//   Q4_0 d, 16 bytes of 4-bit q (byte j: value j low, value j + 16 high)      (q - 8) d
//   Q4_1 d, m, the 4-bit q as Q4_0                                            q d + m
//   Q5_0 d, u32 of fifth bits (bit j: value j), the low 4 bits as Q4_0         (q - 16) d
//   Q5_1 d, m, then as Q5_0                                                   q d + m
//   Q8_0 d, 32 int8                                                           q d
//   Q4_K d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit q           (d sc) q - dmin m
//   Q5_K d, dmin, the 12 scale bytes, 32 bytes of fifth bits, 128 bytes of q   (d sc) q - dmin m
//   Q6_K 128 bytes of low 4 bits, 64 of high 2, 16 int8 scales, d             (d sc) (q - 32)
//   IQ4_NL d, the 4-bit q as Q4_0                                             d level[q]
//   IQ4_XS d, u16 + 4 bytes of 6-bit scales, per 32 values 16 bytes of q      (d (ls - 32)) level[q]
// (level: IQ4_NL's 16 non-uniform levels, kIq4Levels)
inline constexpr float kIq4Levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
constexpr int64_t quant_block_bytes(Quant q) {
  switch (q) {
    case Quant::q4_0: return 18;
    case Quant::q4_1: return 20;
    case Quant::q5_0: return 22;
    case Quant::q5_1: return 24;
    case Quant::q8_0: return 34;
    case Quant::q4_k: return 144;
    case Quant::q5_k: return 176;
    case Quant::q6_k: return 210;
    case Quant::iq4_nl: return 18;
    case Quant::iq4_xs: return 136;
  }
  return 0;
}

}  // namespace fastarch
