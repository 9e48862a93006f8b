// brgemm.h's wrappers of at::native::cpublas::brgemm, compiled with the build's plain flags, and
// the brgemm paths' block sizes.
#include "brgemm.h"

#include <ATen/native/CPUBlas.h>

#include <atomic>
#include <stdexcept>
#include <string>

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
