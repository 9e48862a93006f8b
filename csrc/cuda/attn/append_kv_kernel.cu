// fastarch::_append_kv on CUDA: one block per (token, kv head, sequence) copies that token's
// key and value rows into the caches at the sequence's end, 16 bytes per thread where the
// rows allow it. A slot outside the cache is skipped (never written); the Python op asserts
// the lengths on the device, so a wrong length is an error, not a silent write elsewhere.
#include <cstdint>

#include "attention_launch.h"

namespace fastarch::cuda::attention {
namespace {

template <typename Chunk>
__global__ void append_kv_kernel(AppendKvParams p) {
  const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t slot = static_cast<int64_t>(p.cache_seqlens[b]) + t;
  if (slot < 0 || slot >= p.cache_len) return;
  for (int which = 0; which < 2; ++which) {
    const AppendKvParams::Rows& r = p.rows[which];
    auto* dst = reinterpret_cast<Chunk*>(static_cast<char*>(r.cache) +
                                         (b * r.cache_strides.batch + h * r.cache_strides.head +
                                          slot * r.cache_strides.row) * p.element_size);
    const auto* src = reinterpret_cast<const Chunk*>(static_cast<const char*>(r.fresh) +
                                                     (b * r.fresh_strides.batch + h * r.fresh_strides.head +
                                                      t * r.fresh_strides.row) * p.element_size);
    const int chunks = static_cast<int>(r.row_bytes / sizeof(Chunk));
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) dst[c] = src[c];
  }
}

bool aligned16(const AppendKvParams& p) {
  for (const AppendKvParams::Rows& r : p.rows) {
    const int64_t stride_bytes[] = {r.cache_strides.batch, r.cache_strides.head, r.cache_strides.row,
                                    r.fresh_strides.batch, r.fresh_strides.head, r.fresh_strides.row};
    if (r.row_bytes % 16 || reinterpret_cast<uintptr_t>(r.cache) % 16 || reinterpret_cast<uintptr_t>(r.fresh) % 16)
      return false;
    for (const int64_t s : stride_bytes) {
      if ((s * p.element_size) % 16) return false;
    }
  }
  return true;
}

}  // namespace

cudaError_t append_kv(const AppendKvParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.kv_heads == 0 || p.new_tokens == 0) return cudaSuccess;
  const dim3 grid(p.new_tokens, p.kv_heads, p.batch);
  if (aligned16(p)) {
    append_kv_kernel<uint4><<<grid, 64, 0, stream>>>(p);
  } else {
    append_kv_kernel<unsigned char><<<grid, 128, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace fastarch::cuda::attention
