// CPU implementation of fastarch::_append_kv: the new tokens' keys and values copied into the
// caches at each sequence's end, one row copy per (sequence, kv head, token), over torch's
// thread pool. A decoding step appends one token per sequence: a few KB, so the copy is
// bandwidth and the point is doing it in one pass without index tensors.
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace fastarch::cpu::attention {
namespace {

using at::Tensor;

constexpr const char* kWho = "fastarch::_append_kv (cpu)";

void check_pair(const Tensor& cache, const Tensor& fresh, const char* cache_name, const char* new_name) {
  TORCH_CHECK(cache.dim() == 4 && fresh.dim() == 4, kWho, ": ", cache_name, " and ", new_name,
              " must be 4-D (batch, kv_heads, seq, head_dim), got shapes ", cache.sizes(), " and ", fresh.sizes());
  TORCH_CHECK(cache.device().is_cpu() && fresh.device().is_cpu(), kWho, ": ", cache_name, " and ", new_name,
              " must be CPU tensors");
  TORCH_CHECK(cache.scalar_type() == fresh.scalar_type(), kWho, ": ", new_name, " must have ", cache_name,
              "'s dtype ", cache.scalar_type(), ", got ", fresh.scalar_type());
  TORCH_CHECK(cache.size(0) == fresh.size(0) && cache.size(1) == fresh.size(1) && cache.size(3) == fresh.size(3),
              kWho, ": ", new_name, " ", fresh.sizes(), " must match ", cache_name, " ", cache.sizes(),
              " in batch, heads and head dim");
  TORCH_CHECK(cache.size(3) <= 1 || (cache.stride(3) == 1 && fresh.stride(3) == 1), kWho, ": ", cache_name, " and ",
              new_name, " must have a contiguous last dim");
}

void append_kv_cpu(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k_new, const Tensor& v_new,
                   const Tensor& cache_seqlens) {
  check_pair(k_cache, k_new, "k_cache", "k_new");
  check_pair(v_cache, v_new, "v_cache", "v_new");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), kWho, ": v_cache must have k_cache's dtype ",
              k_cache.scalar_type(), ", got ", v_cache.scalar_type());
  const int64_t B = k_cache.size(0), Hkv = k_cache.size(1), S_max = k_cache.size(2), S_new = k_new.size(2);
  TORCH_CHECK(v_cache.size(2) == S_max && v_new.size(2) == S_new, kWho,
              ": k and v caches (and new tokens) must have the same lengths, got ", k_cache.sizes(), " / ",
              v_cache.sizes(), " and ", k_new.sizes(), " / ", v_new.sizes());
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B &&
                  cache_seqlens.device().is_cpu(),
              kWho, ": cache_seqlens must be an int32 CPU tensor of shape (batch,) = (", B, ",), got ",
              cache_seqlens.scalar_type(), " of shape ", cache_seqlens.sizes());
  const Tensor lens = cache_seqlens.contiguous();
  const int32_t* len = lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 0 && len[b] + S_new <= S_max, kWho, ": cache_seqlens[", b, "] = ", len[b], " leaves no room for ",
                S_new, " tokens in the cache's ", S_max, " slots");
  }
  if (S_new == 0) return;
  const int64_t es = k_cache.element_size();
  struct Pair {
    const Tensor& cache;
    const Tensor& fresh;
  };
  const Pair pairs[2] = {{k_cache, k_new}, {v_cache, v_new}};
  at::parallel_for(0, B * Hkv * S_new, 64, [&](int64_t begin, int64_t end) {
    for (const Pair& pr : pairs) {
      char* dst = static_cast<char*>(pr.cache.data_ptr());
      const char* src = static_cast<const char*>(pr.fresh.data_ptr());
      const int64_t row_bytes = pr.cache.size(3) * es;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t t = r % S_new, h = (r / S_new) % Hkv, b = r / (S_new * Hkv);
        const int64_t slot = len[b] + t;
        std::memcpy(dst + (b * pr.cache.stride(0) + h * pr.cache.stride(1) + slot * pr.cache.stride(2)) * es,
                    src + (b * pr.fresh.stride(0) + h * pr.fresh.stride(1) + t * pr.fresh.stride(2)) * es, row_bytes);
      }
    }
  });
}

}  // namespace
}  // namespace fastarch::cpu::attention

TORCH_LIBRARY_IMPL(fastarch, CPU, m) { m.impl("_append_kv", &fastarch::cpu::attention::append_kv_cpu); }
