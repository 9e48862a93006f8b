// CPU implementation of fastarch::_quantized_linear: checks, the fp32 copy of x's rows, and
// the choice of product: up to kDirectRows rows of x, the kernels that read W's blocks once
// (threaded over output columns, AVX-512 or portable build); more rows with x rounded to int8
// on AVX512-VNNI, the packed-panel GEMM (qlinear_int8_gemm_avx512.cpp); else W dequantized to fp32
// a slice of output columns at a time and multiplied on an fp32 GEMM, oneDNN's matmul where
// the caller says (a prefill's many rows reuse each weight, so the product's arithmetic, not
// W's bytes, is then the cost; on an AMD EPYC Zen 5, 2 threads, 512 rows of SmolLM2's
// projections, oneDNN ran at 2.0-2.2x PyTorch's fp32 GEMM, F.linear).
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "cpu/dtype_of.h"
#include "cpu/isa.h"
#include "cpu/portable.h"
#include "cpu/linear/linear_cols.h"  // linear_widen_generic
#include "cpu/linear/onednn_linear.h"
#include "qlinear/qlinear_glue.h"
#include "qlinear.h"

namespace fastarch::cpu {
namespace {

using at::Tensor;

constexpr const char* kWho = "fastarch::_quantized_linear (cpu)";
// Up to this many rows of x the kernels stream W's blocks (each block widened once per group of
// 8 rows); more rows dequantize W and run the GEMM (or, int8, the packed panels: int8_panel_rows).
constexpr int64_t kDirectRows = 16;
// With x rounded to int8 on AVX512-VNNI, past this many rows the packed panels: packing W
// costs about what the few-row kernels spend on 5-6 rows, except on the k-quants Q4_K, Q5_K
// and Q6_K, whose few-row kernels have super-block paths of their own and whose unpacking
// costs most (AMD EPYC Zen 4, 2 threads, a 4096 x 2048 weight: at 8 rows the panels took
// 0.4-0.5x the time of the few-row kernels on the 32-value formats and IQ4_XS, 1.2-1.9x on
// Q4_K/Q5_K; at 16 rows Q4_K ran even; one 1B-class layer, Q6_K: the few-row kernels 210, 182,
// 173, 169 GFLOP/s at 6, 8, 12, 16 rows against the panels' 55, 77, 108, 154).
constexpr int64_t int8_panel_rows(Quant q) {
  return q == Quant::q4_k || q == Quant::q5_k || q == Quant::q6_k ? kDirectRows : 5;
}
// W rows dequantized per slice of the GEMM path (576 in_features: ~2.4 MB of fp32 values).
constexpr int64_t kDequantRows = 1024;

template <typename Fn>
void with_quant(Quant q, Fn&& fn) {
  switch (q) {
#define FASTARCH_QUANT_CASE(Q) \
  case Q: return fn.template operator()<Q>();
    FASTARCH_QUANTS(FASTARCH_QUANT_CASE)
#undef FASTARCH_QUANT_CASE
  }
}

// products: how p.int8's codes are multiplied (p.int8 set where they are: not Int8Products::exact).
void run_cols(Quant q, Dtype d, Int8Products products, const QuantLinearParams& p, int64_t begin, int64_t end) {
  with_quant(q, [&]<Quant Q>() {
    with_dtype(d, [&]<Dtype D>() {
      if constexpr (D != Dtype::f64) {
#ifdef FASTARCH_WITH_AVX512
        if (p.int8 && products == Int8Products::avx512_vnni) return qlinear_int8_cols_avx512<Q, D>(p, begin, end);
#endif
#ifdef FASTARCH_WITH_AVX2
        if (p.int8 && products == Int8Products::avx_vnni) return qlinear_int8_cols_avx2<Q, D, true>(p, begin, end);
        if (p.int8) return qlinear_int8_cols_avx2<Q, D, false>(p, begin, end);
#endif
#ifdef FASTARCH_WITH_AVX512
        if (isa_avx512()) return qlinear_cols_avx512<Q, D>(p, begin, end);
#endif
#ifdef FASTARCH_WITH_AVX2
        if (portable_avx2()) return qlinear_cols_avx2<Q, D>(p, begin, end);
#endif
        with_portable_build([&]<Isa I>() { qlinear_cols_generic<I, Q, D>(p, begin, end); });
      }
    });
  });
}

// The arrays of Int8Rows for rows of K values in buffer, one allocation, each 64-byte aligned.
Int8Rows int8_rows_in(int64_t rows, int64_t K, std::vector<uint8_t>& buffer) {
  const int64_t ld = (K + 63) / 64 * 64;
  const int64_t lanes = rows * ld / 4, blocks = rows * ld / 32;
  buffer.resize(static_cast<size_t>(rows * ld + 4 * (4 * blocks + 3 * lanes) + 64 * 8));  // (each array 64-aligned)
  uint8_t* at = buffer.data() + (64 - reinterpret_cast<uintptr_t>(buffer.data()) % 64) % 64;
  auto take = [&](int64_t n) {
    uint8_t* p = at;
    at += (n + 63) / 64 * 64;
    return p;
  };
  Int8Rows r;
  r.ld = ld;
  r.q = reinterpret_cast<const int8_t*>(take(rows * ld));
  r.d = reinterpret_cast<const float*>(take(4 * blocks));
  r.lane_d = reinterpret_cast<const float*>(take(4 * lanes));
  r.neg4 = reinterpret_cast<const int32_t*>(take(4 * lanes));
  r.sum4 = reinterpret_cast<const float*>(take(4 * lanes));
  r.sum32 = reinterpret_cast<const float*>(take(4 * blocks));
  r.sum16 = reinterpret_cast<const float*>(take(8 * blocks));
  return r;
}

// x's rows (fp32, row stride ldx) rounded to int8 (qlinear.h, Int8Rows) into r (all its
// arrays where the int8 products multiply the codes, else q and d).
void quantize_rows(const float* x, int64_t rows, int64_t K, int64_t ldx, const Int8Rows& r, Int8Products products) {
#ifdef FASTARCH_WITH_AVX512
  if (products == Int8Products::avx512_vnni) return quantize_int8_rows_avx512(x, rows, K, ldx, r);
#endif
#ifdef FASTARCH_WITH_AVX2
  if (products != Int8Products::exact) return quantize_int8_rows_avx2(x, rows, K, ldx, r);
#endif
  with_portable_build([&]<Isa I>() { quantize_int8_rows_generic<I>(x, rows, K, ldx, r); });
}

void dequantize(Quant q, const uint8_t* w, int64_t K, int64_t begin, int64_t end, float* out) {
  with_quant(q, [&]<Quant Q>() {
#ifdef FASTARCH_WITH_AVX512
    if (isa_avx512()) return dequantize_rows_avx512<Q>(w, K, begin, end, out);
#endif
    with_portable_build([&]<Isa I>() { dequantize_rows_generic<I, Q>(w, K, begin, end, out); });
  });
}

// x's rows (fp32, row stride ldx) as their rounded values d q (rows x K, contiguous, into
// out; threads over rows): what the products multiply where x's int8 codes are not multiplied
// themselves (past the direct rows, and where int8_products() is exact: integer products in
// portable code ran slower than the exact kernels on these values).
void dequantized_int8(const float* x, int64_t rows, int64_t K, int64_t ldx, float* out) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> buffer;
    const Int8Rows r = int8_rows_in(end - begin, K, buffer);
    quantize_rows(x + begin * ldx, end - begin, K, ldx, r, Int8Products::exact);
    for (int64_t i = 0; i < end - begin; ++i) {
      const float* d = r.d + i * (r.ld / 32);
      const int8_t* q = r.q + i * r.ld;
      float* row = out + (begin + i) * K;
      for (int64_t b = 0; b < K / 32; ++b) {
        for (int64_t j = 32 * b; j < 32 * b + 32; ++j) row[j] = d[b] * static_cast<float>(q[j]);
      }
    }
  });
}

