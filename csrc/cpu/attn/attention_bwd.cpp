// CPU implementation of fastarch::_attention_bwd: argument checks, BackwardParams from
// tensors, the workspace, and the threading of the three passes of attention_bwd.h, run by the
// AVX-512 kernel (its products through oneDNN's brgemm as the forward's: bf16 at level amx,
// every dtype when forced; cpu/isa.h) or, on CPUs without AVX-512 BF16 (and for fastarch._C._set_cpu_isa
// ("generic")), the portable one.
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "attention_bwd.h"
#include "attention_glue.h"
#include "brgemm.h"
#include "cpu/isa.h"
#include "cpu/portable.h"

namespace fastarch::cpu::attention {
namespace {

using at::Tensor;

// Tile sizes (queries x keys) of the register tiles (brgemm's: brgemm.h, BrgemmBlocks): 64 x 64
// keeps a tile's operands and its fp32 scores in L1/L2; on the 2-core Zen 4 (bf16, B1 H12 S4096
// D64, one thread) 64..128 in either measured within the noise (the time is in the GEMM tiles,
// which run near the vdpbf16ps peak at K >= 64).
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;
// Key-block chunks: (sequences x kv heads x chunks) should give at least kMinItems work items,
// so that the threads stay busy (the B1 H12 goal shape: 12 items of one chunk); each chunk
// beyond the first costs an fp32 dQ-sized buffer, hence at most kMaxChunks. The count depends
// on the shapes only, so the sums (and results) are the same for any thread count. (The
// alternative, a second pass over query blocks for dQ, would recompute S and dP: 7 tile
// products instead of 5, where the whole dQ reduction here measures under 2% of the time.)
constexpr int64_t kMinItems = 12;
constexpr int64_t kMaxChunks = 4;

Tensor last_dim_contiguous(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// The passes of one build of the kernel (attention_bwd.h).
struct BwdKernel {
  int64_t (*workspace_floats)(const BackwardParams&);
  void (*prepare_block)(const BackwardParams&, int64_t, int64_t, int64_t);
  void (*key_chunk)(const BackwardParams&, int64_t, int64_t, int64_t, float*);
  void (*finish_block)(const BackwardParams&, int64_t, int64_t, int64_t);
};

BwdKernel bwd_kernel(bool avx512) {
#ifdef FASTARCH_WITH_AVX512
  if (avx512) return {bwd_workspace_floats, bwd_prepare_block, bwd_key_chunk, bwd_finish_block};
#endif
  (void)avx512;
  return with_portable_build([]<Isa I>() -> BwdKernel {
    return {bwd_workspace_floats_generic<I>, bwd_prepare_block_generic<I>, bwd_key_chunk_generic<I>,
            bwd_finish_block_generic<I>};
  });
}

// ----------------------------------------------------------------------------- the op

std::tuple<Tensor, Tensor, Tensor> attention_bwd_cpu(
    const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& out_in,
    const Tensor& lse_in, const std::optional<Tensor>& attn_mask, const std::optional<Tensor>& key_padding_mask,
    const std::optional<Tensor>& cu_seqlens_q, const std::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double scale, int64_t window_left, int64_t window_right, double dropout_p,
    int64_t seed) {
  const char* op = "fastarch::_attention_bwd (cpu)";
  // q, k, v as the forward checks them (read in place when their last dims are contiguous).
  const Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  BackwardParams p{};
  AttentionInputs in;
  in.fill(op, q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal, scale, window_left,
          window_right, dropout_p, seed);
  (void)max_seqlen_q, (void)max_seqlen_k;  // the glue reads the offsets themselves
  const auto dtype = q.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), op, ": q must be a floating-point tensor, got ", dtype);
  const int64_t B = in.p.B, H = in.p.H, Sq = in.p.Sq, D = in.p.D, Hkv = in.p.Hkv, Dv = in.p.Dv;
  for (const auto& [name, t] : {std::pair{"dout", &dout_in}, {"out", &out_in}}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dtype, op, ": ", name, " must be a CPU tensor of q's dtype ",
                dtype, ", got ", t->scalar_type(), " on ", t->device());
    TORCH_CHECK(t->sizes() == at::IntArrayRef({B, H, Sq, Dv}), op, ": ", name, " must be (B, H, Sq, Dv) = ",
                at::IntArrayRef({B, H, Sq, Dv}), ", got ", t->sizes());
  }
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({B, H, Sq}), op, ": lse must be (B, H, Sq) = ",
              at::IntArrayRef({B, H, Sq}), ", got ", lse_in.sizes());
  const Tensor dout = last_dim_contiguous(dout_in), out = last_dim_contiguous(out_in);
  const Tensor lse = lse_in.to(at::kFloat).contiguous();
  const int64_t wl = in.p.window_left, wr = in.p.window_right;
  std::vector<SeqSpan> seqs;
  for (int64_t n = 0; n < in.p.num_seqs; ++n) seqs.push_back(seq_span(in.p, n));

  // The AVX-512 kernel's translation unit is compiled with AVX512-BF16 for every dtype.
  const bool avx512 = use_avx512(Dtype::bf16);

  // Rows outside every packed sequence get no gradient; otherwise every row is written.
  Tensor dq = cu_seqlens_q ? at::zeros_like(q) : at::empty_like(q);
  Tensor dk = cu_seqlens_q ? at::zeros_like(k) : at::empty_like(k);
  Tensor dv = cu_seqlens_q ? at::zeros_like(v) : at::empty_like(v);
  if (q.numel() == 0 && k.numel() == 0) return {dq, dk, dv};
  if (H == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};

  p.a = in.p;
  AttentionParams& a = p.a;
  a.dtype = dtype_of(op, q);
  const BwdKernel kernel = bwd_kernel(avx512);
  a.out = const_cast<void*>(out.data_ptr());
  a.lse = const_cast<float*>(lse.data_ptr<float>());
  set_strides(a.out_stride, out);
  p.dout = dout.data_ptr();
  set_strides(p.dout_stride, dout);
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  set_strides(p.dq_stride, dq);
  set_strides(p.dk_stride, dk);
  set_strides(p.dv_stride, dv);
  p.brgemm = avx512 && attention_brgemm(a.dtype == Dtype::bf16);
  const BrgemmBlocks sizes = brgemm_blocks();
  const int64_t block_q = p.brgemm ? sizes.bwd_q : kBlockQ, block_k = p.brgemm ? sizes.bwd_k : kBlockK;
  p.block_q = block_q;
  p.block_k = block_k;

  // Query blocks of every sequence, and their padded rows.
  std::vector<int64_t> seq_rows(seqs.size());
  std::vector<std::pair<int64_t, int64_t>> qblocks;  // (sequence, block)
  int64_t rows = 0, max_key_blocks = 1;
  for (size_t n = 0; n < seqs.size(); ++n) {
    seq_rows[n] = rows;
    for (int64_t t = 0; t * block_q < seqs[n].sq; ++t) {
      qblocks.emplace_back(n, t);
      rows += bwd_round_up(std::min(block_q, seqs[n].sq - t * block_q), 16);
    }
    max_key_blocks = std::max(max_key_blocks, (seqs[n].sk + block_k - 1) / block_k);
  }
  p.seq_rows = seq_rows.data();
  p.rows_total = rows;
  const int64_t items_per_chunk = static_cast<int64_t>(seqs.size()) * Hkv;
  p.chunks = std::clamp<int64_t>((kMinItems + items_per_chunk - 1) / std::max<int64_t>(items_per_chunk, 1), 1,
                                 std::min(kMaxChunks, max_key_blocks));

  const bool bf16 = avx512 && a.dtype == Dtype::bf16;  // the buffers in bf16 (else fp32)
  const auto bytes = [&](int64_t width) { return H * rows * width * (bf16 ? 2 : 4); };
  const auto u8 = q.options().dtype(at::kByte);
  const Tensor q_t = at::empty({bytes(bwd_d_even(p))}, u8), q_n = at::empty({bytes(bwd_d16(p))}, u8);
  const Tensor do_t = at::empty({bytes(bwd_dv_even(p))}, u8), do_n = at::empty({bytes(bwd_dv16(p))}, u8);
  const Tensor delta = at::empty({H * rows}, q.options().dtype(at::kFloat));
  const Tensor lse_w = at::empty({H * rows}, q.options().dtype(at::kFloat));
  const Tensor dq_t = at::zeros({p.chunks * H * rows * D}, q.options().dtype(at::kFloat));
  p.q_t = q_t.data_ptr(), p.q_n = q_n.data_ptr(), p.do_t = do_t.data_ptr(), p.do_n = do_n.data_ptr();
  p.delta = delta.data_ptr<float>(), p.lse = lse_w.data_ptr<float>(), p.dq_t = dq_t.data_ptr<float>();

  const int64_t num_qblocks = static_cast<int64_t>(qblocks.size());
  at::parallel_for(0, H * num_qblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto [n, t] = qblocks[i % num_qblocks];
      kernel.prepare_block(p, i / num_qblocks, n, t);
    }
  });

  // Pass 2: work items (sequence, kv head, chunk), costliest first, pulled by the threads
  // (their costs differ with causal masks and variable lengths).
  struct Item {
    int64_t n, hk, chunk, cost;
  };
  std::vector<Item> items;
  for (size_t n = 0; n < seqs.size(); ++n) {
    const SeqSpan& s = seqs[n];
    const int64_t blocks = (s.sk + block_k - 1) / block_k, per = (blocks + p.chunks - 1) / p.chunks;
    for (int64_t c = 0; c < p.chunks; ++c) {
      int64_t cost = 0;
      for (int64_t kb = c * per; kb < std::min(blocks, (c + 1) * per); ++kb) {
        const int64_t j0 = kb * block_k, j1 = std::min(s.sk, j0 + block_k), d0 = s.sk - s.sq;
        const int64_t i0 = wr >= 0 ? std::max<int64_t>(0, j0 - d0 - wr) : 0;
        const int64_t i1 = wl >= 0 ? std::min(s.sq, j1 - d0 + wl) : s.sq;
        cost += block_q + std::max<int64_t>(0, i1 - i0) * (H / Hkv);
      }
      if (cost == 0) continue;
      for (int64_t hk = 0; hk < Hkv; ++hk) items.push_back({static_cast<int64_t>(n), hk, c, cost});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items.size()));
  const int64_t ws_floats = kernel.workspace_floats(p);
  const Tensor workspace = at::empty({threads * ws_floats}, q.options().dtype(at::kFloat));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot) {
      float* ws = workspace.data_ptr<float>() + slot * ws_floats;
      for (int64_t i = next++; i < static_cast<int64_t>(items.size()); i = next++) {
        kernel.key_chunk(p, items[i].n, items[i].hk, items[i].chunk, ws);
      }
    }
  });

  at::parallel_for(0, H * num_qblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto [n, t] = qblocks[i % num_qblocks];
      kernel.finish_block(p, i / num_qblocks, n, t);
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastarch, CPU, m) { m.impl("_attention_bwd", &attention_bwd_cpu); }

}  // namespace fastarch::cpu::attention
