// Portable build of the CPU rotary embedding: per head, the pairs turned in the compute type
// (fp32; fp64 for fp64) and rounded once, then the pass-through channels copied. The
// half-split layout's loop reads and writes two contiguous runs, which the compiler
// vectorizes; the interleaved one reads pairs.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>

#include "rope_rows.h"

namespace fastarch::cpu {
namespace {

template <RopeDtype D>
struct Types;
template <>
struct Types<RopeDtype::f32> {
  using T = float;
  using Acc = float;
};
template <>
struct Types<RopeDtype::f64> {
  using T = double;
  using Acc = double;
};
template <>
struct Types<RopeDtype::f16> {
  using T = c10::Half;
  using Acc = float;
};
template <>
struct Types<RopeDtype::bf16> {
  using T = c10::BFloat16;
  using Acc = float;
};

template <typename T, typename Acc, bool Interleaved>
void turn_head(const T* x, T* y, const Acc* cos, const Acc* sin, Acc sign, int64_t half, int64_t head_dim) {
  if constexpr (Interleaved) {
    for (int64_t i = 0; i < half; ++i) {
      const Acc c = cos[i], s = sign * sin[i];
      const Acc x1 = static_cast<Acc>(x[2 * i]), x2 = static_cast<Acc>(x[2 * i + 1]);
      y[2 * i] = static_cast<T>(x1 * c - x2 * s);
      y[2 * i + 1] = static_cast<T>(x2 * c + x1 * s);
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      const Acc c = cos[i], s = sign * sin[i];
      const Acc x1 = static_cast<Acc>(x[i]), x2 = static_cast<Acc>(x[i + half]);
      y[i] = static_cast<T>(x1 * c - x2 * s);
      y[i + half] = static_cast<T>(x2 * c + x1 * s);
    }
  }
  if (head_dim > 2 * half) std::memcpy(y + 2 * half, x + 2 * half, (head_dim - 2 * half) * sizeof(T));
}

template <RopeDtype D, bool Interleaved>
void rows(const RopeParams& p, int64_t begin, int64_t end) {
  using T = typename Types<D>::T;
  using Acc = typename Types<D>::Acc;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const Acc* cos = static_cast<const Acc*>(p.cos);
  const Acc* sin = static_cast<const Acc*>(p.sin);
  const Acc sign = p.inverse ? Acc(-1) : Acc(1);  // exact: negating sin rounds nothing
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / p.seqlen, s = r % p.seqlen;
    int64_t pos = p.positions ? p.positions[b * p.pos_stride_b + s * p.pos_stride_s] : 0;
    if (p.add_s) pos += s;
    const Acc* c = cos + pos * p.half;
    const Acc* sn = sin + pos * p.half;
    for (int64_t h = 0; h < p.heads; ++h) {
      turn_head<T, Acc, Interleaved>(x + b * p.x_stride_b + h * p.x_stride_h + s * p.x_stride_s,
                                     out + b * p.out_stride_b + h * p.out_stride_h + s * p.out_stride_s, c, sn, sign,
                                     p.half, p.head_dim);
    }
  }
}

}  // namespace

template <RopeDtype D>
void rope_rows_generic(const RopeParams& p, int64_t begin, int64_t end) {
  if (p.interleaved) {
    rows<D, true>(p, begin, end);
  } else {
    rows<D, false>(p, begin, end);
  }
}

template void rope_rows_generic<RopeDtype::f32>(const RopeParams&, int64_t, int64_t);
template void rope_rows_generic<RopeDtype::f64>(const RopeParams&, int64_t, int64_t);
template void rope_rows_generic<RopeDtype::f16>(const RopeParams&, int64_t, int64_t);
template void rope_rows_generic<RopeDtype::bf16>(const RopeParams&, int64_t, int64_t);

}  // namespace fastarch::cpu
