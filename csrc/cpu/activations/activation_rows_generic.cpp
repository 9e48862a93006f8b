// Portable build of the CPU activation row kernels: for CPUs without AVX-512 and for fp64. The
// math is in the accumulation type: fp32's exp is portable_math.h's exp_f32 (2 ulp, and loops of
// it vectorize) and its erfc the AVX-512 build's polynomial, fp64's exp and erfc the C
// library's. Each loop is compiled per activation, so that the SiLU and
// tanh-GELU ones vectorize; values are widened and narrowed by portable::widen / narrow, whose
// fp16 conversions vectorize too (c10::Half's, value by value, had left the fp16 loops at a
// tenth of PyTorch's speed at level avx2).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>

#include "activation_rows.h"
#include "cpu/portable.h"
#include "cpu/portable_math.h"

FASTARCH_PORTABLE_BEGIN

namespace fastarch::cpu::act {
namespace {

template <Dtype D>
struct Types;
template <>
struct Types<Dtype::f32> {
  using T = float;
  using Acc = float;
};
template <>
struct Types<Dtype::f64> {
  using T = double;
  using Acc = double;
};
template <>
struct Types<Dtype::f16> {
  using T = c10::Half;
  using Acc = float;
};
template <>
struct Types<Dtype::bf16> {
  using T = c10::BFloat16;
  using Acc = float;
};

// The per-element functions the row loops call: always inlined. GCC kept some out of line (the
// gradients, parts of grad's switch), a call per element that left the tanh-GELU backward's
// loop scalar.
#define FASTARCH_ALWAYS_INLINE __attribute__((always_inline)) inline

constexpr double kSqrtHalf = 0.70710678118654752440;      // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;    // 1 / sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;   // sqrt(2 / pi)
constexpr double kTanhCubic = 0.044715;

template <typename Acc>
inline Acc exp_acc(Acc x) {
  if constexpr (std::is_same_v<Acc, float>) {
    return portable::exp_f32(x);
  } else {
    return std::exp(x);
  }
}

// cond ? a : b, both computed: for fp32 a select of bits (GCC vectorizes no select whose arms
// compute in floating point, see portable_math.h's keep_if).
template <typename Acc>
inline Acc pick(bool cond, Acc a, Acc b) {
  if constexpr (std::is_same_v<Acc, float>) {
    uint32_t ua, ub;
    std::memcpy(&ua, &a, 4);
    std::memcpy(&ub, &b, 4);
    const uint32_t m = 0u - static_cast<uint32_t>(cond);
    const uint32_t u = (ua & m) | (ub & ~m);
    float out;
    std::memcpy(&out, &u, 4);
    return out;
  } else {
    return cond ? a : b;
  }
}

// sigmoid(v) and 1 - sigmoid(v), each without cancellation: 1 - s is e s where e = exp(-v) < 1
// (s near 1), and the subtraction itself where s <= 1/2 (e there may be inf).
template <typename Acc>
struct Sigmoid {
  Acc s, one_minus_s;
  explicit Sigmoid(Acc v) {
    const Acc e = exp_acc(-v);
    s = Acc(1) / (Acc(1) + e);
    one_minus_s = pick(e < Acc(1), e * s, Acc(1) - s);
  }
};

// Phi(h) = erfc(-h / sqrt 2) / 2: no cancellation for negative h, where 1 + erf would lose
// every digit. h Phi(h) gives inf at +inf and NaN at -inf (inf * 0), as torch's F.gelu.
// fp32: erfc(|h| / sqrt 2) as t exp(-h^2/2) Q(s), t = 1 / (1 + |h| / (2 sqrt 2)), the AVX-512
// build's formula and degree-10 polynomial (activation_rows_avx512.cpp: relative error 9.4e-9),
// in operations that vectorize; |h| capped at 1e4 (erfc is 0 there through the exp anyway; a
// NaN passes the cap).
constexpr float kErfcQ[11] = {
    0.5720119740348028f,    0.3262225158380577f,    0.1020298861212319f,   0.005962600693706014f,
    -0.006155051567403365f, -0.0006188299506934053f, 0.0005988707892591491f, 3.536675358016485e-06f,
    -6.928564257153684e-05f, 7.203381664866606e-06f, 6.589006384277334e-06f,
};

inline float gelu_cdf_f32(float h) {
  const float a = __builtin_fabsf(h);
  const float capped = pick(a > 1e4f, 1e4f, a);
  const float t = 1.0f / portable::madd_f32(capped, 0.35355339059327376f, 1.0f);
  const float s = portable::madd_f32(t, 12.0f / 5, -7.0f / 5);  // (t - 7/12) / (5/12)
  float q = kErfcQ[10];  // (Horner's rule written out: a loop here keeps the row's loop scalar)
  q = portable::madd_f32(q, s, kErfcQ[9]);
  q = portable::madd_f32(q, s, kErfcQ[8]);
  q = portable::madd_f32(q, s, kErfcQ[7]);
  q = portable::madd_f32(q, s, kErfcQ[6]);
  q = portable::madd_f32(q, s, kErfcQ[5]);
  q = portable::madd_f32(q, s, kErfcQ[4]);
  q = portable::madd_f32(q, s, kErfcQ[3]);
  q = portable::madd_f32(q, s, kErfcQ[2]);
  q = portable::madd_f32(q, s, kErfcQ[1]);
  q = portable::madd_f32(q, s, kErfcQ[0]);
  const float half_e = t * q * portable::exp_f32(a * a * -0.5f) * 0.5f;
  return pick(h > 0.0f, 1.0f - half_e, half_e);
}

template <typename Acc>
Acc gelu_cdf(Acc h) {
  if constexpr (std::is_same_v<Acc, float>) {
    return gelu_cdf_f32(h);
  } else {
    return Acc(0.5) * std::erfc(-h * Acc(kSqrtHalf));
  }
}
template <typename Acc>
Acc gelu_erf(Acc h) {
  return h * gelu_cdf(h);
}
template <typename Acc>
FASTARCH_ALWAYS_INLINE Acc gelu_erf_grad(Acc h, Acc cdf) {
  return cdf + h * Acc(kInvSqrt2Pi) * exp_acc(Acc(-0.5) * h * h);
}
template <typename Acc>
FASTARCH_ALWAYS_INLINE Acc gelu_erf_grad(Acc h) {
  return gelu_erf_grad(h, gelu_cdf(h));
}

// 0.5 h (1 + tanh u) = h sigmoid(2u), u = sqrt(2/pi) (h + 0.044715 h^3): no cancellation.
template <typename Acc>
Acc tanh_arg2(Acc h) {  // 2u
  return Acc(2 * kSqrt2OverPi) * h * (Acc(1) + Acc(kTanhCubic) * h * h);
}
template <typename Acc>
Acc gelu_tanh(Acc h) {
  return h * Sigmoid<Acc>(tanh_arg2(h)).s;
}
// d/dh = s + h s (1 - s) d(2u)/dh, d(2u)/dh = 2 sqrt(2/pi) (1 + 3 * 0.044715 h^2), summed as
// g 2 sqrt(2/pi) + (g h) (h 6 * 0.044715 sqrt(2/pi)) with g = h s (1 - s): g is exactly 0
// wherever h^2 would overflow, so a huge finite h gets its limit (1 or 0), not inf * 0.
template <typename Acc>
FASTARCH_ALWAYS_INLINE Acc gelu_tanh_grad(Acc h, const Sigmoid<Acc>& sg) {  // sg = Sigmoid(tanh_arg2(h))
  const Acc g = h * sg.s * sg.one_minus_s;
  return sg.s + g * Acc(2 * kSqrt2OverPi) + (g * h) * (h * Acc(6 * kTanhCubic * kSqrt2OverPi));
}
template <typename Acc>
FASTARCH_ALWAYS_INLINE Acc gelu_tanh_grad(Acc h) {
  return gelu_tanh_grad(h, Sigmoid<Acc>(tanh_arg2(h)));
}

// f(h) of each activation, f'(h), and both from one evaluation of the shared erfc / sigmoid
// (the gated backward wants the two).
template <typename Acc>
FASTARCH_ALWAYS_INLINE Acc value(Activation act, Acc h) {
  switch (act) {
    case Activation::gelu_erf:
      return gelu_erf(h);
    case Activation::gelu_tanh:
      return gelu_tanh(h);
    case Activation::silu:
      break;
  }
  return h * Sigmoid<Acc>(h).s;
}

// silu' = s + h s (1 - s) = s (1 + h (1 - s)).
template <typename Acc>
Acc silu_grad(Acc h, const Sigmoid<Acc>& sg) {
  return sg.s * (Acc(1) + h * sg.one_minus_s);
}

template <typename Acc>
FASTARCH_ALWAYS_INLINE Acc grad(Activation act, Acc h) {
  switch (act) {
    case Activation::gelu_erf:
      return gelu_erf_grad(h);
    case Activation::gelu_tanh:
      return gelu_tanh_grad(h);
    case Activation::silu:
      break;
  }
  return silu_grad(h, Sigmoid<Acc>(h));
}

template <typename Acc>
struct ValueGrad {
  Acc value, grad;
};
template <typename Acc>
FASTARCH_ALWAYS_INLINE ValueGrad<Acc> value_and_grad(Activation act, Acc h) {
  switch (act) {
    case Activation::gelu_erf: {
      const Acc cdf = gelu_cdf(h);
      return {h * cdf, gelu_erf_grad(h, cdf)};
    }
    case Activation::gelu_tanh: {
      const Sigmoid<Acc> sg(tanh_arg2(h));
      return {h * sg.s, gelu_tanh_grad(h, sg)};
    }
    case Activation::silu:
      break;
  }
  const Sigmoid<Acc> sg(h);
  return {h * sg.s, silu_grad(h, sg)};
}

// One row's forward: y = f(a) b (gated, b = up), f(a + bias), or f(a); In, Out: the row's
// element types (T, or float for a staged row).
template <Activation A, typename In, typename Out>
void forward_row(const In* a, const In* b, const In* bias, Out* y, int64_t cols) {
  if (b) {
    for (int64_t c = 0; c < cols; ++c)
      y[c] = portable::narrow<Out>(value(A, portable::widen(a[c])) * portable::widen(b[c]));
  } else if (bias) {  // (separate loops: a load under a condition keeps a loop from vectorizing)
    for (int64_t c = 0; c < cols; ++c)
      y[c] = portable::narrow<Out>(value(A, portable::widen(a[c]) + portable::widen(bias[c])));
  } else {
    for (int64_t c = 0; c < cols; ++c) y[c] = portable::narrow<Out>(value(A, portable::widen(a[c])));
  }
}

// One row's backward: da (and db when gated; dbias accumulated when given), as forward_row.
template <Activation A, typename In, typename Out, typename Acc>
void backward_row(const In* dy, const In* a, const In* b, const In* bias, Out* da, Out* db, Acc* dbias, int64_t cols) {
  if (b) {  // y = f(g) u: dy/dg = u f'(g), dy/du = f(g)
    for (int64_t c = 0; c < cols; ++c) {
      const Acc d = portable::widen(dy[c]);
      const ValueGrad<Acc> f = value_and_grad(A, static_cast<Acc>(portable::widen(a[c])));
      da[c] = portable::narrow<Out>(d * portable::widen(b[c]) * f.grad);
      db[c] = portable::narrow<Out>(d * f.value);
    }
    return;
  }
  const auto run = [&](auto with_bias, auto with_dbias) {  // (a loop per case: conditions in it keep it scalar)
    for (int64_t c = 0; c < cols; ++c) {
      const Acc h = with_bias ? portable::widen(a[c]) + portable::widen(bias[c]) : portable::widen(a[c]);
      const Acc g = portable::widen(dy[c]) * grad(A, h);
      da[c] = portable::narrow<Out>(g);
      if (with_dbias) dbias[c] += g;
    }
  };
  if (!bias) {
    run(std::false_type{}, std::false_type{});
  } else if (dbias) {
    run(std::true_type{}, std::true_type{});
  } else {
    run(std::true_type{}, std::false_type{});
  }
}

// fp16 rows in the AVX2 build go through fp32 blocks of kStage values, widened and narrowed a
// vector at a time by F16C (portable::widen_n / narrow_n): the vectorized bit conversions of
// portable::widen / narrow cost ~10 instructions a value, F16C one per 8 (the same values,
// rounded to nearest even). The blocks stay in L1.
#ifdef FASTARCH_PORTABLE_AVX2
template <typename T>
constexpr bool kStaged = std::is_same_v<T, c10::Half>;
#else
template <typename T>
constexpr bool kStaged = false;
#endif
constexpr int64_t kStage = 256;

template <Activation A, Dtype D>
void forward_rows_as(const ActivationForwardParams& p, int64_t begin, int64_t end) {
  using T = typename Types<D>::T;
  const T* bias = static_cast<const T*>(p.bias);
  for (int64_t r = begin; r < end; ++r) {
    const T* a = static_cast<const T*>(p.a) + r * p.a_row_stride;
    const T* b = p.b ? static_cast<const T*>(p.b) + r * p.b_row_stride : nullptr;
    T* y = static_cast<T*>(p.y) + r * p.cols;
    if constexpr (kStaged<T>) {
      float fa[kStage], fb[kStage], fbias[kStage], fy[kStage];
      for (int64_t c0 = 0; c0 < p.cols; c0 += kStage) {
        const int64_t n = std::min(kStage, p.cols - c0);
        portable::widen_n(a + c0, fa, n);
        if (b) portable::widen_n(b + c0, fb, n);
        if (bias) portable::widen_n(bias + c0, fbias, n);
        forward_row<A>(fa, b ? fb : nullptr, bias ? fbias : nullptr, fy, n);
        portable::narrow_n(fy, y + c0, n);
      }
    } else {
      forward_row<A>(a, b, b ? nullptr : bias, y, p.cols);
    }
  }
}

template <Activation A, Dtype D>
void backward_rows_as(const ActivationBackwardParams& p, int64_t begin, int64_t end, void* dbias_acc) {
  using T = typename Types<D>::T;
  using Acc = typename Types<D>::Acc;
  const T* bias = p.b ? nullptr : static_cast<const T*>(p.bias);
  Acc* dbias = p.b ? nullptr : static_cast<Acc*>(dbias_acc);
  for (int64_t r = begin; r < end; ++r) {
    const T* dy = static_cast<const T*>(p.dy) + r * p.dy_row_stride;
    const T* a = static_cast<const T*>(p.a) + r * p.a_row_stride;
    const T* b = p.b ? static_cast<const T*>(p.b) + r * p.b_row_stride : nullptr;
    T* da = static_cast<T*>(p.da) + r * p.da_row_stride;
    T* db = p.b ? static_cast<T*>(p.db) + r * p.db_row_stride : nullptr;
    if constexpr (kStaged<T>) {
      float fdy[kStage], fa[kStage], fb[kStage], fbias[kStage], fda[kStage], fdb[kStage];
      for (int64_t c0 = 0; c0 < p.cols; c0 += kStage) {
        const int64_t n = std::min(kStage, p.cols - c0);
        portable::widen_n(dy + c0, fdy, n);
        portable::widen_n(a + c0, fa, n);
        if (b) portable::widen_n(b + c0, fb, n);
        if (bias) portable::widen_n(bias + c0, fbias, n);
        backward_row<A>(fdy, fa, b ? fb : nullptr, bias ? fbias : nullptr, fda, fdb, dbias ? dbias + c0 : nullptr, n);
        portable::narrow_n(fda, da + c0, n);
        if (b) portable::narrow_n(fdb, db + c0, n);
      }
    } else {
      backward_row<A>(dy, a, b, bias, da, db, dbias, p.cols);
    }
  }
}

// The loops above compiled for p.act.
template <Dtype D>
void forward_rows(const ActivationForwardParams& p, int64_t begin, int64_t end) {
  switch (p.act) {
    case Activation::gelu_erf:
      return forward_rows_as<Activation::gelu_erf, D>(p, begin, end);
    case Activation::gelu_tanh:
      return forward_rows_as<Activation::gelu_tanh, D>(p, begin, end);
    case Activation::silu:
      return forward_rows_as<Activation::silu, D>(p, begin, end);
  }
}

template <Dtype D>
void backward_rows(const ActivationBackwardParams& p, int64_t begin, int64_t end, void* dbias_acc) {
  switch (p.act) {
    case Activation::gelu_erf:
      return backward_rows_as<Activation::gelu_erf, D>(p, begin, end, dbias_acc);
    case Activation::gelu_tanh:
      return backward_rows_as<Activation::gelu_tanh, D>(p, begin, end, dbias_acc);
    case Activation::silu:
      return backward_rows_as<Activation::silu, D>(p, begin, end, dbias_acc);
  }
}

}  // namespace

template <Isa I, Dtype D>
void activation_forward_rows_generic(const ActivationForwardParams& p, int64_t begin, int64_t end) {
  forward_rows<D>(p, begin, end);
}
template <Isa I, Dtype D>
void activation_backward_rows_generic(const ActivationBackwardParams& p, int64_t begin, int64_t end, void* dbias_acc) {
  backward_rows<D>(p, begin, end, dbias_acc);
}

#define FASTARCH_INSTANTIATE(D)                                                                               \
  template void activation_forward_rows_generic<kPortableBuild, D>(const ActivationForwardParams&, int64_t, int64_t);         \
  template void activation_backward_rows_generic<kPortableBuild, D>(const ActivationBackwardParams&, int64_t, int64_t, void*);
FASTARCH_INSTANTIATE(Dtype::f32)
FASTARCH_INSTANTIATE(Dtype::f64)
FASTARCH_INSTANTIATE(Dtype::f16)
FASTARCH_INSTANTIATE(Dtype::bf16)
#undef FASTARCH_INSTANTIATE

}  // namespace fastarch::cpu::act

FASTARCH_PORTABLE_END
