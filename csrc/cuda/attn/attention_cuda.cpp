// CUDA implementation of fastarch::_attention_fwd / _bwd / _decode / _append_kv: checks, allocation (outputs
// and the backward's and decoding's fp32 workspaces, through torch's caching allocator), the
// choice of the compiled head dim, and launch on the current stream. The semantics are those
// of fastarch/ops/attn/reference.py; the kernels are in attention_*_kernel.cuh, launched
// through attention_launch.h.
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "attention_launch.h"

namespace fastarch::cuda::attention {
namespace {

using at::Tensor;

constexpr const char* kWho = "fastarch cuda attention";

Dtype dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return Dtype::f16;
    case at::kBFloat16:
      return Dtype::bf16;
    default:
      TORCH_CHECK(false, kWho, ": ", name, " must be float16 or bfloat16, got ", t.scalar_type(),
                  " (float32 and float64 attention run on the triton, cpu and reference backends)");
  }
}

// Calls f(std::integral_constant<Dtype, d>, std::integral_constant<int, kHeadDim>) with the
// smallest compiled head dim >= head_dim (the kernels zero-fill the columns past it).
template <typename F>
auto dispatch(Dtype d, int64_t head_dim, F&& f) {
  auto with_dim = [&](auto dt) {
#define FASTARCH_TRY_HEAD_DIM(HD) \
  if (head_dim <= HD) return f(dt, std::integral_constant<int, HD>{});
    FASTARCH_FOR_EACH_ATTENTION_HEAD_DIM(FASTARCH_TRY_HEAD_DIM)
#undef FASTARCH_TRY_HEAD_DIM
    return f(dt, std::integral_constant<int, kMaxHeadDim>{});  // (the glue checked head_dim <= kMaxHeadDim)
  };
  if (d == Dtype::f16) return with_dim(std::integral_constant<Dtype, Dtype::f16>{});
  return with_dim(std::integral_constant<Dtype, Dtype::bf16>{});
}

int compiled_head_dim(int64_t head_dim) {
  for (const int hd : kHeadDims) {
    if (head_dim <= hd) return hd;
  }
  return kMaxHeadDim;
}

void check_cuda(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK(t.is_cuda(), kWho, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == q.device(), kWho, ": ", name, " must be on q's device ", q.device(), ", got ", t.device());
}

// A (B, H, S, D) input in q's dtype with a contiguous last dim.
void check_4d(const Tensor& t, const char* name, const Tensor& q) {
  check_cuda(t, name, q);
  TORCH_CHECK(t.dim() == 4, kWho, ": ", name, " must be 4-D (batch, heads, seq, head_dim), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), kWho, ": ", name, " must have q's dtype ", q.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, kWho, ": ", name, " must have a contiguous last dim, got strides ",
              t.strides());
}

// The kernels move rows in 16-byte pieces: the pointer and every stride that is used (of a
// dim longer than 1) must be multiples of 16 bytes. Others (a head-dim slice of a wider
// tensor) are copied, which is what a strided 16-byte access would cost anyway.
Tensor vector_ready(const Tensor& t) {
  constexpr int64_t kVec = 8;  // 16-bit elements per 16 bytes
  bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t dim = 0; dim + 1 < t.dim(); ++dim) {
    aligned = aligned && (t.size(dim) <= 1 || t.stride(dim) % kVec == 0);
  }
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

Strides strides_of(const Tensor& t) {
  Strides s;
  s.batch = t.stride(0);
  s.head = t.stride(1);
  s.row = t.stride(2);
  return s;
}

// Points p (AttentionParams or DecodeParams) at q, k, v, out and lse, with their strides.
template <typename Params>
void set_tensors(Params& p, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_strides = strides_of(q);
  p.k_strides = strides_of(k);
  p.v_strides = strides_of(v);
  p.out = out.data_ptr();
  p.out_strides = strides_of(out);
  p.lse = lse.data_ptr<float>();
}

int checked_int(int64_t x, const char* what) {
  TORCH_CHECK(x >= 0 && x < kUnbounded, kWho, ": ", what, " must be below ", kUnbounded, ", got ", x);
  return static_cast<int>(x);
}

// A window bound of the reference (-1 = unbounded) as the kernels' (kUnbounded = unbounded);
// windows of kUnbounded or more keys reach past every sequence anyway.
int window_bound(int64_t w) { return w < 0 || w >= kUnbounded ? kUnbounded : static_cast<int>(w); }

void check_head_dim(int64_t d, const char* name) {
  TORCH_CHECK(d >= 8 && d <= kMaxHeadDim && d % 8 == 0, kWho, ": ", name, "'s head dim must be a multiple of 8 from 8 to ",
              kMaxHeadDim, ", got ", d);
}

