// Portable build of the CPU rotary embedding: per head, the pairs turned in the compute type
// (fp32; fp64 for fp64) and rounded once, then the pass-through channels copied. The
// half-split layout's loop reads and writes two contiguous runs, which the compiler
// vectorizes; the interleaved one reads pairs.
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "rope_rows.h"
#include "cpu/portable.h"

FASTARCH_PORTABLE_BEGIN

namespace fastarch::cpu {
namespace {

// fp16 <-> fp32 without branches (c10::Half's conversions branch per value, which keeps the
// loops scalar: ~8x slower than PyTorch's own fp16 kernels here). Both exact / round to
// nearest even, with inf and NaN kept; they rely on IEEE fp32 arithmetic with denormals.
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Selections by mask rather than ?:, which the compiler may turn into branches (and then
// leaves the loop scalar).
inline uint32_t all_ones_if(bool c) { return 0u - static_cast<uint32_t>(c); }
inline uint32_t select(bool c, uint32_t a, uint32_t b) { return (a & all_ones_if(c)) | (b & ~all_ones_if(c)); }

inline float half_to_float(uint16_t h) {
  const uint32_t magnitude = h & 0x7FFFu;
  // The fp16 exponent and mantissa placed in an fp32's, rebiased (127 - 15) by multiplying by
  // 2^112: exact for normal and subnormal halves alike.
  uint32_t u = float_bits(bits_float(magnitude << 13) * 0x1p112f);
  u |= all_ones_if(magnitude >= 0x7C00u) & 0x7F800000u;  // inf and NaN: the exponent all ones
  return bits_float(u | (uint32_t(h & 0x8000u) << 16));
}

inline uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // Below 2^-14 (fp16 subnormals): adding 0.5 makes the fp32 ulp 2^-24, fp16's subnormal
  // step, so the FPU rounds to nearest even and the low bits of the sum count the steps.
  const uint32_t small = float_bits(bits_float(a) + 0.5f) - 0x3F000000u;
  // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even; a
  // carry runs into the exponent, up to inf (0x7C00) from 65520 on.
  const uint32_t normal = (a + (uint32_t(15 - 127) << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  uint32_t h = select(a < 0x38800000u, small, normal);
  h = select(a >= 0x47800000u, 0x7C00u, h);  // 65536 and up: inf
  h = select(a > 0x7F800000u, 0x7E00u, h);   // NaN (quiet)
  return static_cast<uint16_t>(h | sign);
}

template <Dtype D>
struct Types;
template <>
struct Types<Dtype::f32> {
  using T = float;
  using Acc = float;
  static Acc widen(T v) { return v; }
  static T narrow(Acc v) { return v; }
};
template <>
struct Types<Dtype::f64> {
  using T = double;
  using Acc = double;
  static Acc widen(T v) { return v; }
  static T narrow(Acc v) { return v; }
};
template <>
struct Types<Dtype::f16> {
  using T = uint16_t;  // fp16 bits
  using Acc = float;
  static Acc widen(T v) { return half_to_float(v); }
  static T narrow(Acc v) { return float_to_half(v); }
};
template <>
struct Types<Dtype::bf16> {
  using T = c10::BFloat16;
  using Acc = float;
  static Acc widen(T v) { return static_cast<float>(v); }
  static T narrow(Acc v) { return static_cast<T>(v); }
};

template <typename Ty, bool Interleaved>
void turn_head(const typename Ty::T* x, typename Ty::T* y, const typename Ty::Acc* cos, const typename Ty::Acc* sin,
               typename Ty::Acc sign, int64_t half, int64_t head_dim) {
  using Acc = typename Ty::Acc;
  using T = typename Ty::T;
  if constexpr (Interleaved) {
    for (int64_t i = 0; i < half; ++i) {
      const Acc c = cos[i], s = sign * sin[i];
      const Acc x1 = Ty::widen(x[2 * i]), x2 = Ty::widen(x[2 * i + 1]);
      y[2 * i] = Ty::narrow(x1 * c - x2 * s);
      y[2 * i + 1] = Ty::narrow(x2 * c + x1 * s);
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      const Acc c = cos[i], s = sign * sin[i];
      const Acc x1 = Ty::widen(x[i]), x2 = Ty::widen(x[i + half]);
      y[i] = Ty::narrow(x1 * c - x2 * s);
      y[i + half] = Ty::narrow(x2 * c + x1 * s);
    }
  }
  if (head_dim > 2 * half) std::memcpy(y + 2 * half, x + 2 * half, (head_dim - 2 * half) * sizeof(T));
}

template <Dtype D, bool Interleaved>
void rows(const RopeParams& p, int64_t begin, int64_t end) {
  using T = typename Types<D>::T;
  using Acc = typename Types<D>::Acc;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const Acc* cos = static_cast<const Acc*>(p.cos);
  const Acc* sin = static_cast<const Acc*>(p.sin);
  const Acc sign = p.inverse ? Acc(-1) : Acc(1);  // exact: negating sin rounds nothing
  for (int64_t r = begin; r < end; ++r) {
    const RopeRow row = rope_row(p, r);
    const int64_t pos = rope_position(p, row);
    turn_head<Types<D>, Interleaved>(x + row.b * p.x_stride_b + row.h * p.x_stride_h + row.s * p.x_stride_s,
                                   out + row.b * p.out_stride_b + row.h * p.out_stride_h + row.s * p.out_stride_s,
                                   cos + pos * p.half, sin + pos * p.half, sign, p.half, p.head_dim);
  }
}

}  // namespace

template <Isa I, Dtype D>
void rope_rows_generic(const RopeParams& p, int64_t begin, int64_t end) {
  if (p.interleaved) {
    rows<D, true>(p, begin, end);
  } else {
    rows<D, false>(p, begin, end);
  }
}

template void rope_rows_generic<kPortableBuild, Dtype::f32>(const RopeParams&, int64_t, int64_t);
template void rope_rows_generic<kPortableBuild, Dtype::f64>(const RopeParams&, int64_t, int64_t);
template void rope_rows_generic<kPortableBuild, Dtype::f16>(const RopeParams&, int64_t, int64_t);
template void rope_rows_generic<kPortableBuild, Dtype::bf16>(const RopeParams&, int64_t, int64_t);

}  // namespace fastarch::cpu

FASTARCH_PORTABLE_END
