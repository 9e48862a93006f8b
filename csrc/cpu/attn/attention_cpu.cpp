// CPU implementation of fastarch::_attention_fwd and fastarch::_attention_decode: argument
// checks, allocation, the work plan, and torch's thread pool (at::parallel_for) around the
// kernels of attention_kernels.h: AVX-512 (attention_fwd_avx512.cpp,
// attention_decode_avx512.cpp) when they are compiled in and the CPU runs them, else portable
// (attention_fwd_generic.cpp, attention_decode_generic.cpp); the forward through oneDNN's brgemm
// (attention_fwd_brgemm.cpp) for bf16 at isa level amx, for every dtype when forced (cpu/isa.h:
// set_brgemm), unless torch's oneDNN is disabled (torch.backends.mkldnn), which brgemm then
// refuses. (The backward, fastarch::_attention_bwd, registers in its own translation unit.)
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "attention_common.h"
#include "attention_glue.h"
#include "attention_kernels.h"
#include "cpu/isa.h"
#include "cpu/portable.h"

namespace fastarch::cpu::attention {
namespace {

using at::Tensor;

// ----------------------------------------------------------------------------- forward

// The forward's tasks (sequence, head, block of block_m queries), costliest first: taken
// dynamically, the threads finish together even when causal masks make the tasks' costs differ
// by the sequence length.
std::vector<FwdTask> plan_fwd_tasks(const AttentionParams& p, int64_t block_m, int64_t block_n) {
  std::vector<FwdTask> tasks;
  std::vector<int64_t> cost;
  for (int64_t n = 0; n < p.num_seqs; ++n) {
    const SeqSpan s = seq_span(p, n);
    for (int64_t qb = 0; qb * block_m < s.sq; ++qb) {
      const int64_t i0 = qb * block_m, i1 = std::min(s.sq, i0 + block_m);
      const KeyRange first = visible_keys(p, s, i0), last = visible_keys(p, s, i1 - 1);
      const int64_t blocks = last.hi > first.lo ? (last.hi + block_n - 1) / block_n - first.lo / block_n : 0;
      for (int64_t h = 0; h < p.H; ++h) {
        tasks.push_back({static_cast<int32_t>(n), static_cast<int32_t>(h), static_cast<int32_t>(qb)});
        cost.push_back(blocks * 4 + 1);  // a block of keys against the fixed cost of a task
      }
    }
  }
  std::vector<int64_t> order(tasks.size());
  for (size_t t = 0; t < order.size(); ++t) order[t] = static_cast<int64_t>(t);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::vector<FwdTask> sorted(tasks.size());
  for (size_t t = 0; t < order.size(); ++t) sorted[t] = tasks[order[t]];
  return sorted;
}

// K and V packed lazily into blocks of block_n keys (attention_kernels.h's FwdPacking): one
// block per (sequence, kv head, key block), in the compute type (bf16 for bf16_gemm, else fp32).
struct Packing {
  FwdPacking pk{};
  std::vector<int64_t> seq_block0;
  std::vector<int32_t> block_state;
  Tensor packed;

  Packing(const AttentionParams& p, const Tensor& q, int64_t block_n, bool bf16_gemm) {
    pk.bf16_gemm = bf16_gemm;
    pk.d_pad = bf16_gemm ? (p.D + 1) / 2 * 2 : p.D;
    pk.dv_pad = (p.Dv + 15) / 16 * 16;
    pk.k_block_elems = pk.d_pad * block_n;
    pk.v_block_elems = block_n * pk.dv_pad;
    seq_block0.assign(p.num_seqs + 1, 0);
    for (int64_t n = 0; n < p.num_seqs; ++n) {
      seq_block0[n + 1] = seq_block0[n] + (seq_span(p, n).sk + block_n - 1) / block_n;
    }
    const int64_t num_blocks = seq_block0.back() * p.Hkv;
    const int64_t block_bytes = (pk.k_block_elems + pk.v_block_elems) * (bf16_gemm ? 2 : 4);
    packed = at::empty({std::max<int64_t>(num_blocks * block_bytes, 1)}, q.options().dtype(at::kByte));
    block_state.assign(num_blocks, 0);
    pk.seq_block0 = seq_block0.data();
    pk.packed = packed.data_ptr();
    pk.block_state = block_state.data();
  }
  Packing(const Packing&) = delete;
  Packing& operator=(const Packing&) = delete;
};

// Runs run(tasks, num_tasks, &next, scratch) on each thread with its scratch of scratch_bytes.
template <typename Run>
void run_fwd_tasks(const Tensor& q, const std::vector<FwdTask>& tasks, int64_t scratch_bytes, Run run) {
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_tasks));
  Tensor scratch = at::empty({threads * scratch_bytes}, q.options().dtype(at::kByte));
  int64_t next = 0;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      run(tasks.data(), num_tasks, &next, static_cast<char*>(scratch.data_ptr()) + t * scratch_bytes);
  });
}

