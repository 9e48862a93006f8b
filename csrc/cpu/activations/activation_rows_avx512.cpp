// AVX-512 build of the CPU activation row kernels (fp32, fp16, bf16; math in fp32).
//
// 16 columns at a time: widen to fp32, add the (fp32) bias, evaluate, round once, store
// (streaming stores for large outputs, as the norms). exp, the normal CDF and the sigmoid are
// evaluated with their own polynomials (below and cpu/avx512_math.h), accurate to a few fp32 ulps (to the
// dtype for 16-bit inputs: kLow).
//
// The whole file is compiled for AVX-512 through the target pragma below and is only called
// after a run-time CPU check, so the extension still loads on CPUs without it. It includes no
// torch headers, so no inline function of theirs is emitted with AVX-512 instructions.
#include <immintrin.h>

#include <cstdint>

#include "activation_rows.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

#include "cpu/avx512_math.h"

namespace fastarch::cpu::act {
namespace {

// Lanes (16 values <-> 16 fp32 lanes), splat, horner, exp_ps and sigmoid: cpu/avx512_math.h.
template <Dtype D, bool kBf16Insn>
using Lanes = avx512::LanesOf<D, kBf16Insn>;
using avx512::exp_ps;
using avx512::horner;
using avx512::sigmoid;
using avx512::Sigmoid;
using avx512::splat;

// ------------------------------------------------------------------ math

// erfc(z) for z >= 0 as t exp(-z^2) Q(s), t = 1 / (1 + z/2), s = (t - 7/12) / (5/12): Q
// approximates erfc(z) exp(z^2) / t, a smooth function of t in [1/6, 1] (z in [0, 10]; past
// 10, erfc underflows fp32 anyway) with values in [0.4, 1], by a degree-10 polynomial fitted to
// it in fp64 (least squares on Chebyshev nodes, reweighted toward equal relative ripple): max
// relative error 9.4e-9. In s the coefficients are small (sum of magnitudes 1.01), so Horner's
// rule adds no cancellation. The error of the whole fp32 evaluation of gelu against fp64 is a
// few ulps times 1 + h^2 (the condition number of erfc in the negative tail), where torch's
// F.gelu in fp32 (1 + erf) loses every digit below h ~ -3.
constexpr float kErfcQ[11] = {
    0.5720119740348028f,    0.3262225158380577f,    0.1020298861212319f,   0.005962600693706014f,
    -0.006155051567403365f, -0.0006188299506934053f, 0.0005988707892591491f, 3.536675358016485e-06f,
    -6.928564257153684e-05f, 7.203381664866606e-06f, 6.589006384277334e-06f,
};
// kLow: degree 6, max relative error 6.2e-6.
constexpr float kErfcQLow[7] = {
    0.5720127493645507f,   0.32621754296761263f, 0.10200060917565677f,  0.005982334128838787f,
    -0.006025431309105294f, -0.000626065046006547f, 0.0004320778238055832f,
};

// t Q(s) for z = |h| / sqrt 2 (so z / 2 = |h| / (2 sqrt 2)). 1 / (1 + z/2) by vrcp14ps and one
// Newton step (relative error ~2^-28; cheaper than vdivps), with |h| capped at 1e4 so that the
// step never meets inf * 0 (erfc is 0 there through exp(-h^2/2) anyway; NaN passes the cap).
template <bool kLow>
inline __m512 erfc_scaled(__m512 abs_h) {
  const __m512 d = _mm512_fmadd_ps(_mm512_min_ps(splat(1e4f), abs_h), splat(0.35355339059327376f), splat(1.0f));
  const __m512 r = _mm512_rcp14_ps(d);
  const __m512 t = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, splat(2.0f)));
  const __m512 s = _mm512_fmsub_ps(t, splat(12.0f / 5), splat(7.0f / 5));  // (t - 7/12) / (5/12)
  return _mm512_mul_ps(t, kLow ? horner(kErfcQLow, s) : horner(kErfcQ, s));
}