#ifdef FASTARCH_WITH_AVX512
// Many rows of x rounded to int8 on AVX512-VNNI: each group of 8 rows rounded (threads over
// groups) and interleaved into Int8Tiles, then the packed-panel kernels (threads over panels of
// 16 output columns).
Tensor int8_gemm(const Tensor& x, const uint8_t* w, Quant q, Dtype d, const std::optional<Tensor>& bias, Tensor& out) {
  constexpr int64_t T = kInt8TileRows;
  const int64_t rows = x.size(0), K = x.size(1), N = out.size(1);
  const Tensor xf = x.to(at::kFloat).contiguous();  // exact
  const int64_t ld = (K + 63) / 64 * 64, groups = (rows + T - 1) / T;
  std::vector<uint8_t> codes(static_cast<size_t>(groups * ld * T));
  std::vector<float> scales(static_cast<size_t>(2 * groups * ld / 32 * T));  // d, then sum32
  Int8Tiles tiles{codes.data(), scales.data(), scales.data() + groups * ld / 32 * T, ld};
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> buffer;
    const Int8Rows r = int8_rows_in(T, K, buffer);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n = std::min(T, rows - g * T);
      quantize_int8_rows_avx512(xf.data_ptr<float>() + g * T * K, n, K, K, r);
      uint8_t* tq = codes.data() + g * ld * T;
      float* td = scales.data() + g * ld / 32 * T;
      float* ts = td + groups * ld / 32 * T;
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < ld / 4; ++j) {
          uint32_t four;
          std::memcpy(&four, r.q + i * ld + 4 * j, 4);
          four ^= 0x80808080u;
          std::memcpy(tq + (j * T + i) * 4, &four, 4);
        }
        for (int64_t b = 0; b < ld / 32; ++b) {
          td[b * T + i] = r.d[i * (ld / 32) + b];
          ts[b * T + i] = r.sum32[i * (ld / 32) + b];
        }
      }
    }
  });
  QuantLinearParams p{nullptr, w, bias ? bias->data_ptr() : nullptr, out.data_ptr(), rows, K, N, K};
  p.tiles = &tiles;
  const int64_t panels = (N + kQuantColChunk - 1) / kQuantColChunk;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    with_quant(q, [&]<Quant Q>() {
      with_dtype(d, [&]<Dtype D>() {
        if constexpr (D != Dtype::f64) {
          qlinear_int8_gemm_avx512<Q, D>(p, begin * kQuantColChunk, std::min(end * kQuantColChunk, N));
        }
      });
    });
  });
  return out;
}
#endif