#ifdef FASTARCH_WITH_AVX512
// The AVX-512 forwards: tasks of block_m queries; brgemm: the products of
// attention_fwd_brgemm.cpp, else the register tiles of attention_fwd_avx512.cpp.
void fwd_avx512(const AttentionParams& p, const Tensor& q, bool brgemm) {
  const BrgemmBlocks blocks = brgemm_blocks();
  const int64_t block_m = brgemm ? blocks.fwd_m : kFwdBlockM, block_n = brgemm ? blocks.fwd_n : kFwdBlockN;
  const Packing packing(p, q, block_n, p.dtype == Dtype::bf16);
  const FwdPacking& pk = packing.pk;
  const int64_t scratch_bytes = brgemm ? fwd_scratch_bytes_brgemm(pk, blocks) : fwd_scratch_bytes(p, pk);
  run_fwd_tasks(q, plan_fwd_tasks(p, block_m, block_n), scratch_bytes,
                [&](const FwdTask* tasks, int64_t num_tasks, int64_t* next, void* scratch) {
                  if (brgemm) {
                    fwd_run_brgemm(p, pk, blocks, tasks, num_tasks, next, scratch);
                  } else {
                    fwd_run_avx512(p, pk, tasks, num_tasks, next, scratch);
                  }
                });
}
#endif

// The portable forward, in its AVX2 or baseline build: fp32 products over K and V packed in fp32.
void fwd_generic(const AttentionParams& p, const Tensor& q) {
  const Packing packing(p, q, kFwdBlockNGeneric, false);
  with_portable_build([&]<Isa I>() {
    run_fwd_tasks(q, plan_fwd_tasks(p, kFwdBlockMGeneric, kFwdBlockNGeneric), fwd_scratch_bytes_generic<I>(p),
                  [&](const FwdTask* tasks, int64_t num_tasks, int64_t* next, void* scratch) {
                    fwd_run_generic<I>(p, packing.pk, tasks, num_tasks, next, scratch);
                  });
  });
}

void run_decode(const DecodeParams& p, int64_t max_len, const Tensor& q);

// Whether a forward call is a decode step: one query per sequence against its keys, with no
// mask, padding, packing or dropout to apply (transformers' attention calls the forward so at
// every new token, with its own cache). The decode kernel runs those: it streams each kv
// head's keys once for all its query heads and packs nothing (1x9x1x(16-512)x64 bf16, 3 kv
// heads, on an AMD EPYC, Zen 4, 2 threads: 7.9-24.8 us against the forward's 17.5-69.5).
bool decode_shaped(const AttentionParams& p) {
  return p.Sq == 1 && p.Sk > 0 && p.Sk <= INT32_MAX && !p.cu_seqlens_q && !p.attn_mask && !p.key_padding_mask &&
         !p.dropout;
}

// The decode kernel on a decode-shaped forward call: every key of each sequence filled, the
// window's left bound as decode's (the one query sits at the last key, so no key lies right of it).
void fwd_as_decode(const AttentionParams& p, const Tensor& q) {
  DecodeParams d{};
  d.dtype = p.dtype;
  d.q = p.q, d.k_cache = p.k, d.v_cache = p.v, d.out = p.out, d.lse = p.lse;
  std::copy_n(p.q_stride, 3, d.q_stride), std::copy_n(p.k_stride, 3, d.k_stride);
  std::copy_n(p.v_stride, 3, d.v_stride), std::copy_n(p.out_stride, 3, d.out_stride);
  d.B = p.B, d.H = p.H, d.Hkv = p.Hkv, d.Sq = 1, d.S_max = p.Sk, d.D = p.D, d.Dv = p.Dv;
  const std::vector<int32_t> lens(p.B, static_cast<int32_t>(p.Sk));
  d.cache_seqlens = lens.data();
  d.scale = p.scale;
  d.causal = true;
  d.window_left = p.window_left;
  run_decode(d, p.Sk, q);
}

