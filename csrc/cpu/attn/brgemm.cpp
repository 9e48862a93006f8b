// brgemm.h's wrappers of at::native::cpublas::brgemm, compiled with the build's plain flags, and
// the brgemm paths' block sizes.
#include "brgemm.h"

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/isa.h"

namespace fastarch::cpu::attention {

void brgemm_bf16(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ld_b, int64_t ldc, bool add_c,
                 const uint16_t* a, const uint16_t* b, float* c) {
  at::native::cpublas::brgemm(M, N, K, lda, ld_b, ldc, add_c, reinterpret_cast<const at::BFloat16*>(a),
                              reinterpret_cast<const at::BFloat16*>(b), c, /*is_vnni=*/true);
}

void brgemm_f32(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ld_b, int64_t ldc, bool add_c, const float* a,
                const float* b, float* c) {
  at::native::cpublas::brgemm(M, N, K, lda, ld_b, ldc, add_c, a, b, c, /*is_vnni=*/false);
}

void brgemm_release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

namespace {
// The check's operands: small integers, exact in bf16, whose products and sums are exact in fp32.
float value_a(int64_t i, int64_t k) { return static_cast<float>((i * 7 + k * 3) % 9 - 4); }
float value_b(int64_t k, int64_t n) { return static_cast<float>((k * 5 + n * 11) % 7 - 3); }

uint16_t bf16_bits(float f) {  // (exact for these integers)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}

// "" when C (M x N, row stride ldc) holds times * A B, else the first element that does not.
std::string compare(const char* what, int64_t M, int64_t N, int64_t K, const std::vector<float>& c, int64_t ldc,
                    float times) {
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t n = 0; n < N; ++n) {
      float want = 0.0f;
      for (int64_t k = 0; k < K; ++k) want += value_a(i, k) * value_b(k, n);
      want *= times;
      const float got = c[i * ldc + n];
      if (!(got == want)) {
        return std::string(what) + " " + std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K) +
               ": C[" + std::to_string(i) + "][" + std::to_string(n) + "] = " + std::to_string(got) + ", expected " +
               std::to_string(want);
      }
    }
  }
  return "";
}

// product(add_c, c) runs C (+)= A B into c (row stride ldc): "" when it first overwrites C (NaN
// before) with A B, then adds A B to it.
template <typename Product>
std::string check_both_ways(const std::string& what, int64_t M, int64_t N, int64_t K, int64_t ldc, Product product) {
  std::vector<float> c(M * ldc, NAN);
  product(false, c.data());
  const std::string why = compare(what.c_str(), M, N, K, c, ldc, 1.0f);
  if (!why.empty()) return why;
  product(true, c.data());
  return compare((what + " accumulating").c_str(), M, N, K, c, ldc, 2.0f);
}

std::string check_bf16(int64_t M, int64_t N, int64_t K) {  // K even
  const int64_t lda = K + 2, ldc = N + 16;
  std::vector<uint16_t> a(M * lda, 0), b(K * N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) a[i * lda + k] = bf16_bits(value_a(i, k));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) b[(k / 2) * N * 2 + n * 2 + k % 2] = bf16_bits(value_b(k, n));
  return check_both_ways("bf16", M, N, K, ldc, [&](bool add_c, float* c) {
    brgemm_bf16(M, N, K, lda, N, ldc, add_c, a.data(), b.data(), c);
  });
}

std::string check_f32(int64_t M, int64_t N, int64_t K) {
  const int64_t lda = K + 1, ld_b = N + 16, ldc = N + 8;  // (B: a panel of a wider matrix)
  std::vector<float> a(M * lda, 0.0f), b(K * ld_b, NAN);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) a[i * lda + k] = value_a(i, k);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) b[k * ld_b + n] = value_b(k, n);
  return check_both_ways("fp32", M, N, K, ldc, [&](bool add_c, float* c) {
    brgemm_f32(M, N, K, lda, ld_b, ldc, add_c, a.data(), b.data(), c);
  });
}

std::string run_check() {
  std::string why;
  try {
    why = check_bf16(19, 48, 62);
    if (why.empty()) why = check_bf16(64, 64, 64);
    if (why.empty()) why = check_f32(19, 48, 59);
    if (why.empty()) why = check_f32(64, 64, 64);
    brgemm_release();
  } catch (const std::exception& e) {
    why = std::string("brgemm raised: ") + e.what();
  }
  return why.empty() ? "" : "oneDNN's brgemm failed its check on this CPU (" + why + ")";
}
}  // namespace

const char* brgemm_check() {
  static const std::string why = run_check();
  return why.c_str();
}

bool attention_brgemm(bool bf16) {
  return use_brgemm_attention(bf16) && at::globalContext().userEnabledMkldnn() && brgemm_check()[0] == '\0';
}

namespace {
// (each read once per call: a call runs with the sizes it started with)
std::atomic<int64_t> g_fwd_m{BrgemmBlocks{}.fwd_m}, g_fwd_n{BrgemmBlocks{}.fwd_n}, g_bwd_q{BrgemmBlocks{}.bwd_q},
    g_bwd_k{BrgemmBlocks{}.bwd_k};

void check_block(const char* name, int64_t value, int64_t multiple) {
  if (value < multiple || value > 512 || value % multiple != 0) {
    throw std::invalid_argument(std::string(name) + " must be a multiple of " + std::to_string(multiple) +
                                " from " + std::to_string(multiple) + " to 512, got " + std::to_string(value));
  }
}
}  // namespace

BrgemmBlocks brgemm_blocks() {
  return {g_fwd_m.load(std::memory_order_relaxed), g_fwd_n.load(std::memory_order_relaxed),
          g_bwd_q.load(std::memory_order_relaxed), g_bwd_k.load(std::memory_order_relaxed)};
}

void set_brgemm_blocks(const BrgemmBlocks& b) {
  check_block("fwd_m", b.fwd_m, 16);
  check_block("fwd_n", b.fwd_n, kBrgemmPanel);
  check_block("bwd_q", b.bwd_q, 16);
  check_block("bwd_k", b.bwd_k, 16);
  g_fwd_m = b.fwd_m, g_fwd_n = b.fwd_n, g_bwd_q = b.bwd_q, g_bwd_k = b.bwd_k;
}

}  // namespace fastarch::cpu::attention
