// AVX2 build of the CPU linear layer on block-quantized weights (qlinear.h), for the x86 CPUs
// without AVX-512 or AVX512-VNNI (Zen 2/3, Haswell to Raptor Lake, Core Ultra): the exact
// kernels (x in fp32) and the int8 products (x rounded to int8, activations "int8": qlinear.h's
// Int8Rows, the arithmetic of qlinear_int8_avx512.cpp on 32 values a vector). Built twice:
// here with the int8 products by vpmaddubsw + vpmaddwd (AVX2), and by
// qlinear_blocks_vnni_avx2.cpp with AVX-VNNI's vpdpbusd on ymm (Alder Lake and later, Zen 5)
// for those alone; cpu/isa.h's int8_products() picks.
//
// Every format is unpacked 32 values a vector (one block, or one sub-block of a super-block),
// as bytes in x's order, in one of three forms: the values' small integers v (with a min b per
// 32 values where the format has one), which the exact kernels widen to fp32 and scale as ggml
// does (a v, or a u + b as one fused multiply-add: a u is exact, so its one rounding is ggml's;
// Q6_K and IQ4_XS round (d sc) v once, in ggml's order); or unsigned codes u = v + o for
// vpdpbusd and vpmaddubsw, each row's lane sums of 4 starting from minus o times x's 4 codes'
// sum (Int8Rows::neg4, shifted: o a power of 2), so that they hold exactly sum v q; or, where
// vpmaddubsw's pairs of products would pass 2^15 (Q8_0 and IQ4, u up to 255), |v| with v's signs
// (vpsignb; |v| <= 128, |q| <= 127). The 4-, 5- and 6-bit formats' u <= 63 never saturate.
//
// Four rows of x at most per pass (16 ymm registers); the glue loops over more. Against the
// portable kernels compiled for AVX2 (qlinear_avx2.cpp), which build each block's values in
// memory: see "Quantized weights" in the README.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include "qlinear.h"
#include "qlinear_cols.h"

#pragma GCC push_options
#ifdef FASTARCH_INT8_AVX_VNNI
#pragma GCC target("avx2,fma,f16c,avxvnni")
#else
#pragma GCC target("avx2,fma,f16c")
#endif

#include "qlinear_int8_x86.h"

namespace fastarch::cpu {
namespace {

#ifdef FASTARCH_INT8_AVX_VNNI
constexpr bool kVnni = true;
#else
constexpr bool kVnni = false;
#endif
constexpr int64_t kPrefetchBytes = 2048;
constexpr int64_t kMaxRows = 4;

// log2 of the offset o of a format whose codes are u = v + o; -1 for those with a min b.
template <Quant Q>
constexpr int kOffsetShift = Q == Quant::q4_0 ? 3 : Q == Quant::q5_0 ? 4 : Q == Quant::q6_k ? 5
                           : Q == Quant::q8_0 || Q == Quant::iq4_nl || Q == Quant::iq4_xs ? 7 : -1;
// A chunk's form: the values' small integers v (and b: the exact kernels), the codes u = v + o
// (int8 products), or |v| and v's signs (int8 products by vpmaddubsw of Q8_0 and IQ4).
enum class Form { values, codes, signs };
template <Quant Q>
constexpr Form kInt8Form = !kVnni && kOffsetShift<Q> == 7 ? Form::signs : Form::codes;
// The formats with a min b per 32 values applied by lane (the 32-value Q4_1 and Q5_1).
template <Quant Q>
constexpr bool kLaneMins = Q == Quant::q4_1 || Q == Quant::q5_1;

// f.template operator()<I>() for I = 0 .. N - 1, in order (a compile-time index: shift counts).
template <int N, typename F>
__attribute__((always_inline)) inline void each(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) { (f.template operator()<I>(), ...); }(std::make_integer_sequence<int, N>{});
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// 32 values as bytes in a Form (Form::signs: their signs in signs) and each lane's a (and b
// where the format has a min).
struct Chunk {
  __m256i codes, signs;
  __m256 a, b;
};

// 16 bytes of 4-bit values as 32 bytes: the low nibbles (values 0-15), then the high.
__attribute__((always_inline)) inline __m256i nibbles(const uint8_t* qs) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0F));
}

