// Portable build of the CPU linear layer on block-quantized weights (qlinear.h): each block's
// values (32; 256 for a k-quant) widened to fp32 (exactly ggml's), then multiplied into up to 8 rows of x in 16
// partial sums per row (fused multiply-adds in the AVX2 build), summed in order; the bias added
// and the result rounded once. Also the rounding of x to int8 (activations "int8", whose
// products run here on x's rounded values: qlinear_cpu.cpp).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "qlinear.h"
#include "qlinear_cols.h"
#include "cpu/portable.h"
#include "cpu/portable_math.h"

FASTARCH_PORTABLE_BEGIN

namespace fastarch::cpu {
namespace {

inline float half_at(const uint8_t* p) {
  c10::Half h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(h);
}

// 16 bytes of 4-bit values as 32 integers minus offset (byte j: value j low, value j + 16
// high), one loop per half: each compiles to a few vector instructions (a loop over j writing
// both halves was compiled to one byte insert per value).
inline void nibble_ints(const uint8_t* qs, int offset, int16_t* v) {
  for (int j = 0; j < 16; ++j) v[j] = static_cast<int16_t>((qs[j] & 0x0F) - offset);
  for (int j = 0; j < 16; ++j) v[j + 16] = static_cast<int16_t>((qs[j] >> 4) - offset);
}

// Q4_K/Q5_K's sub-block c: its 6-bit scale and min from the 12 scale bytes s (formats.py, k_scales).
inline std::pair<int, int> k_scale_min(const uint8_t* s, int c) {
  if (c < 4) return {s[c] & 63, s[c + 4] & 63};
  return {(s[c + 4] & 0x0F) | ((s[c - 4] >> 6) << 4), (s[c + 4] >> 4) | ((s[c] >> 6) << 4)};
}

// IQ4's 16 levels as integers.
constexpr int16_t kIq4Ints[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// Block blk's values (32; a k-quant's 256) as small integers v[j] and, per group of 16 values,
// a scale a and a min b (0 where the format's offset is folded into v): value j is a v + b.
template <Quant Q>
inline void block_ints(const uint8_t* blk, int16_t* v, float* a, float* b) {
  if constexpr (Q == Quant::q8_0) {
    for (int j = 0; j < 32; ++j) v[j] = static_cast<int8_t>(blk[2 + j]);
    a[0] = a[1] = half_at(blk);
    b[0] = b[1] = 0.0f;
  } else if constexpr (Q == Quant::iq4_nl || Q == Quant::iq4_xs) {  // (sub-)blocks of 32: a step, 16 bytes
    constexpr bool kXs = Q == Quant::iq4_xs;
    const float d = half_at(blk);
    uint16_t high = 0;
    if constexpr (kXs) std::memcpy(&high, blk + 2, 2);
    for (int c = 0; c < (kXs ? 8 : 1); ++c) {
      const int ls = kXs ? ((blk[4 + c / 2] >> (4 * (c % 2))) & 0x0F) | (((high >> (2 * c)) & 3) << 4) : 33;
      nibble_ints(blk + (kXs ? 8 + 16 * c : 2), 0, v + 32 * c);
      for (int j = 32 * c; j < 32 * c + 32; ++j) v[j] = kIq4Ints[v[j]];
      a[2 * c] = a[2 * c + 1] = d * static_cast<float>(ls - 32);
      b[2 * c] = b[2 * c + 1] = 0.0f;
    }
  } else if constexpr (!quant_is_k(Q)) {  // Q4_0, Q4_1, Q5_0, Q5_1: d (, m) (, the fifth bits), nibbles
    constexpr bool kMin = Q == Quant::q4_1 || Q == Quant::q5_1, kFive = Q == Quant::q5_0 || Q == Quant::q5_1;
    const uint8_t* qs = blk + (kMin ? 4 : 2) + (kFive ? 4 : 0);
    uint32_t qh = 0;
    if constexpr (kFive) std::memcpy(&qh, qs - 4, 4);
    constexpr int kOffset = kMin ? 0 : kFive ? 16 : 8;
    nibble_ints(qs, kOffset, v);
    if constexpr (kFive) {
      for (int j = 0; j < 32; ++j) v[j] = static_cast<int16_t>(v[j] + static_cast<int>(((qh >> j) & 1) << 4));
    }
    a[0] = a[1] = half_at(blk);
    b[0] = b[1] = kMin ? half_at(blk + 2) : 0.0f;
  } else if constexpr (Q == Quant::q4_k || Q == Quant::q5_k) {
    const uint8_t* s = blk + 4;  // the 6-bit scales and mins (formats.py, k_scales)
    const float d = half_at(blk), dmin = half_at(blk + 2);
    const uint8_t* qs = blk + (Q == Quant::q5_k ? 48 : 16);
    for (int c = 0; c < 8; ++c) {
      const auto [sc, mn] = k_scale_min(s, c);
      const int shift = 4 * (c % 2);
      for (int l = 0; l < 32; ++l) {
        int q = (qs[32 * (c / 2) + l] >> shift) & 0x0F;
        if constexpr (Q == Quant::q5_k) q |= ((blk[16 + l] >> c) & 1) << 4;
        v[32 * c + l] = static_cast<int16_t>(q);
      }
      a[2 * c] = a[2 * c + 1] = d * static_cast<float>(sc);
      b[2 * c] = b[2 * c + 1] = -(dmin * static_cast<float>(mn));
    }
  } else {  // Q6_K: half n of 128 values, group g of 32 in it, position l in the group
    const float d = half_at(blk + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    for (int n = 0; n < 2; ++n) {
      for (int g = 0; g < 4; ++g) {
        const uint8_t* low = blk + 64 * n + 32 * (g % 2);
        const uint8_t* high = blk + 128 + 32 * n;
        const int shift = 4 * (g / 2);
        for (int l = 0; l < 32; ++l) {
          v[128 * n + 32 * g + l] =
              static_cast<int16_t>((((low[l] >> shift) & 0x0F) | (((high[l] >> (2 * g)) & 3) << 4)) - 32);
        }
      }
    }
    for (int g = 0; g < 16; ++g) {
      a[g] = d * static_cast<float>(sc[g]);
      b[g] = 0.0f;
    }
  }
}

// Block blk's values (32; a k-quant's 256) as fp32: a v (+ b), exactly ggml's values: every
// product a v is exact in fp32 (formats.py), so madd_f32 rounds a v + b once either way, and
// Q6_K's (d sc) (q - 32) rounds once, in ggml's order.
template <Quant Q>
inline void block_values(const uint8_t* blk, float* v) {
  constexpr int64_t kValues = quant_block_values(Q);
  constexpr bool kMin = Q == Quant::q4_1 || Q == Quant::q5_1 || Q == Quant::q4_k || Q == Quant::q5_k;
  int16_t ints[kValues];
  float a[kValues / 16], b[kValues / 16];
  block_ints<Q>(blk, ints, a, b);
  for (int64_t g = 0; g < kValues / 16; ++g) {
    for (int64_t j = 16 * g; j < 16 * g + 16; ++j) {
      v[j] = kMin ? portable::madd_f32(static_cast<float>(ints[j]), a[g], b[g]) : static_cast<float>(ints[j]) * a[g];
    }
  }
}

template <Quant Q, int R>
void row_dots(const uint8_t* w, int64_t nb, const float* x, int64_t ldx, float* sums) {
  using namespace portable;
  constexpr int64_t kValues = quant_block_values(Q);
  constexpr int kVecs = 32 / kVecLanes;
  Vec part[R][kVecs] = {};
  alignas(64) float v[kValues];
  for (int64_t b = 0; b < nb; ++b) {
    block_values<Q>(w + b * quant_block_bytes(Q), v);
    const float* xb = x + b * kValues;
    for (int64_t c = 0; c < kValues; c += 32) {
      for (int i = 0; i < kVecs; ++i) {
        const Vec wv = load_vec(v + c + i * kVecLanes);
        for (int r = 0; r < R; ++r) part[r][i] = madd(wv, load_vec(xb + r * ldx + c + i * kVecLanes), part[r][i]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float lane[32];
    std::memcpy(lane, part[r], sizeof lane);
    float s = 0;
    for (int l = 0; l < 32; ++l) s += lane[l];
    sums[r] = s;
  }
}

// dots.template operator()<R>(first row, sums) for each group of up to 4 of rows rows (1-4 a
// kernel of its own; more in fours).
template <typename Dots>
void in_fours(int64_t rows, float* sums, Dots&& dots) {
  for (int64_t m = 0; m < rows; m += 4) {
    switch (std::min<int64_t>(rows - m, 4)) {
      case 1: dots.template operator()<1>(m, sums + m); break;
      case 2: dots.template operator()<2>(m, sums + m); break;
      case 3: dots.template operator()<3>(m, sums + m); break;
      default: dots.template operator()<4>(m, sums + m); break;
    }
  }
}

template <Quant Q>
void rows_dots(int64_t rows, const uint8_t* w, int64_t nb, const float* x, int64_t ldx, float* sums) {
  in_fours(rows, sums, [&]<int R>(int64_t m, float* out) { row_dots<Q, R>(w, nb, x + m * ldx, ldx, out); });
}

}  // namespace

template <Isa I, Quant Q, Dtype D>
void qlinear_cols_generic(const QuantLinearParams& p, int64_t begin, int64_t end) {
  const int64_t nb = p.in_features / quant_block_values(Q);
  qlinear_cols_loop<Q, D, kQuantRowGroup>(p, begin, end, [&](int64_t rows, const uint8_t* w, int64_t m0, float* sums) {
    rows_dots<Q>(rows, w, nb, p.x + m0 * p.ldx, p.ldx, sums);
  });
}

template <Isa I, Quant Q>
void dequantize_rows_generic(const uint8_t* w, int64_t in_features, int64_t begin, int64_t end, float* out) {
  const int64_t nb = in_features / quant_block_values(Q), row_bytes = nb * quant_block_bytes(Q);
  for (int64_t n = begin; n < end; ++n) {
    for (int64_t b = 0; b < nb; ++b) {
      block_values<Q>(w + n * row_bytes + b * quant_block_bytes(Q),
                      out + (n - begin) * in_features + b * quant_block_values(Q));
    }
  }
}

// As quantize_int8_rows_avx512, q and d only: per block of 32 the scale from max |x| (an inf or
// a NaN: d NaN, codes 0), codes rounded to nearest even (the default rounding mode: torch.round's
// ties).
template <Isa I>
void quantize_int8_rows_generic(const float* x, int64_t rows, int64_t K, int64_t ldx, const Int8Rows& out) {
  const int64_t ld = out.ld;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    int8_t* q = const_cast<int8_t*>(out.q) + r * ld;
    for (int64_t blk = 0; blk < ld / 32; ++blk) {
      float amax = 0.0f, scale = 0.0f;
      bool finite = true;
      for (int64_t j = 32 * blk; j < std::min(32 * blk + 32, K); ++j) {
        finite = finite && std::isfinite(xr[j]);
        amax = std::max(amax, std::fabs(xr[j]));
      }
      const float inv = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
      if (!finite) scale = std::numeric_limits<float>::quiet_NaN();
      else if (amax > 0.0f) scale = amax / 127.0f;
      for (int64_t j = 32 * blk; j < 32 * blk + 32; ++j) {
        q[j] = j < K && inv != 0.0f ? static_cast<int8_t>(std::clamp(std::nearbyint(xr[j] * inv), -127.0f, 127.0f)) : 0;
      }
      const_cast<float*>(out.d)[r * (ld / 32) + blk] = scale;
    }
  }
}

template void quantize_int8_rows_generic<kPortableBuild>(const float*, int64_t, int64_t, int64_t, const Int8Rows&);


#define FASTARCH_QLINEAR_GENERIC(Q)                                                                                  \
  template void qlinear_cols_generic<kPortableBuild, Q, Dtype::f32>(const QuantLinearParams&, int64_t, int64_t);      \
  template void qlinear_cols_generic<kPortableBuild, Q, Dtype::f16>(const QuantLinearParams&, int64_t, int64_t);      \
  template void qlinear_cols_generic<kPortableBuild, Q, Dtype::bf16>(const QuantLinearParams&, int64_t, int64_t);     \
  template void dequantize_rows_generic<kPortableBuild, Q>(const uint8_t*, int64_t, int64_t, int64_t, float*);
FASTARCH_QUANTS(FASTARCH_QLINEAR_GENERIC)
#undef FASTARCH_QLINEAR_GENERIC

}  // namespace fastarch::cpu

FASTARCH_PORTABLE_END