// Everything _attention_fwd and _attention_bwd share: the checks of q, k, v, the masks and the
// packed lengths, and the fields of AttentionParams they determine.
AttentionParams common_params(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& attn_mask,
    const std::optional<Tensor>& key_padding_mask, const std::optional<Tensor>& cu_seqlens_q,
    const std::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale,
    int64_t window_left, int64_t window_right, double dropout_p, int64_t seed) {
  check_4d(k, "k", q);
  check_4d(v, "v", q);
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, kWho, ": q, k and v must have the same batch size, got ", B, ", ",
              k.size(0), ", ", v.size(0));
  TORCH_CHECK(v.size(1) == Hkv && v.size(2) == Sk, kWho, ": k and v must have the same heads and length, got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, kWho, ": q's ", H, " heads must be a multiple of k's and v's ", Hkv, " heads");
  TORCH_CHECK(k.size(3) == D, kWho, ": q and k must have the same head dim, got ", D, " and ", k.size(3));
  TORCH_CHECK(v.size(3) == D, kWho, ": v's head dim must equal q's ", D, " (the kernels take one head dim), got ",
              v.size(3));
  check_head_dim(D, "q");
  TORCH_CHECK(std::isfinite(scale), kWho, ": scale must be finite, got ", scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, kWho, ": dropout_p must be in [0, 1), got ", dropout_p);

  AttentionParams p;
  p.batch = checked_int(B, "the batch size");
  p.heads = checked_int(H, "the number of heads");
  p.kv_heads = static_cast<int>(Hkv);
  p.seqlen_q = checked_int(Sq, "q's length");
  p.seqlen_k = checked_int(Sk, "k's length");
  p.head_dim = static_cast<int>(D);
  TORCH_CHECK(B * H * Sq < (int64_t{1} << 31) && B * H * Sk < (int64_t{1} << 31), kWho,
              ": batch x heads x length must be below 2^31 rows, got q ", q.sizes(), ", k ", k.sizes());

  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), kWho,
              ": packed sequences need both cu_seqlens_q and cu_seqlens_k");
  if (cu_seqlens_q.has_value()) {
    for (const auto& [cu, name] : {std::pair{&*cu_seqlens_q, "cu_seqlens_q"}, std::pair{&*cu_seqlens_k, "cu_seqlens_k"}}) {
      check_cuda(*cu, name, q);
      TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->numel() >= 2 && cu->is_contiguous(), kWho, ": ",
                  name, " must be a contiguous 1-D int32 tensor of N + 1 offsets, got ", cu->scalar_type(), " of shape ",
                  cu->sizes());
    }
    TORCH_CHECK(cu_seqlens_q->numel() == cu_seqlens_k->numel(), kWho,
                ": cu_seqlens_q and cu_seqlens_k must hold the same number of sequences, got ", cu_seqlens_q->numel() - 1,
                " and ", cu_seqlens_k->numel() - 1);
    TORCH_CHECK(B == 1, kWho, ": packed sequences are the (1, heads, total, head_dim) view, got batch ", B);
    TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_q <= Sq && max_seqlen_k >= 0 && max_seqlen_k <= Sk, kWho,
                ": max_seqlen_q / max_seqlen_k must be the longest packed sequences (at most ", Sq, " / ", Sk, "), got ",
                max_seqlen_q, " / ", max_seqlen_k);
    p.cu_seqlens_q = cu_seqlens_q->data_ptr<int>();
    p.cu_seqlens_k = cu_seqlens_k->data_ptr<int>();
    p.num_seqs = static_cast<int>(cu_seqlens_q->numel() - 1);
    p.max_seqlen_q = static_cast<int>(max_seqlen_q);
    p.max_seqlen_k = static_cast<int>(max_seqlen_k);
  }

  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.window_left = window_bound(window_left);
  p.window_right = causal ? 0 : window_bound(window_right);  // causal closes the right side

  if (attn_mask.has_value()) {
    const Tensor& m = *attn_mask;
    check_cuda(m, "attn_mask", q);
    TORCH_CHECK(m.scalar_type() == q.scalar_type(), kWho, ": attn_mask must have q's dtype ", q.scalar_type(),
                " (an additive mask), got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 4, kWho, ": attn_mask must be 4-D, broadcastable to (B, H, Sq, Sk), got shape ", m.sizes());
    const int64_t full[4] = {B, H, Sq, Sk};
    for (int dim = 0; dim < 4; ++dim) {
      TORCH_CHECK(m.size(dim) == full[dim] || m.size(dim) == 1, kWho, ": attn_mask of shape ", m.sizes(),
                  " does not broadcast to (B, H, Sq, Sk) = ", at::IntArrayRef(full));
      p.mask_strides[dim] = m.size(dim) == 1 ? 0 : m.stride(dim);
    }
    p.attn_mask = m.data_ptr();
  }
  if (key_padding_mask.has_value()) {
    const Tensor& m = *key_padding_mask;
    check_cuda(m, "key_padding_mask", q);
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B && m.size(1) == Sk, kWho,
                ": key_padding_mask must be bool of shape (B, Sk) = (", B, ", ", Sk, "), got ", m.scalar_type(),
                " of shape ", m.sizes());
    p.key_padding_mask = m.data_ptr<bool>();
    p.kpm_strides[0] = m.stride(0);
    p.kpm_strides[1] = m.stride(1);
  }

  if (dropout_p > 0.0) {
    // as dropout_keep of fastarch/ops/attn/reference.py: min(int(p * 2^32), 2^32 - 1); seed modulo 2^32
    const double threshold = std::floor(dropout_p * 4294967296.0);
    p.dropout = true;
    p.dropout_threshold = threshold >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(threshold);
    p.seed = static_cast<uint32_t>(static_cast<uint64_t>(seed));
    p.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  }
  return p;
}