// Bit j of bits as byte j: value where set, else 0.
__attribute__((always_inline)) inline __m256i bit_bytes(uint32_t bits, char value) {
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)),
                                             _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202,
                                                                0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(value));
}

// IQ4's 16 levels in each 128-bit lane (vpshufb's table): + 128 as codes, or signed.
template <bool kAsSigned>
inline __m256i iq4_table() {
  alignas(16) int8_t t[16];
  for (int i = 0; i < 16; ++i) t[i] = static_cast<int8_t>(static_cast<int>(kIq4Levels[i]) + (kAsSigned ? 0 : 128));
  return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}

// Signed values v as a chunk's codes: |v| (vpabsb: -128 gives 128 as a byte) and v's signs.
__attribute__((always_inline)) inline void set_signed(Chunk& c, __m256i v) {
  c.codes = _mm256_abs_epi8(v);
  c.signs = v;
}

// A 32-value block's chunk in form F.
template <Quant Q, Form F>
__attribute__((always_inline)) inline Chunk block_chunk(const uint8_t* blk) {
  constexpr bool kMin = kLaneMins<Q>, kFive = Q == Quant::q5_0 || Q == Quant::q5_1;
  Chunk c{};
  c.a = _mm256_set1_ps(half_at(blk));
  if constexpr (kMin) c.b = _mm256_set1_ps(half_at(blk + 2));
  if constexpr (Q == Quant::q8_0 || Q == Quant::iq4_nl) {
    __m256i v;  // the values
    if constexpr (Q == Quant::q8_0) v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    else v = _mm256_shuffle_epi8(iq4_table<F != Form::codes>(), nibbles(blk + 2));
    if constexpr (F == Form::signs) set_signed(c, v);
    else if constexpr (F == Form::codes && Q == Quant::q8_0) c.codes = _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));
    else c.codes = v;
  } else {
    constexpr int kQs = (kMin ? 4 : 2) + (kFive ? 4 : 0);
    c.codes = nibbles(blk + kQs);
    if constexpr (kFive) {  // bit j of the u32 before the nibbles: value j's fifth bit
      uint32_t qh;
      std::memcpy(&qh, blk + kQs - 4, 4);
      c.codes = _mm256_or_si256(c.codes, bit_bytes(qh, 0x10));
    }
    if constexpr (F == Form::values && !kMin) c.codes = _mm256_sub_epi8(c.codes, _mm256_set1_epi8(1 << kOffsetShift<Q>));
  }
  return c;
}

// Bits 0-7 of each byte of v shifted left by S (right for S < 0), within the byte where masked.
template <int S>
__attribute__((always_inline)) inline __m256i shifted(__m256i v) {
  if constexpr (S > 0) return _mm256_slli_epi16(v, S);
  else if constexpr (S < 0) return _mm256_srli_epi16(v, -S);
  else return v;
}

