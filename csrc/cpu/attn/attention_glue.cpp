// The torch side of the CPU attention ops: see attention_glue.h.
#include "attention_glue.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "cpu/isa.h"

namespace fastarch::cpu::attention {

using at::Tensor;

Dtype dtype_of(const char* who, const Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat:
      return Dtype::f32;
    case at::kHalf:
      return Dtype::f16;
    case at::kBFloat16:
      return Dtype::bf16;
    default:
      TORCH_CHECK(false, who, ": q must be float32, float16 or bfloat16 (the CPU kernel has no ", q.scalar_type(),
                  " path; the reference backend runs it), got ", q.scalar_type());
  }
}

bool use_avx512(Dtype dtype) { return isa_avx512() && (dtype != Dtype::bf16 || isa_bf16()); }

void check_4d(const char* who, const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK(t.dim() == 4, who, ": ", name, " must be 4-D (batch, heads, seq, head_dim), got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), who, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), who, ": ", name, " must have q's dtype ", q.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, who, ": ", name, " must have a contiguous last dim, got strides ",
              t.strides());
  TORCH_CHECK(t.size(3) >= 1 && t.size(3) <= kMaxHeadDim, who, ": ", name, "'s head dim must be between 1 and ",
              kMaxHeadDim, ", got ", t.size(3));
}

void check_qkv(const char* who, const Tensor& q, const Tensor& k, const Tensor& v) {
  check_4d(who, q, "q", q);
  check_4d(who, k, "k", q);
  check_4d(who, v, "v", q);
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), who, ": q, k and v must have the same batch size, got ",
              q.size(0), ", ", k.size(0), ", ", v.size(0));
  TORCH_CHECK(k.size(1) == v.size(1), who, ": k and v must have the same number of heads, got ", k.size(1), " and ",
              v.size(1));
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, who, ": q's ", q.size(1),
              " heads must be a multiple of k's and v's ", k.size(1), " heads");
  TORCH_CHECK(k.size(2) == v.size(2), who, ": k and v must have the same sequence length, got ", k.size(2), " and ",
              v.size(2));
  TORCH_CHECK(k.size(3) == q.size(3), who, ": q and k must have the same head dim, got ", q.size(3), " and ",
              k.size(3));
}

void set_strides(int64_t* dst, const Tensor& t) {
  for (int i = 0; i < 3; ++i) dst[i] = t.stride(i);
}

Tensor make_out(const Tensor& q, int64_t dv) {
  if (dv == q.size(3)) return at::empty_like(q);
  return at::empty({q.size(0), q.size(1), q.size(2), dv}, q.options());
}