std::tuple<Tensor, Tensor> attention_fwd_cuda(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const std::optional<Tensor>& attn_mask,
    const std::optional<Tensor>& key_padding_mask, const std::optional<Tensor>& cu_seqlens_q,
    const std::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale,
    int64_t window_left, int64_t window_right, double dropout_p, int64_t seed) {
  TORCH_CHECK(q_in.is_cuda(), kWho, ": q must be a CUDA tensor, got ", q_in.device());
  const Dtype d = dtype_of(q_in, "q");
  check_4d(q_in, "q", q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  AttentionParams p = common_params(q_in, k_in, v_in, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right, dropout_p, seed);
  // out has q's shape and memory layout (empty_like keeps a dense permuted layout, e.g. the
  // packed (1, H, total, D) view of (total, H, D)).
  Tensor out = at::empty_like(q_in);
  Tensor lse = at::empty({q_in.size(0), q_in.size(1), q_in.size(2)}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  const Tensor q = vector_ready(q_in), k = vector_ready(k_in), v = vector_ready(v_in);
  const Tensor out_v = vector_ready(out);  // out itself unless q's layout was not dense
  set_tensors(p, q, k, v, out_v, lse);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(dispatch(d, p.head_dim, [&](auto dt, auto hd) { return forward<decltype(dt)::value, decltype(hd)::value>(p, stream); }));
  if (!out_v.is_same(out)) out.copy_(out_v);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_cuda(
    const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& out_in,
    const Tensor& lse_in, const std::optional<Tensor>& attn_mask, const std::optional<Tensor>& key_padding_mask,
    const std::optional<Tensor>& cu_seqlens_q, const std::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double scale, int64_t window_left, int64_t window_right, double dropout_p,
    int64_t seed) {
  TORCH_CHECK(q_in.is_cuda(), kWho, " backward: q must be a CUDA tensor, got ", q_in.device());
  const Dtype d = dtype_of(q_in, "q");
  check_4d(q_in, "q", q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  AttentionParams p = common_params(q_in, k_in, v_in, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right, dropout_p, seed);
  for (const auto& [t, name] : {std::pair{&dout_in, "dout"}, std::pair{&out_in, "out"}}) {
    check_4d(*t, name, q_in);
    TORCH_CHECK(t->sizes() == q_in.sizes(), kWho, " backward: ", name, " must have q's shape ", q_in.sizes(), ", got ",
                t->sizes());
  }
  check_cuda(lse_in, "lse", q_in);
  const int64_t B = q_in.size(0), H = q_in.size(1), Sq = q_in.size(2), Sk = k_in.size(2), Hkv = k_in.size(1);
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H &&
                  lse_in.size(2) == Sq,
              kWho, " backward: lse must be float32 of shape (B, H, Sq) = (", B, ", ", H, ", ", Sq, "), got ",
              lse_in.scalar_type(), " of shape ", lse_in.sizes());

  Tensor dq = at::empty_like(q_in);
  Tensor dk = at::empty_like(k_in);
  Tensor dv = at::empty_like(v_in);
  if (dq.numel() == 0 && dk.numel() == 0) return {dq, dk, dv};
  if (Sq == 0 || Sk == 0) {  // no query sees a key: every gradient is 0
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv};
  }

  const Tensor q = vector_ready(q_in), k = vector_ready(k_in), v = vector_ready(v_in);
  const Tensor out = vector_ready(out_in), dout = vector_ready(dout_in);
  const Tensor lse = lse_in.contiguous();
  const Tensor dq_v = vector_ready(dq), dk_v = vector_ready(dk), dv_v = vector_ready(dv);
  const int hd = compiled_head_dim(p.head_dim);
  const auto f32 = q_in.options().dtype(at::kFloat);
  Tensor delta = at::empty({B, H, Sq}, f32);
  Tensor dq_accum = at::zeros({B, H, Sq, hd}, f32);
  // Grouped-query attention: each query head's dK, dV in fp32, summed over its group below
  // (deterministic, no atomics).
  const bool grouped = H != Hkv;
  Tensor dk_accum = grouped ? at::empty({B, H, Sk, hd}, f32) : Tensor();
  Tensor dv_accum = grouped ? at::empty({B, H, Sk, hd}, f32) : Tensor();

  set_tensors(p, q, k, v, out, lse);
  p.dout = dout.data_ptr();
  p.dout_strides = strides_of(dout);
  p.dq = dq_v.data_ptr();
  p.dk = dk_v.data_ptr();
  p.dv = dv_v.data_ptr();
  p.dq_strides = strides_of(dq_v);
  p.dk_strides = strides_of(dk_v);
  p.dv_strides = strides_of(dv_v);
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dk_accum = grouped ? dk_accum.data_ptr<float>() : nullptr;
  p.dv_accum = grouped ? dv_accum.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(dispatch(d, p.head_dim, [&](auto dt, auto hdim) { return backward<decltype(dt)::value, decltype(hdim)::value>(p, stream); }));

  if (!dq_v.is_same(dq)) dq.copy_(dq_v);
  if (grouped) {
    const int64_t group = H / Hkv, D = p.head_dim;
    dk.copy_(dk_accum.view({B, Hkv, group, Sk, hd}).narrow(4, 0, D).sum(2));
    dv.copy_(dv_accum.view({B, Hkv, group, Sk, hd}).narrow(4, 0, D).sum(2));
  } else {
    if (!dk_v.is_same(dk)) dk.copy_(dk_v);
    if (!dv_v.is_same(dv)) dv.copy_(dv_v);
  }
  return {dq, dk, dv};
}

std::tuple<Tensor, Tensor> attention_decode_cuda(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& cache_seqlens, bool causal, double scale,
    int64_t window_left) {
  TORCH_CHECK(q_in.is_cuda(), kWho, " decode: q must be a CUDA tensor, got ", q_in.device());
  const Dtype d = dtype_of(q_in, "q");
  check_4d(q_in, "q", q_in);
  check_4d(k_in, "k_cache", q_in);
  check_4d(v_in, "v_cache", q_in);
  const int64_t B = q_in.size(0), H = q_in.size(1), Sq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), S = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == B && v_in.size(0) == B, kWho, " decode: q, k_cache and v_cache must have the same batch size");
  TORCH_CHECK(v_in.size(1) == Hkv && v_in.size(2) == S, kWho, " decode: k_cache and v_cache must have the same shape, got ",
              k_in.sizes(), " and ", v_in.sizes());
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, kWho, " decode: q's ", H, " heads must be a multiple of the caches' ", Hkv, " heads");
  TORCH_CHECK(k_in.size(3) == D && v_in.size(3) == D, kWho, " decode: the caches' head dims must equal q's ", D, ", got ",
              k_in.size(3), " and ", v_in.size(3));
  check_head_dim(D, "q");
  TORCH_CHECK(std::isfinite(scale), kWho, " decode: scale must be finite, got ", scale);
  check_cuda(cache_seqlens, "cache_seqlens", q_in);
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, kWho,
              " decode: cache_seqlens must be int32 of shape (B,) = (", B, "), got ", cache_seqlens.scalar_type(),
              " of shape ", cache_seqlens.sizes());
  const c10::cuda::CUDAGuard guard(q_in.device());

  Tensor out = at::empty_like(q_in);
  Tensor lse = at::empty({B, H, Sq}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  const Tensor q = vector_ready(q_in), k = vector_ready(k_in), v = vector_ready(v_in);
  const Tensor out_v = vector_ready(out);
  const Tensor seqlens = cache_seqlens.contiguous();
  DecodeParams p;
  set_tensors(p, q, k, v, out_v, lse);
  p.cache_seqlens = seqlens.data_ptr<int>();
  p.batch = checked_int(B, "the batch size");
  p.heads = checked_int(H, "the number of heads");
  p.kv_heads = static_cast<int>(Hkv);
  p.seqlen_q = checked_int(Sq, "q's length");
  p.cache_len = checked_int(S, "the cache length");
  TORCH_CHECK(B * H * Sq < (int64_t{1} << 31), kWho, " decode: batch x heads x length must be below 2^31, got ", q_in.sizes());
  p.head_dim = static_cast<int>(D);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.causal = causal;
  p.window_left = window_bound(window_left);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  p.splits = dispatch(d, D, [&](auto dt, auto hd) { return decode_splits<decltype(dt)::value, decltype(hd)::value>(p); });
  Tensor partial_out, partial_lse;
  if (p.splits > 1) {
    const auto f32 = q_in.options().dtype(at::kFloat);
    partial_out = at::empty({p.splits, B, H, Sq, compiled_head_dim(D)}, f32);
    partial_lse = at::empty({p.splits, B, H, Sq}, f32);
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_lse = partial_lse.data_ptr<float>();
  }
  C10_CUDA_CHECK(dispatch(d, D, [&](auto dt, auto hd) { return decode<decltype(dt)::value, decltype(hd)::value>(p, stream); }));
  if (!out_v.is_same(out)) out.copy_(out_v);
  return {out, lse};
}

}  // namespace