// A super-block's eight chunks of 32 in form F: fn.template operator()<c>(chunk) for values 32c
// .. 32c + 31; Q4_K and Q5_K also give mins(dmin m of the 8 sub-blocks) first (and, as values,
// each chunk's b = -dmin m).
template <Quant Q, Form F, typename Fn, typename Mins>
__attribute__((always_inline)) inline void k_chunks(const uint8_t* blk, Fn&& fn, Mins&& mins) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  if constexpr (Q == Quant::q4_k || Q == Quant::q5_k) {
    uint32_t word[3];  // the 6-bit scales and mins (formats.py, k_scales)
    std::memcpy(word, blk + 4, 12);
    const uint32_t six = 0x3f3f3f3f, four = 0x0f0f0f0f, two = 0x03030303;
    const uint32_t sc_lo = word[0] & six, mn_lo = word[1] & six;
    const uint32_t sc_hi = (word[2] & four) | (((word[0] >> 6) & two) << 4);
    const uint32_t mn_hi = ((word[2] >> 4) & four) | (((word[1] >> 6) & two) << 4);
    const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_setr_epi32(static_cast<int>(sc_lo), static_cast<int>(sc_hi), 0, 0)));
    const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_setr_epi32(static_cast<int>(mn_lo), static_cast<int>(mn_hi), 0, 0)));
    const __m256 a8 = _mm256_mul_ps(sc, _mm256_set1_ps(half_at(blk)));  // (exact products)
    const __m256 dmin_m = _mm256_mul_ps(mn, _mm256_set1_ps(half_at(blk + 2)));
    mins(dmin_m);
    const uint8_t* qs = blk + (Q == Quant::q5_k ? 48 : 16);
    __m256i qh;
    if constexpr (Q == Quant::q5_k) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16));
    each<8>([&]<int C>() {  // sub-block C: the low (C even) or high nibbles of 32 bytes
      const __m256i q32 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * (C / 2)));
      __m256i u = _mm256_and_si256(C % 2 ? _mm256_srli_epi16(q32, 4) : q32, low4);
      if constexpr (Q == Quant::q5_k) {  // bit C of qh's byte l: value l's fifth bit, moved to bit 4
        u = _mm256_or_si256(u, _mm256_and_si256(shifted<4 - C>(qh), _mm256_set1_epi8(0x10)));
      }
      const __m256i at = _mm256_set1_epi32(C);
      __m256 b{};
      if constexpr (F == Form::values) b = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_permutevar8x32_ps(dmin_m, at));
      fn.template operator()<C>(Chunk{u, {}, _mm256_permutevar8x32_ps(a8, at), b});
    });
  } else if constexpr (Q == Quant::q6_k) {
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192));
    const __m256 d = _mm256_set1_ps(half_at(blk + 208));
    const __m256 lo8 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)), d);  // groups 0-7 (exact)
    const __m256 hi8 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))), d);
    each<8>([&]<int C>() {  // half n = C / 4 of 128 values, group k = C % 4 of 32 in it
      constexpr int n = C / 4, k = C % 4;
      const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * n + 32 * (k % 2)));
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * n));
      const __m256i low = _mm256_and_si256(k < 2 ? ql : _mm256_srli_epi16(ql, 4), low4);
      __m256i u = _mm256_or_si256(low, _mm256_and_si256(shifted<4 - 2 * k>(qh), _mm256_set1_epi8(0x30)));
      if constexpr (F == Form::values) u = _mm256_sub_epi8(u, _mm256_set1_epi8(32));
      // lanes 0-3 take group 8n + 2k, lanes 4-7 the next
      const __m256i idx = _mm256_setr_epi32(2 * k, 2 * k, 2 * k, 2 * k, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1);
      fn.template operator()<C>(Chunk{u, {}, _mm256_permutevar8x32_ps(n ? hi8 : lo8, idx), {}});
    });
  } else {  // IQ4_XS: sub-block c's step d (ls_c - 32)
    const __m256 a8 = iq4_xs_steps(blk, half_at(blk));
    const __m256i table = iq4_table<F != Form::codes>();
    each<8>([&]<int C>() {
      Chunk c{_mm256_shuffle_epi8(table, nibbles(blk + 8 + 16 * C)), {}, _mm256_permutevar8x32_ps(a8, _mm256_set1_epi32(C)), {}};
      if constexpr (F == Form::signs) set_signed(c, c.codes);
      fn.template operator()<C>(c);
    });
  }
}

// Each lane's sum of 4 products of codes u with x's codes q, added to init.
__attribute__((always_inline)) inline __m256i dot4(__m256i init, __m256i u, __m256i q) {
#ifdef FASTARCH_INT8_AVX_VNNI
  return _mm256_dpbusd_avx_epi32(init, u, q);
#else
  return _mm256_add_epi32(init, _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), _mm256_set1_epi16(1)));
#endif
}

