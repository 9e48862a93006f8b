// oneDNN's brgemm (at::native::cpublas::brgemm, exported by libtorch_cpu) for the attention
// kernels' products: bf16 on the AMX tiles on a CPU with AMX-BF16 (oneDNN requests the tile
// permission and configures the tiles itself), in AVX-512 code on other AVX512-BF16 CPUs, so
// that the path is tested on any of them; fp32 in AVX-512 code everywhere.
//
// Declared here without torch headers and defined in brgemm.cpp, compiled without the AVX-512
// target: the kernels under their target pragmas call these non-inline wrappers, so no torch
// inline function is ever emitted with AVX-512 instructions.
#pragma once
#include <cstdint>

namespace fastarch::cpu::attention {

// Columns per brgemm call, each panel of B packed on its own with ld_b = its width: the panel
// width oneDNN's pack and torch's flash attention use.
constexpr int64_t kBrgemmPanel = 64;

// C (M x N, fp32, row stride ldc) = A B, or C + A B when add_c; A (M x K, bf16, row stride
// lda); B in oneDNN's pack32 layout for bf16, the layout of attention_common.h's pack_b_bf16:
// element (k, n) at (k / 2) * ld_b * 2 + n * 2 + k % 2, K even (a zero row pads it).
void brgemm_bf16(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ld_b, int64_t ldc, bool add_c,
                 const uint16_t* a, const uint16_t* b, float* c);
// The same in fp32, B row-major (element (k, n) at k * ld_b + n): oneDNN's AVX-512 code (AMX
// has no fp32 products).
void brgemm_f32(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ld_b, int64_t ldc, bool add_c, const float* a,
                const float* b, float* c);

// The calling thread's tile configuration released (AMX), before the thread pool runs other
// work on the thread.
void brgemm_release();

// Whether brgemm computes what the kernels ask of it on this CPU: "" when it does, else why
// not. Checked once per process on small products of integers (every order of the sums gives
// the same bits, so the check is exact) in the layouts and strides the kernels pass: bf16 B as
// pack32 panels of 48 and 64 columns with ld_b = their width, K not a multiple of 32, row
// strides wider than the products, C overwritten (its NaN must not leak) and accumulated;
// fp32 B with ld_b wider than N. oneDNN's AMX code has run on no CPU we could test on: a product
// it got wrong there must give the register tiles' attention, not a wrong one.
const char* brgemm_check();

// Whether the attention forward and backward of bf16 (else fp32 / fp16) inputs run through
// brgemm: the mode's choice (cpu/isa.h: use_brgemm_attention), torch's oneDNN enabled
// (torch.backends.mkldnn: brgemm refuses to run otherwise), and brgemm_check passed.
bool attention_brgemm(bool bf16);

// Block sizes of the brgemm paths (larger than the register tiles' blocks, so that each brgemm
// call, a kernel lookup and on AMX a tile load and store of C, has more work): the forward's
// queries per task (fwd_m) x keys per online-softmax step (fwd_n), the backward's queries (bwd_q)
// x keys (bwd_k) per tile. The forward's measured on the 2-core Zen 4 (bf16, 1x12xSx64, S 1024
// and 4096, causal and not, interleaved with the register tiles; a shared machine, +-15%):
// 128 x 256 and 64 x 256 ~1.1x the tiles, 64 x 128 ~1.0x, 64 x 512 0.8x at S 1024 causal (the
// diagonal's wasted keys); the backward's 64 x 64 are the register tiles' (parity with them on
// that CPU, 2026-12-05). Owed: the same on an AMX Xeon, which bench/attention_cpu_paths.py
// --blocks measures in one run (set_brgemm_blocks between the calls).
struct BrgemmBlocks {
  int64_t fwd_m = 128, fwd_n = 256, bwd_q = 64, bwd_k = 64;
};
BrgemmBlocks brgemm_blocks();
// Each a multiple of 16 from 16 to 512, fwd_n a multiple of kBrgemmPanel; std::invalid_argument
// naming the one that is not.
void set_brgemm_blocks(const BrgemmBlocks& blocks);

}  // namespace fastarch::cpu::attention
