// The portable attention kernels' register-tile products (csrc/cpu/attn/attention_generic.h)
// in their AVX2 build, B row-major (gemm / gemm_acc) against B packed in column panels
// (gemm_panels), at the forward's two shapes: S = Q K^T (72 x 128 x 64) and O += P V
// (72 x 64 x 128). One thread, CPU time, three rounds. Build and run from the repository root:
//
//   T=$(python -c 'import torch, os; print(os.path.dirname(torch.__file__))')
//   g++ -O3 -std=c++20 -ffp-contract=off -DFASTARCH_WITH_AVX2 -Icsrc -I$T/include \
//       bench/portable_gemm.cpp -o /tmp/portable_gemm && /tmp/portable_gemm
#define FASTARCH_PORTABLE_AVX2
#include <cstdio>
#include <ctime>
#include <vector>

#include "cpu/attn/attention_generic.h"

FASTARCH_PORTABLE_BEGIN

using namespace fastarch::cpu::attention::generic;

namespace {

double cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

__attribute__((noinline)) void row_major(int M, int N, int K, const float* a, int lda, const float* b, float* c,
                                         bool acc) {
  if (acc) {
    gemm_acc(M, N, K, a, lda, b, N, c, N);
  } else {
    gemm(M, N, K, a, lda, b, N, c, N);
  }
}

__attribute__((noinline)) void panels(int M, int N, int K, const float* a, int lda, const float* b, float* c,
                                      bool acc) {
  if (acc) {
    gemm_panels<true>(M, N, K, a, lda, b, K * kNR, c, N);
  } else {
    gemm_panels<false>(M, N, K, a, lda, b, K * kNR, c, N);
  }
}

}  // namespace

int main() {
  struct Shape {
    int M, N, K;
    bool acc;
    const char* what;
  };
  for (const Shape sh : {Shape{72, 128, 64, false, "S = Q K^T"}, Shape{72, 64, 128, true, "O += P V"}}) {
    const int M = sh.M, N = sh.N, K = sh.K, lda = K;
    std::vector<float> a(M * K, 0.5f), b(K * N, 0.25f), packed(K * N), c(M * N);
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < N; ++n) packed[panel_index(k, n, K * kNR)] = b[k * N + n];
    constexpr int kReps = 3000;
    const double flops = 2.0 * M * N * K * kReps;
    for (int round = 0; round < 3; ++round) {
      const double t0 = cpu_seconds();
      for (int r = 0; r < kReps; ++r) row_major(M, N, K, a.data(), lda, b.data(), c.data(), sh.acc);
      const double t1 = cpu_seconds();
      for (int r = 0; r < kReps; ++r) panels(M, N, K, a.data(), lda, packed.data(), c.data(), sh.acc);
      const double t2 = cpu_seconds();
      std::printf("%-10s %dx%dx%d: B row-major %.1f GFLOP/s, B in panels %.1f GFLOP/s\n", sh.what, M, N, K,
                  flops / (t1 - t0) / 1e9, flops / (t2 - t1) / 1e9);
    }
  }
}

FASTARCH_PORTABLE_END