// R rows of x's 32 values at (the rows' pointers) + off, times the chunk, into acc (lane mins
// into mins: a chain of their own).
template <Quant Q, int R>
__attribute__((always_inline)) inline void chunk_rows(const Chunk& c, const XRows<R>& x, int off, __m256 (&acc)[R],
                                                      __m256 (&mins)[R]) {
  constexpr int kShift = kOffsetShift<Q>;
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q[r] + off));
    __m256i dots;
    if constexpr (kInt8Form<Q> == Form::signs) {
      dots = dot4(_mm256_setzero_si256(), c.codes, _mm256_sign_epi8(q, c.signs));
    } else {
      __m256i init = _mm256_setzero_si256();
      if constexpr (kShift >= 0) {
        init = _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.neg4[r] + off / 4)), kShift);
      }
      dots = dot4(init, c.codes, q);
    }
    const __m256 scale = _mm256_mul_ps(c.a, _mm256_loadu_ps(x.lane_d[r] + off / 4));
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scale, acc[r]);
    if constexpr (kLaneMins<Q>) mins[r] = _mm256_fmadd_ps(c.b, _mm256_loadu_ps(x.sum4[r] + off / 4), mins[r]);
  }
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// The int8 dot products of one W row (nb blocks) with R rows of x (rows m0 ..): sums[r].
template <Quant Q, int R>
void row_dots(const uint8_t* w, int64_t nb, const Int8Rows& x, int64_t m0, float* sums) {
  constexpr int64_t kBytes = quant_block_bytes(Q), kValues = quant_block_values(Q);
  constexpr int kSets = R <= 2 ? 2 : 1;  // accumulator sets (alternate chunks)
  __m256 acc[kSets][R], lane_mins[R];  // lane_mins: Q4_1/Q5_1's m d sum q
  __m256 mins[R];  // Q4_K/Q5_K: dmin m times d sum q per 32 values (subtracted)
  for (int r = 0; r < R; ++r) {
    for (int s = 0; s < kSets; ++s) acc[s][r] = _mm256_setzero_ps();
    lane_mins[r] = _mm256_setzero_ps();
    mins[r] = _mm256_setzero_ps();
  }
  XRows<R> xr(x, m0);
  if constexpr (kValues == kQuantBlock) {
    int64_t b = 0;
    for (; b + kSets <= nb; b += kSets, xr.advance(32 * kSets)) {
      _mm_prefetch(reinterpret_cast<const char*>(w + b * kBytes) + kPrefetchBytes, _MM_HINT_T0);
      each<kSets>([&]<int S>() {
        chunk_rows<Q, R>(block_chunk<Q, kInt8Form<Q>>(w + (b + S) * kBytes), xr, 32 * S, acc[S], lane_mins);
      });
    }
    if (b < nb) chunk_rows<Q, R>(block_chunk<Q, kInt8Form<Q>>(w + b * kBytes), xr, 0, acc[0], lane_mins);
  } else {
    for (int64_t b = 0; b < nb; ++b, xr.advance(kValues)) {
      const uint8_t* blk = w + b * kBytes;
#pragma GCC unroll 4
      for (int64_t line = 0; line < kBytes; line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchBytes + line, _MM_HINT_T0);
      }
      k_chunks<Q, kInt8Form<Q>>(
          blk, [&]<int C>(const Chunk& c) { chunk_rows<Q, R>(c, xr, 32 * C, acc[C % kSets], lane_mins); },
          [&](__m256 dmin_m) {
            for (int r = 0; r < R; ++r) mins[r] = _mm256_fmadd_ps(dmin_m, _mm256_loadu_ps(xr.sum32[r]), mins[r]);
          });
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 s = acc[0][r];
    if constexpr (kSets == 2) s = _mm256_add_ps(s, acc[1][r]);
    if constexpr (kLaneMins<Q>) s = _mm256_add_ps(s, lane_mins[r]);
    if constexpr (Q == Quant::q4_k || Q == Quant::q5_k) s = _mm256_sub_ps(s, mins[r]);
    sums[r] = hsum(s);
  }
}