// Phi(h) from e = erfc(|h| / sqrt 2): 1 - e/2 for h > 0, e/2 otherwise (NaN stays NaN).
inline __m512 phi_from_erfc(__m512 h, __m512 e) {
  const __mmask16 pos = _mm512_cmp_ps_mask(h, _mm512_setzero_ps(), _CMP_GT_OQ);
  const __m512 half_e = _mm512_mul_ps(e, splat(0.5f));
  return _mm512_mask_blend_ps(pos, half_e, _mm512_sub_ps(splat(1.0f), half_e));
}

// f(h) and f'(h) of one activation, from one evaluation of what they share.
struct ValueGrad {
  __m512 value, grad;
};

// gelu(h) = h Phi(h) (inf at +inf, NaN at -inf (inf * 0), as torch); gelu'(h) = Phi(h) +
// h exp(-h^2/2) / sqrt(2 pi): one exp serves both terms.
template <bool kLow>
inline ValueGrad gelu_erf_value_grad(__m512 h) {
  const __m512 a = _mm512_abs_ps(h);
  const __m512 g = exp_ps<kLow>(_mm512_mul_ps(_mm512_mul_ps(a, a), splat(-0.5f)));
  const __m512 phi = phi_from_erfc(h, _mm512_mul_ps(erfc_scaled<kLow>(a), g));
  return {_mm512_mul_ps(h, phi), _mm512_fmadd_ps(_mm512_mul_ps(h, splat(0.3989422804014327f)), g, phi)};
}

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kTanhCubic = 0.044715f;

// 0.5 h (1 + tanh u) = h sigmoid(2u), u = sqrt(2/pi) (h + 0.044715 h^3).
inline __m512 tanh_arg2(__m512 h) {
  const __m512 inner = _mm512_fmadd_ps(_mm512_mul_ps(h, h), splat(kTanhCubic), splat(1.0f));
  return _mm512_mul_ps(_mm512_mul_ps(h, splat(2 * kSqrt2OverPi)), inner);
}
// d/dh = s + h s (1 - s) 2 sqrt(2/pi) (1 + 3 * 0.044715 h^2), summed as g 2 sqrt(2/pi) +
// (g h) (h 6 * 0.044715 sqrt(2/pi)) with g = h s (1 - s): g is exactly 0 wherever h^2 would
// overflow, so a huge finite h gets its limit (1 or 0), not inf * 0.
template <bool kLow>
inline ValueGrad gelu_tanh_value_grad(__m512 h) {
  const Sigmoid sg = sigmoid<kLow>(tanh_arg2(h));
  const __m512 g = _mm512_mul_ps(_mm512_mul_ps(h, sg.s), sg.one_minus_s);
  const __m512 quad = _mm512_mul_ps(_mm512_mul_ps(g, h), _mm512_mul_ps(h, splat(6 * kTanhCubic * kSqrt2OverPi)));
  return {_mm512_mul_ps(h, sg.s), _mm512_add_ps(_mm512_fmadd_ps(g, splat(2 * kSqrt2OverPi), sg.s), quad)};
}

// silu(h) = h s, silu'(h) = s (1 + h (1 - s)), s = sigmoid(h).
template <bool kLow>
inline ValueGrad silu_value_grad(__m512 h) {
  const Sigmoid sg = sigmoid<kLow>(h);
  return {_mm512_mul_ps(h, sg.s), _mm512_mul_ps(sg.s, _mm512_fmadd_ps(h, sg.one_minus_s, splat(1.0f)))};
}

// The forward uses .value, the single-input backward .grad: the compiler drops what is unused.
template <Activation kAct, bool kLow>
inline ValueGrad value_grad(__m512 h) {
  if constexpr (kAct == Activation::gelu_erf) {
    return gelu_erf_value_grad<kLow>(h);
  } else if constexpr (kAct == Activation::gelu_tanh) {
    return gelu_tanh_value_grad<kLow>(h);
  } else {
    return silu_value_grad<kLow>(h);
  }
}

// ------------------------------------------------------------------ the row loops

