// oneDNN's brgemm (at::native::cpublas::brgemm, exported by libtorch_cpu) for the bf16 attention
// kernels' products: on the AMX tiles on a CPU with AMX-BF16 (oneDNN requests the tile
// permission and configures the tiles itself), in AVX-512 code on other AVX512-BF16 CPUs, so
// that the path is tested on any of them.
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

// The calling thread's tile configuration released (AMX), before the thread pool runs other
// work on the thread.
void brgemm_release();

}  // namespace fastarch::cpu::attention
