// Portable build of the CPU rotary embedding: per head, the pairs turned in the compute type
// (fp32; fp64 for fp64) and rounded once, then the pass-through channels copied. The
// half-split layout's loop reads and writes two contiguous runs, which the compiler
// vectorizes; the interleaved one reads pairs.
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "rope_rows.h"
#include "cpu/portable.h"
#include "cpu/portable_math.h"

FASTARCH_PORTABLE_BEGIN

namespace fastarch::cpu {
namespace {

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
  static Acc widen(T v) { return portable::half_to_float(v); }
  static T narrow(Acc v) { return portable::float_to_half(v); }
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

#ifdef FASTARCH_PORTABLE_AVX2
// An fp16 head in the AVX2 build is turned in fp32 buffers, widened and narrowed a vector at a
// time by F16C (portable::widen_n / narrow_n) where the bit conversions cost ~10 instructions
// a value (0.6-0.9x PyTorch's fp16 forward): the same values. Rotary dims up to kStagedDims.
constexpr int64_t kStagedDims = 512;

template <bool Interleaved>
void turn_head_staged(const uint16_t* x, uint16_t* y, const float* cos, const float* sin, float sign, int64_t half,
                      int64_t head_dim) {
  const int64_t n = 2 * half;
  const auto* xh = reinterpret_cast<const c10::Half*>(x);
  auto* yh = reinterpret_cast<c10::Half*>(y);
  float in[kStagedDims], out[kStagedDims];
  portable::widen_n(xh, in, n);
  turn_head<Types<Dtype::f32>, Interleaved>(in, out, cos, sin, sign, half, n);
  portable::narrow_n(out, yh, n);
  if (head_dim > n) std::memcpy(y + n, x + n, (head_dim - n) * sizeof(uint16_t));
}
#endif

template <Dtype D, bool Interleaved>
void rows(const RopeParams& p, int64_t begin, int64_t end) {
  using T = typename Types<D>::T;
  using Acc = typename Types<D>::Acc;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const Acc* cos = static_cast<const Acc*>(p.cos);
  const Acc* sin = static_cast<const Acc*>(p.sin);
  const Acc sign = p.inverse ? Acc(-1) : Acc(1);  // exact: negating sin rounds nothing
  RopeRows it(p, begin);
  for (int64_t r = begin; r < end; ++r, it.next()) {
    const RopeRow& row = *it;
    const int64_t pos = rope_position(p, row);
    const T* xr = x + row.b * p.x_stride_b + row.h * p.x_stride_h + row.s * p.x_stride_s;
    T* yr = out + row.b * p.out_stride_b + row.h * p.out_stride_h + row.s * p.out_stride_s;
#ifdef FASTARCH_PORTABLE_AVX2
    if constexpr (D == Dtype::f16) {
      if (2 * p.half <= kStagedDims) {
        turn_head_staged<Interleaved>(xr, yr, cos + pos * p.half, sin + pos * p.half, sign, p.half, p.head_dim);
        continue;
      }
    }
#endif
    turn_head<Types<D>, Interleaved>(xr, yr, cos + pos * p.half, sin + pos * p.half, sign, p.half, p.head_dim);
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