Tensor quantized_linear_cpu(const Tensor& x, const Tensor& blocks, int64_t quant, const std::optional<Tensor>& bias,
                            bool onednn, bool int8) {
  TORCH_CHECK(x.device().is_cpu(), kWho, ": x must be on the CPU, got ", x.device());
  const Dtype d = dtype_of(x, kWho, "x");
  TORCH_CHECK(d != Dtype::f64, kWho, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  qlinear_glue::check(kWho, x, blocks, quant, bias);
  const Quant q = static_cast<Quant>(quant);
  const int64_t rows = x.size(0), K = x.size(1), N = blocks.size(0);
  Tensor out = at::empty({rows, N}, x.options());
  if (rows == 0 || N == 0) return out;
  if (K == 0) return bias ? out.copy_(bias->expand({rows, N})) : out.zero_();
  const uint8_t* w = blocks.data_ptr<uint8_t>();
#ifdef FASTARCH_WITH_AVX512
  if (int8 && rows > int8_panel_rows(q) && int8_products() == Int8Products::avx512_vnni) {
    return int8_gemm(x, w, q, d, bias, out);
  }
#endif
  if (rows > kDirectRows) {
    Tensor xf = x.to(at::kFloat).contiguous();  // exact
    if (int8) {  // x's rounded values, d q (as the reference's)
      Tensor rounded = at::empty_like(xf);
      dequantized_int8(xf.data_ptr<float>(), rows, K, K, rounded.data_ptr<float>());
      xf = rounded;
    }
    Tensor sums = at::empty({rows, N}, x.options().dtype(at::kFloat));
    Tensor values = at::empty({std::min(N, kDequantRows), K}, x.options().dtype(at::kFloat));
    for (int64_t n0 = 0; n0 < N; n0 += kDequantRows) {
      const int64_t len = std::min(kDequantRows, N - n0);
      float* v = values.data_ptr<float>();
      at::parallel_for(n0, n0 + len, 16, [&](int64_t begin, int64_t end) {
        dequantize(q, w, K, begin, end, v + (begin - n0) * K);
      });
      const Tensor w_slice = values.narrow(0, 0, len);
      if (len == N) {  // one slice: the product straight into sums
        sums = onednn ? onednn_linear(xf, w_slice, std::nullopt) : at::mm(xf, w_slice.t());
      } else {
        sums.narrow(1, n0, len).copy_(onednn ? onednn_linear(xf, w_slice, std::nullopt) : at::mm(xf, w_slice.t()));
      }
    }
    if (bias) sums.add_(*bias);
    return sums.to(x.scalar_type());
  }
  // fp16/bf16 rows widened once (exactly) into a buffer of this thread's, 64-byte aligned as
  // torch's tensors are, by the linear layer's vector loop: x.to(kFloat) had cost a bf16 call
  // 1.3 us more than an fp32 one, and an unaligned buffer (x's loads split across cache lines)
  // 1.4x at 8 rows
  const float* xf = static_cast<const float*>(x.data_ptr());  // (fp32; else the widened copy below)
  int64_t ldx = x.stride(0);
  if (d != Dtype::f32) {
    thread_local std::vector<float> wide;
    wide.resize(static_cast<size_t>(rows * K + 16));
    float* aligned = wide.data() + (16 - reinterpret_cast<uintptr_t>(wide.data()) / sizeof(float) % 16) % 16;
    with_portable_build([&]<Isa I>() {
      auto* fn = d == Dtype::f16 ? &linear_widen_generic<I, Dtype::f16> : &linear_widen_generic<I, Dtype::bf16>;
      fn(x.data_ptr(), rows, K, x.stride(0), aligned);
    });
    xf = aligned;
    ldx = K;
  }
  Int8Rows x8;
  thread_local std::vector<uint8_t> buffer;
  thread_local std::vector<float> rounded;
  const Int8Products products = int8 ? int8_products() : Int8Products::exact;
  if (products != Int8Products::exact) {  // the codes multiplied in int32
    x8 = int8_rows_in(rows, K, buffer);
    x8.k_pairs = products == Int8Products::avx512_vnni && (q == Quant::q4_k || q == Quant::q5_k);
    quantize_rows(xf, rows, K, ldx, x8, products);
  } else if (int8) {  // the exact kernels on x's rounded values
    rounded.resize(static_cast<size_t>(rows * K));
    dequantized_int8(xf, rows, K, ldx, rounded.data());
    xf = rounded.data();
    ldx = K;
  }
  QuantLinearParams p{xf, w, bias ? bias->data_ptr() : nullptr, out.data_ptr(), rows, K, N, ldx};
  if (products != Int8Products::exact) p.int8 = &x8;
  // at least ~64 KB of blocks per task, in whole chunks of output columns
  const int64_t row_bytes = std::max<int64_t>(blocks.size(1), 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t{64} << 10) / row_bytes / kQuantColChunk);
  const int64_t chunks = (N + kQuantColChunk - 1) / kQuantColChunk;
  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    run_cols(q, d, products, p, begin * kQuantColChunk, std::min(end * kQuantColChunk, N));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastarch, CPU, m) { m.impl("_quantized_linear", &quantized_linear_cpu); }

}  // namespace fastarch::cpu