#ifndef FASTARCH_INT8_AVX_VNNI
// A chunk of values (Form::values) as fp32, exactly ggml's: v[i] holds values 8i .. 8i + 7.
template <Quant Q>
__attribute__((always_inline)) inline void chunk_values(const Chunk& c, __m256 (&v)[4]) {
  constexpr bool kMin = kLaneMins<Q> || Q == Quant::q4_k || Q == Quant::q5_k;
  const __m128i lo = _mm256_castsi256_si128(c.codes), hi = _mm256_extracti128_si256(c.codes, 1);
  const __m128i part[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  __m256 a[2] = {c.a, c.a};  // the scale of values 0-15 and 16-31 (Q6_K's two; one elsewhere)
  if constexpr (Q == Quant::q6_k) {
    a[0] = _mm256_permutevar8x32_ps(c.a, _mm256_setzero_si256());
    a[1] = _mm256_permutevar8x32_ps(c.a, _mm256_set1_epi32(4));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part[i]));
    v[i] = kMin ? _mm256_fmadd_ps(q, a[i / 2], c.b) : _mm256_mul_ps(q, a[i / 2]);
  }
}

// The exact dot products of one W row (nb blocks) with R rows of x (row stride ldx): sums[r].
// One or two rows keep four sums a row (the fused multiply-adds of a chunk independent), more
// two.
template <Quant Q, int R>
void row_values(const uint8_t* w, int64_t nb, const float* x, int64_t ldx, float* sums) {
  constexpr int64_t kBytes = quant_block_bytes(Q), kValues = quant_block_values(Q);
  constexpr int kAcc = R <= 2 ? 4 : 2;
  __m256 acc[R][kAcc];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < kAcc; ++i) acc[r][i] = _mm256_setzero_ps();
  auto rows = [&](const Chunk& c, const float* xb) __attribute__((always_inline)) {
    __m256 v[4];
    chunk_values<Q>(c, v);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) acc[r][i % kAcc] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(xb + r * ldx + 8 * i), acc[r][i % kAcc]);
    }
  };
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * kBytes;
    const float* xb = x + b * kValues;
    if constexpr (kValues == kQuantBlock) {
      if (b % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchBytes, _MM_HINT_T0);
      rows(block_chunk<Q, Form::values>(blk), xb);
    } else {
#pragma GCC unroll 4
      for (int64_t line = 0; line < kBytes; line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchBytes + line, _MM_HINT_T0);
      }
      k_chunks<Q, Form::values>(blk, [&]<int C>(const Chunk& c) { rows(c, xb + 32 * C); }, [](__m256) {});
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 s = acc[r][0];
    for (int i = 1; i < kAcc; ++i) s = _mm256_add_ps(s, acc[r][i]);
    sums[r] = hsum(s);
  }
}
#endif

}  // namespace

template <Quant Q, Dtype D, bool kVnniBuild>
void qlinear_int8_cols_avx2(const QuantLinearParams& p, int64_t begin, int64_t end) {
  static_assert(kVnniBuild == kVnni, "instantiated by the translation unit of its build");
  using Dots = void (*)(const uint8_t*, int64_t, const Int8Rows&, int64_t, float*);
  static constexpr Dots kDots[kMaxRows] = {row_dots<Q, 1>, row_dots<Q, 2>, row_dots<Q, 3>, row_dots<Q, 4>};
  const int64_t nb = p.in_features / quant_block_values(Q);
  qlinear_cols_loop<Q, D, kMaxRows>(p, begin, end, [&](int64_t rows, const uint8_t* w, int64_t m0, float* sums) {
    kDots[rows - 1](w, nb, *p.int8, m0, sums);
  });
}

#ifndef FASTARCH_INT8_AVX_VNNI
template <Quant Q, Dtype D>
void qlinear_cols_avx2(const QuantLinearParams& p, int64_t begin, int64_t end) {
  using Dots = void (*)(const uint8_t*, int64_t, const float*, int64_t, float*);
  static constexpr Dots kDots[kMaxRows] = {row_values<Q, 1>, row_values<Q, 2>, row_values<Q, 3>, row_values<Q, 4>};
  const int64_t nb = p.in_features / quant_block_values(Q);
  qlinear_cols_loop<Q, D, kMaxRows>(p, begin, end, [&](int64_t rows, const uint8_t* w, int64_t m0, float* sums) {
    kDots[rows - 1](w, nb, p.x + m0 * p.ldx, p.ldx, sums);
  });
}

