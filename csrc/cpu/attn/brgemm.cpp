// brgemm.h's wrappers of at::native::cpublas::brgemm, compiled with the build's plain flags.
#include "brgemm.h"

#include <ATen/native/CPUBlas.h>

namespace fastarch::cpu::attention {

void brgemm_bf16(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ld_b, int64_t ldc, bool add_c,
                 const uint16_t* a, const uint16_t* b, float* c) {
  at::native::cpublas::brgemm(M, N, K, lda, ld_b, ldc, add_c, reinterpret_cast<const at::BFloat16*>(a),
                              reinterpret_cast<const at::BFloat16*>(b), c, /*is_vnni=*/true);
}

void brgemm_release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

}  // namespace fastarch::cpu::attention