void append_kv_cuda(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k_new, const Tensor& v_new,
                    const Tensor& cache_seqlens) {
  const Tensor* pairs[2][2] = {{&k_cache, &k_new}, {&v_cache, &v_new}};
  for (auto& pr : pairs) {
    const Tensor &cache = *pr[0], &fresh = *pr[1];
    TORCH_CHECK(cache.dim() == 4 && fresh.dim() == 4 && cache.is_cuda() && fresh.device() == cache.device(), kWho,
                " append_kv: caches and new tokens must be 4-D tensors on one CUDA device");
    TORCH_CHECK(cache.scalar_type() == fresh.scalar_type() && cache.size(0) == fresh.size(0) &&
                    cache.size(1) == fresh.size(1) && cache.size(3) == fresh.size(3),
                kWho, " append_kv: new tokens ", fresh.sizes(), " must match the cache ", cache.sizes(),
                " in dtype, batch, heads and head dim");
    TORCH_CHECK(cache.size(3) <= 1 || (cache.stride(3) == 1 && fresh.stride(3) == 1), kWho,
                " append_kv: caches and new tokens must have a contiguous last dim");
  }
  TORCH_CHECK(v_cache.size(2) == k_cache.size(2) && v_new.size(2) == k_new.size(2), kWho,
              " append_kv: k and v caches (and new tokens) must have the same lengths");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), kWho, " append_kv: v_cache must have k_cache's dtype ",
              k_cache.scalar_type(), ", got ", v_cache.scalar_type());
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 &&
                  cache_seqlens.size(0) == k_cache.size(0) && cache_seqlens.device() == k_cache.device() &&
                  cache_seqlens.is_contiguous(),
              kWho, " append_kv: cache_seqlens must be a contiguous int32 (batch,) tensor on the caches' device");
  const c10::cuda::CUDAGuard guard(k_cache.device());
  AppendKvParams p;
  for (int i = 0; i < 2; ++i) {
    const Tensor &cache = *pairs[i][0], &fresh = *pairs[i][1];
    p.rows[i].cache = cache.data_ptr();
    p.rows[i].fresh = fresh.data_ptr();
    p.rows[i].cache_strides = {cache.stride(0), cache.stride(1), cache.stride(2)};
    p.rows[i].fresh_strides = {fresh.stride(0), fresh.stride(1), fresh.stride(2)};
    p.rows[i].row_bytes = cache.size(3) * cache.element_size();
  }
  p.cache_seqlens = cache_seqlens.data_ptr<int>();
  p.batch = static_cast<int>(k_cache.size(0));
  p.kv_heads = static_cast<int>(k_cache.size(1));
  p.new_tokens = static_cast<int>(k_new.size(2));
  p.cache_len = k_cache.size(2);
  p.element_size = k_cache.element_size();
  C10_CUDA_CHECK(append_kv(p, c10::cuda::getCurrentCUDAStream().stream()));
}

TORCH_LIBRARY_IMPL(fastarch, CUDA, m) {
  m.impl("_append_kv", &append_kv_cuda);
  m.impl("_attention_fwd", &attention_fwd_cuda);
  m.impl("_attention_bwd", &attention_bwd_cuda);
  m.impl("_attention_decode", &attention_decode_cuda);
}

}  // namespace fastarch::cuda::attention