template <typename L>
inline const void* at(const void* row, int64_t c) {
  return static_cast<const char*>(row) + c * L::kBytes;
}
template <typename L>
inline void* at(void* row, int64_t c) {
  return static_cast<char*>(row) + c * L::kBytes;
}

// One chunk of results: a streaming store for a full chunk when kStream, else a masked one.
template <typename L, bool kStream>
inline void put(void* p, __m512 v, __mmask16 m) {
  if (kStream && m == 0xFFFF) {
    L::stream(p, v);
  } else {
    L::store(p, v, m);
  }
}

// Every chunk of 16 columns of rows [begin, end): fn(c, mask) for columns c .. c + 15.
template <typename Fn>
inline void for_each_chunk(int64_t cols, Fn fn) {
  int64_t c = 0;
  for (; c + 16 <= cols; c += 16) fn(c, static_cast<__mmask16>(0xFFFF));
  if (c < cols) fn(c, static_cast<__mmask16>((1u << (cols - c)) - 1));
}

// kGated: y = f(a) b (b = up), else y = f(a + bias).
template <typename L, bool kStream, Activation kAct, bool kGated>
void forward_rows(const ActivationForwardParams& p, int64_t begin, int64_t end, const float* bias) {
  constexpr bool kLow = L::kBytes == 2;
  for (int64_t r = begin; r < end; ++r) {
    const void* a = at<L>(p.a, r * p.a_row_stride);
    const void* b = kGated ? at<L>(p.b, r * p.b_row_stride) : nullptr;
    void* y = at<L>(p.y, r * p.cols);
    for_each_chunk(p.cols, [&](int64_t c, __mmask16 m) {
      __m512 h = L::load(at<L>(a, c), m);
      if (!kGated && bias) h = _mm512_add_ps(h, _mm512_maskz_loadu_ps(m, bias + c));
      __m512 out = value_grad<kAct, kLow>(h).value;
      if constexpr (kGated) out = _mm512_mul_ps(out, L::load(at<L>(b, c), m));
      put<L, kStream>(at<L>(y, c), out, m);
    });
  }
}

template <typename L, bool kStream, Activation kAct, bool kGated>
void backward_rows(const ActivationBackwardParams& p, int64_t begin, int64_t end, float* dbias, const float* bias) {
  constexpr bool kLow = L::kBytes == 2;
  for (int64_t r = begin; r < end; ++r) {
    const void* dy = at<L>(p.dy, r * p.dy_row_stride);
    const void* a = at<L>(p.a, r * p.a_row_stride);
    void* da = at<L>(p.da, r * p.da_row_stride);
    for_each_chunk(p.cols, [&](int64_t c, __mmask16 m) {
      const __m512 d = L::load(at<L>(dy, c), m);
      __m512 h = L::load(at<L>(a, c), m);
      if constexpr (kGated) {
        // y = f(g) u: dy/dg = u f'(g), dy/du = f(g).
        const __m512 u = L::load(at<L>(at<L>(p.b, r * p.b_row_stride), c), m);
        const ValueGrad f = value_grad<kAct, kLow>(h);
        put<L, kStream>(at<L>(da, c), _mm512_mul_ps(_mm512_mul_ps(d, u), f.grad), m);
        put<L, kStream>(at<L>(at<L>(p.db, r * p.db_row_stride), c), _mm512_mul_ps(d, f.value), m);
      } else {
        if (bias) h = _mm512_add_ps(h, _mm512_maskz_loadu_ps(m, bias + c));
        const __m512 g = _mm512_mul_ps(d, value_grad<kAct, kLow>(h).grad);
        put<L, kStream>(at<L>(da, c), g, m);
        if (dbias) _mm512_mask_storeu_ps(dbias + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dbias + c), g));
      }
    });
  }
}

// The run-time choices (activation, gated, streaming, bf16 instruction) as template arguments.
template <typename L, bool kStream, bool kGated>
void forward_act(const ActivationForwardParams& p, int64_t begin, int64_t end, const float* bias) {
  switch (p.act) {
    case Activation::gelu_erf:
      return forward_rows<L, kStream, Activation::gelu_erf, kGated>(p, begin, end, bias);
    case Activation::gelu_tanh:
      return forward_rows<L, kStream, Activation::gelu_tanh, kGated>(p, begin, end, bias);
    case Activation::silu:
      return forward_rows<L, kStream, Activation::silu, kGated>(p, begin, end, bias);
  }
}