// As quantize_int8_rows_avx512: per block of 32 the scale from max |x| (an inf or a NaN: d NaN,
// codes 0), the codes rounded to nearest even, then the lanes' sums.
void quantize_int8_rows_avx2(const float* x, int64_t rows, int64_t K, int64_t ldx, const Int8Rows& out) {
  const int64_t ld = out.ld, ld4 = ld / 4, ld32 = ld / 32;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    int8_t* q = const_cast<int8_t*>(out.q) + r * ld;
    float* d = const_cast<float*>(out.d) + r * ld32;
    float* lane_d = const_cast<float*>(out.lane_d) + r * ld4;
    int32_t* neg4 = const_cast<int32_t*>(out.neg4) + r * ld4;
    float* sum4 = const_cast<float*>(out.sum4) + r * ld4;
    float* sum32 = const_cast<float*>(out.sum32) + r * ld32;
    for (int64_t b = 0; b < ld32; ++b) {
      __m256i codes = _mm256_setzero_si256();
      float scale = 0.0f;
      if (b < K / 32) {
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps(), finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        for (int i = 0; i < 4; ++i) {
          v[i] = _mm256_loadu_ps(xr + 32 * b + 8 * i);
          amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], abs_mask));  // (a NaN is caught below)
          finite = _mm256_and_ps(finite, _mm256_cmp_ps(_mm256_sub_ps(v[i], v[i]), _mm256_setzero_ps(), _CMP_EQ_OQ));
        }
        const __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        const __m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float top = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
        if (_mm256_movemask_ps(finite) != 0xFF) {
          scale = std::nanf("");
        } else if (top > 0.0f) {
          const __m256 inv = _mm256_set1_ps(127.0f / top);
          __m256i qi[4];
          for (int i = 0; i < 4; ++i) {
            qi[i] = _mm256_cvtps_epi32(
                _mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
          }
          // packs interleave 128-bit lanes: bytes in order after the dword permutation
          const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
          codes = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
          scale = top / 127.0f;
        }
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b), codes);
      const __m256i s4 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), codes), _mm256_set1_epi16(1));
      store_block_sums(b, scale, s4, d, lane_d, neg4, sum4, sum32);
    }
  }
}
#endif

#define FASTARCH_QLINEAR_INT8_AVX2(Q)                                                                      \
  template void qlinear_int8_cols_avx2<Q, Dtype::f32, kVnni>(const QuantLinearParams&, int64_t, int64_t); \
  template void qlinear_int8_cols_avx2<Q, Dtype::f16, kVnni>(const QuantLinearParams&, int64_t, int64_t); \
  template void qlinear_int8_cols_avx2<Q, Dtype::bf16, kVnni>(const QuantLinearParams&, int64_t, int64_t);
FASTARCH_QUANTS(FASTARCH_QLINEAR_INT8_AVX2)
#undef FASTARCH_QLINEAR_INT8_AVX2

#ifndef FASTARCH_INT8_AVX_VNNI
#define FASTARCH_QLINEAR_AVX2(Q)                                                                   \
  template void qlinear_cols_avx2<Q, Dtype::f32>(const QuantLinearParams&, int64_t, int64_t); \
  template void qlinear_cols_avx2<Q, Dtype::f16>(const QuantLinearParams&, int64_t, int64_t); \
  template void qlinear_cols_avx2<Q, Dtype::bf16>(const QuantLinearParams&, int64_t, int64_t);
FASTARCH_QUANTS(FASTARCH_QLINEAR_AVX2)
#undef FASTARCH_QLINEAR_AVX2
#endif

}  // namespace fastarch::cpu

#pragma GCC pop_options