void AttentionInputs::fill(const char* who, const Tensor& q, const Tensor& k, const Tensor& v,
                           const std::optional<Tensor>& attn_mask, const std::optional<Tensor>& key_padding_mask,
                           const std::optional<Tensor>& cu_seqlens_q, const std::optional<Tensor>& cu_seqlens_k,
                           bool causal, double scale, int64_t window_left, int64_t window_right, double dropout_p,
                           int64_t seed) {
  check_qkv(who, q, k, v);
  TORCH_CHECK(std::isfinite(scale), who, ": scale must be finite, got ", scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, who, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(window_left >= -1 && window_right >= -1, who, ": window_left and window_right must be >= 0 or -1, got ",
              window_left, " and ", window_right);
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), Sk = k.size(2);

  p = AttentionParams{};
  p.B = B, p.H = H, p.Hkv = k.size(1), p.Sq = Sq, p.Sk = Sk, p.D = q.size(3), p.Dv = v.size(3);
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  set_strides(p.q_stride, q), set_strides(p.k_stride, k), set_strides(p.v_stride, v);
  p.scale = static_cast<float>(scale);
  p.window_left = window_left;
  p.window_right = fold_causal(causal, window_right);

  cu_q.clear(), cu_k.clear();
  p.num_seqs = B, p.max_seqlen_q = Sq, p.max_seqlen_k = Sk;
  if (cu_seqlens_q.has_value() || cu_seqlens_k.has_value()) {
    TORCH_CHECK(cu_seqlens_q.has_value() && cu_seqlens_k.has_value(), who,
                ": need both cu_seqlens_q and cu_seqlens_k (or neither)");
    TORCH_CHECK(B == 1, who, ": packed sequences (cu_seqlens) need batch size 1, got ", B);
    for (auto [t, host, total, name] : {std::tuple{&*cu_seqlens_q, &cu_q, Sq, "cu_seqlens_q"},
                                        std::tuple{&*cu_seqlens_k, &cu_k, Sk, "cu_seqlens_k"}}) {
      TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kInt && t->device().is_cpu() && t->numel() >= 1, who, ": ",
                  name, " must be a 1-D int32 CPU tensor of N + 1 offsets, got ", t->scalar_type(), " of shape ",
                  t->sizes(), " on ", t->device());
      const Tensor c = t->contiguous();
      host->assign(c.data_ptr<int32_t>(), c.data_ptr<int32_t>() + c.numel());
      bool ok = host->front() == 0 && host->back() <= total;
      for (size_t n = 1; n < host->size(); ++n) ok = ok && (*host)[n] >= (*host)[n - 1];
      TORCH_CHECK(ok, who, ": ", name, " must rise from 0 to at most the packed length ", total);
    }
    TORCH_CHECK(cu_q.size() == cu_k.size(), who, ": cu_seqlens_q and cu_seqlens_k must have the same length, got ",
                cu_q.size(), " and ", cu_k.size());
    p.cu_seqlens_q = cu_q.data();
    p.cu_seqlens_k = cu_k.data();
    p.num_seqs = static_cast<int64_t>(cu_q.size()) - 1;
    p.max_seqlen_q = p.max_seqlen_k = 0;
    for (int64_t n = 0; n < p.num_seqs; ++n) {
      p.max_seqlen_q = std::max<int64_t>(p.max_seqlen_q, cu_q[n + 1] - cu_q[n]);
      p.max_seqlen_k = std::max<int64_t>(p.max_seqlen_k, cu_k[n + 1] - cu_k[n]);
    }
  }

  mask = Tensor();
  if (attn_mask.has_value()) {
    const Tensor& m = *attn_mask;
    TORCH_CHECK(m.scalar_type() == q.scalar_type(), who, ": attn_mask must have q's dtype ", q.scalar_type(),
                " (an additive mask), got ", m.scalar_type());
    TORCH_CHECK(m.device().is_cpu(), who, ": attn_mask must be a CPU tensor, got ", m.device());
    TORCH_CHECK(m.dim() <= 4, who, ": attn_mask must broadcast to (B, H, Sq, Sk) = (", B, ", ", H, ", ", Sq, ", ", Sk,
                "), got shape ", m.sizes());
    mask = m.expand({B, H, Sq, Sk});  // a view: broadcast dims get stride 0
    p.attn_mask = mask.data_ptr();
    for (int i = 0; i < 4; ++i) p.mask_stride[i] = mask.stride(i);
  }
  if (key_padding_mask.has_value()) {
    const Tensor& kpm = *key_padding_mask;
    TORCH_CHECK(kpm.scalar_type() == at::kBool && kpm.dim() == 2 && kpm.size(0) == B && kpm.size(1) == Sk, who,
                ": key_padding_mask must be bool of shape (batch, Sk) = (", B, ", ", Sk, "), got ", kpm.scalar_type(),
                " of shape ", kpm.sizes());
    TORCH_CHECK(kpm.device().is_cpu(), who, ": key_padding_mask must be a CPU tensor, got ", kpm.device());
    p.key_padding_mask = kpm.data_ptr<bool>();
    p.kpm_stride[0] = kpm.stride(0), p.kpm_stride[1] = kpm.stride(1);
  }
  if (dropout_p > 0) {
    p.dropout = true;
    p.seed = static_cast<uint64_t>(seed);
    p.dropout_threshold = static_cast<uint32_t>(std::min<double>(std::floor(dropout_p * 4294967296.0), 4294967295.0));
    p.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  }
}

}  // namespace fastarch::cpu::attention