std::tuple<Tensor, Tensor> attention_fwd_cpu(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& attn_mask,
    const std::optional<Tensor>& key_padding_mask, const std::optional<Tensor>& cu_seqlens_q,
    const std::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale,
    int64_t window_left, int64_t window_right, double dropout_p, int64_t seed) {
  const char* who = "fastarch::_attention_fwd (cpu)";
  AttentionInputs in;
  in.fill(who, q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal, scale, window_left,
          window_right, dropout_p, seed);
  const Dtype dtype = dtype_of(who, q);
  (void)max_seqlen_q, (void)max_seqlen_k;  // the glue reads the offsets themselves
  AttentionParams& p = in.p;
  p.dtype = dtype;

  Tensor out = make_out(q, p.Dv);
  Tensor lse = at::empty({p.B, p.H, p.Sq}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  set_strides(p.out_stride, out);
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (decode_shaped(p)) {
    fwd_as_decode(p, q);
    return {out, lse};
  }
#ifdef FASTARCH_WITH_AVX512
  if (use_avx512(dtype)) {
    fwd_avx512(p, q, attention_brgemm(dtype == Dtype::bf16));
    return {out, lse};
  }
#endif
  fwd_generic(p, q);
  return {out, lse};
}

// ----------------------------------------------------------------------------- decode

// The decode kernel of one build (attention_kernels.h).
struct DecodeKernel {
  int64_t (*item_floats)(const DecodeParams&);
  int64_t (*scratch_bytes)(const DecodeParams&);
  void (*chunks)(const DecodeParams&, int64_t, int64_t, int64_t, int64_t, float*, void*);
  void (*combine)(const DecodeParams&, int64_t, int64_t, int64_t, const float*);
};

DecodeKernel decode_kernel(bool avx512) {
#ifdef FASTARCH_WITH_AVX512
  if (avx512) return {decode_item_floats, decode_scratch_bytes, decode_chunks_avx512, decode_combine_avx512};
#endif
  (void)avx512;
  return with_portable_build([]<Isa I>() -> DecodeKernel {
    return {decode_item_floats_generic<I>, decode_scratch_bytes_generic<I>, decode_chunks_generic<I>,
            decode_combine_generic<I>};
  });
}

// Runs the decode kernel on p (lengths, output and lse set; max_len its longest length).
void run_decode(const DecodeParams& p, int64_t max_len, const Tensor& q) {
  const int64_t B = p.B, Hkv = p.Hkv;
  // Chunks of the caches: long enough to stream (and to keep the partials few), short enough
  // that there are at least kMinItems (several per thread) even for one sequence and one kv
  // head. Not a function of the thread count, so the result does not depend on it.
  constexpr int64_t kMinItems = 32;
  const int64_t threads = at::get_num_threads();
  int64_t chunk_len = 1024;
  while (chunk_len > 64 && B * Hkv * ((max_len + chunk_len - 1) / chunk_len) < kMinItems) chunk_len /= 2;
  const int64_t chunks = std::max<int64_t>(1, (max_len + chunk_len - 1) / chunk_len);
  const int64_t items = B * Hkv * chunks;
  // Waking the thread pool costs several microseconds (~6 on a shared 2-core EPYC), as long as
  // one thread takes to read ~128 KB of cache: a small model's step over its first few hundred
  // keys runs on the calling thread (the same items, so the same result).
  const int64_t cache_bytes = B * Hkv * max_len * (p.D + p.Dv) * elem_size(p.dtype);
  const int64_t workers = cache_bytes < (int64_t{128} << 10) ? 1 : threads;
  const DecodeKernel kernel = decode_kernel(use_avx512(p.dtype));
  Tensor partials = at::empty({items * kernel.item_floats(p)}, q.options().dtype(at::kFloat));
  const int64_t scratch_bytes = kernel.scratch_bytes(p);
  Tensor scratch = at::empty({workers * scratch_bytes}, q.options().dtype(at::kByte));
  // One parallel region: items are taken dynamically (on a shared machine a thread that loses
  // its core leaves its share to the others), and whichever thread completes the last chunk of
  // a (b, kv head) combines its partials, so no barrier separates the two steps.
  std::atomic<int64_t> next{0};
  std::vector<std::atomic<int64_t>> done(B * Hkv);
  for (auto& d : done) d.store(0, std::memory_order_relaxed);
  float* part = partials.data_ptr<float>();
  const auto work = [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      void* own = static_cast<char*>(scratch.data_ptr()) + w * scratch_bytes;
      for (int64_t t = next++; t < items; t = next++) {
        kernel.chunks(p, chunk_len, chunks, t, t + 1, part, own);
        const int64_t bh = t / chunks;
        if (done[bh].fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) kernel.combine(p, chunks, bh, bh + 1, part);
      }
    }
  };
  if (workers == 1) return work(0, 1);
  at::parallel_for(0, workers, 1, work);
}

