// The few hardware operations the attention kernels use, each in a small device function:
// tensor-core mma.sync, ldmatrix, cp.async, barriers, shuffles, shared-memory accesses,
// exp2. The kernels call nothing else that touches shared memory or other threads, so that
// a CPU emulator of the CUDA thread model can run the kernels' own code: it defines
// FASTARCH_ATTENTION_EMULATED and provides these functions itself (with the PTX ISA's
// fragment layouts and cp.async's asynchronous completion).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastarch::cuda::attention {

#ifndef FASTARCH_ATTENTION_EMULATED

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The block's dynamic shared memory.
__device__ __forceinline__ char* dynamic_smem() {
  extern __shared__ __align__(128) char attention_smem[];
  return attention_smem;
}

// Four 8x8 matrices of 16-bit elements: lane l gives the address of row l % 8 of matrix
// l / 8 (16 contiguous bytes); register i of lane l receives row l / 4, columns
// 2 (l % 4) and 2 (l % 4) + 1 of matrix i (the lower column in the low half).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

// The same, transposed: register i of lane l holds rows 2 (l % 4) and 2 (l % 4) + 1 of
// column l / 4 of matrix i.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

// d += a (16x16, row) * b (16x8, col) with fp32 accumulators (fragments of the PTX ISA's
// mma.m16n8k16: lane l = 4 g + c holds a rows g, g + 8 / columns 2c, 2c + 1, 2c + 8, 2c + 9;
// b rows 2c, 2c + 1, 2c + 8, 2c + 9 of column g; d rows g, g + 8 of columns 2c, 2c + 1).
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16x8x16<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16x8x16<__nv_bfloat16>(
    float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 16 bytes global -> shared, asynchronous (completes at cp_async_wait); zeros when !valid
// (src is then not read: src-size 0).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

// 4 bytes global -> shared, asynchronous; zeros when !valid.
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_address(dst)), "l"(src),
               "r"(valid ? 4 : 0)
               : "memory");
}

// Closes the group of this thread's copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void block_sync() { __syncthreads(); }
__device__ __forceinline__ void warp_sync() { __syncwarp(); }

__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

// 2^x (approximate, ~2 ulp; flushes subnormal results to zero; 2^-inf = 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Ordinary shared-memory accesses.
__device__ __forceinline__ void st_shared_u32(void* p, uint32_t v) { *static_cast<uint32_t*>(p) = v; }
__device__ __forceinline__ void st_shared_f32(void* p, float v) { *static_cast<float*>(p) = v; }
__device__ __forceinline__ float ld_shared_f32(const void* p) { return *static_cast<const float*>(p); }
__device__ __forceinline__ float4 ld_shared_f32x4(const void* p) { return *static_cast<const float4*>(p); }
__device__ __forceinline__ void st_shared_f32x4(void* p, float4 v) { *static_cast<float4*>(p) = v; }

__device__ __forceinline__ void atomic_add_f32(float* p, float v) { atomicAdd(p, v); }

#endif  // FASTARCH_ATTENTION_EMULATED

}  // namespace fastarch::cuda::attention