template <typename L, bool kStream, bool kGated>
void backward_act(const ActivationBackwardParams& p, int64_t begin, int64_t end, float* dbias, const float* bias) {
  switch (p.act) {
    case Activation::gelu_erf:
      return backward_rows<L, kStream, Activation::gelu_erf, kGated>(p, begin, end, dbias, bias);
    case Activation::gelu_tanh:
      return backward_rows<L, kStream, Activation::gelu_tanh, kGated>(p, begin, end, dbias, bias);
    case Activation::silu:
      return backward_rows<L, kStream, Activation::silu, kGated>(p, begin, end, dbias, bias);
  }
}

template <typename L, bool kStream>
void forward_gated(const ActivationForwardParams& p, int64_t begin, int64_t end, const float* bias) {
  if (p.b) return forward_act<L, kStream, true>(p, begin, end, bias);
  forward_act<L, kStream, false>(p, begin, end, bias);
}

template <typename L, bool kStream>
void backward_gated(const ActivationBackwardParams& p, int64_t begin, int64_t end, float* dbias, const float* bias) {
  if (p.b) return backward_act<L, kStream, true>(p, begin, end, dbias, bias);
  backward_act<L, kStream, false>(p, begin, end, dbias, bias);
}

template <typename L>
void forward_with(const ActivationForwardParams& p, int64_t begin, int64_t end, const Avx512RowArgs& a) {
  if (a.stream) return forward_gated<L, true>(p, begin, end, a.bias);
  forward_gated<L, false>(p, begin, end, a.bias);
}

template <typename L>
void backward_with(const ActivationBackwardParams& p, int64_t begin, int64_t end, float* dbias, const Avx512RowArgs& a) {
  if (a.stream) return backward_gated<L, true>(p, begin, end, dbias, a.bias);
  backward_gated<L, false>(p, begin, end, dbias, a.bias);
}

}  // namespace

template <Dtype D>
void activation_forward_rows_avx512(const ActivationForwardParams& p, int64_t begin, int64_t end, const Avx512RowArgs& a) {
  if constexpr (D == Dtype::bf16) {
    if (a.bf16_instructions) return forward_with<Lanes<D, true>>(p, begin, end, a);
  }
  forward_with<Lanes<D, false>>(p, begin, end, a);
}

template <Dtype D>
void activation_backward_rows_avx512(
    const ActivationBackwardParams& p, int64_t begin, int64_t end, float* dbias_acc, const Avx512RowArgs& a) {
  if constexpr (D == Dtype::bf16) {
    if (a.bf16_instructions) return backward_with<Lanes<D, true>>(p, begin, end, dbias_acc, a);
  }
  backward_with<Lanes<D, false>>(p, begin, end, dbias_acc, a);
}

template void activation_forward_rows_avx512<Dtype::f32>(const ActivationForwardParams&, int64_t, int64_t, const Avx512RowArgs&);
template void activation_forward_rows_avx512<Dtype::f16>(const ActivationForwardParams&, int64_t, int64_t, const Avx512RowArgs&);
template void activation_forward_rows_avx512<Dtype::bf16>(const ActivationForwardParams&, int64_t, int64_t, const Avx512RowArgs&);
template void activation_backward_rows_avx512<Dtype::f32>(const ActivationBackwardParams&, int64_t, int64_t, float*, const Avx512RowArgs&);
template void activation_backward_rows_avx512<Dtype::f16>(const ActivationBackwardParams&, int64_t, int64_t, float*, const Avx512RowArgs&);
template void activation_backward_rows_avx512<Dtype::bf16>(const ActivationBackwardParams&, int64_t, int64_t, float*, const Avx512RowArgs&);

}  // namespace fastarch::cpu::act

#pragma GCC pop_options