std::tuple<Tensor, Tensor> attention_decode_cpu(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                                const Tensor& cache_seqlens, bool causal, double scale,
                                                int64_t window_left) {
  const char* who = "fastarch::_attention_decode (cpu)";
  check_4d(who, q, "q", q);
  check_4d(who, k_cache, "k_cache", q);
  check_4d(who, v_cache, "v_cache", q);
  const Dtype dtype = dtype_of(who, q);
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(1), S_max = k_cache.size(2), Dv = v_cache.size(3);
  TORCH_CHECK(k_cache.size(0) == B && v_cache.size(0) == B, who,
              ": q, k_cache and v_cache must have the same batch size, got ", B, ", ", k_cache.size(0), ", ",
              v_cache.size(0));
  TORCH_CHECK(v_cache.size(1) == Hkv && v_cache.size(2) == S_max, who,
              ": k_cache and v_cache must have the same heads and slots, got shapes ", k_cache.sizes(), " and ",
              v_cache.sizes());
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, who, ": q's ", H, " heads must be a multiple of the caches' ", Hkv, " heads");
  TORCH_CHECK(k_cache.size(3) == D, who, ": q and k_cache must have the same head dim, got ", D, " and ",
              k_cache.size(3));
  TORCH_CHECK(std::isfinite(scale), who, ": scale must be finite, got ", scale);
  TORCH_CHECK(window_left >= -1, who, ": window_left must be >= 0 or -1, got ", window_left);
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B &&
                  cache_seqlens.device().is_cpu(),
              who, ": cache_seqlens must be an int32 CPU tensor of shape (batch,) = (", B, ",), got ",
              cache_seqlens.scalar_type(), " of shape ", cache_seqlens.sizes(), " on ", cache_seqlens.device());
  const Tensor seqlens = cache_seqlens.contiguous();
  const int32_t* lens = seqlens.data_ptr<int32_t>();
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] <= S_max, who, ": cache_seqlens must be between 0 and the cache's ", S_max,
                " slots, got ", lens[b], " for sequence ", b);
    max_len = std::max<int64_t>(max_len, lens[b]);
  }

  DecodeParams p{};
  p.dtype = dtype;
  p.q = q.data_ptr(), p.k_cache = k_cache.data_ptr(), p.v_cache = v_cache.data_ptr();
  set_strides(p.q_stride, q), set_strides(p.k_stride, k_cache), set_strides(p.v_stride, v_cache);
  p.B = B, p.H = H, p.Hkv = Hkv, p.Sq = Sq, p.S_max = S_max, p.D = D, p.Dv = Dv;
  p.cache_seqlens = lens;
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.window_left = window_left;
  Tensor out = make_out(q, Dv);
  Tensor lse = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  set_strides(p.out_stride, out);
  if (lse.numel() == 0) return {out, lse};

  run_decode(p, max_len, q);
  return {out, lse};
}

}  // namespace
}  // namespace fastarch::cpu::attention

TORCH_LIBRARY_IMPL(fastarch, CPU, m) {
  m.impl("_attention_fwd", &fastarch::cpu::attention::attention_fwd_cpu);
  m.impl("_attention_decode", &fastarch::cpu::attention::attention_decode_cpu);
}
