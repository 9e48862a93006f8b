// Launchers of the CUDA attention kernels (csrc/cuda/attention_*.cu), callable from plain C++:
// the glue (attention_cuda.cpp) checks and allocates with torch, these only launch. Each
// returns the first CUDA error it met (cudaSuccess otherwise); nothing here synchronizes.
// The semantics of every field are those of fastarch/ops/attention_reference.py.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastarch::cuda::attention {

enum class Dtype { f16, bf16 };

// Head dims the kernels are compiled for; a head dim d (a multiple of 8) runs on the
// smallest one >= d, with the columns past d zero-filled on load and never stored.
constexpr int kHeadDims[] = {32, 64, 128, 256};
constexpr int kMaxHeadDim = 256;

// Sequence positions are int32 in the kernels; the bounds of an unlimited window are
// +-kUnbounded, so every sequence must be shorter than this.
constexpr int kUnbounded = 1 << 30;

// Strides in elements of a (B, H, S, D) view whose last dim is contiguous.
struct Strides {
  int64_t batch = 0, head = 0, row = 0;
};

struct AttentionParams {
  // Inputs, in the dtype of the launcher (k and v have kv_heads heads).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  Strides q_strides, k_strides, v_strides;
  // Forward outputs: out has q's shape; lse is contiguous fp32 (B, H, seqlen_q).
  void* out = nullptr;
  Strides out_strides;
  float* lse = nullptr;

  int batch = 0;      // B (1 when packed)
  int heads = 0;      // H
  int kv_heads = 0;   // Hkv, H % Hkv == 0
  int seqlen_q = 0;   // q.size(2): the packed total when packed
  int seqlen_k = 0;   // k.size(2)
  int head_dim = 0;   // d, a multiple of 8, at most the launcher's head dim

  // Packed variable lengths: num_seqs sequences, cu_seqlens_q/k int32 (num_seqs + 1,); the
  // grid covers max_seqlen_q (forward) or max_seqlen_k (backward) rows per sequence.
  // Not packed: both null and num_seqs = 0.
  const int* cu_seqlens_q = nullptr;
  const int* cu_seqlens_k = nullptr;
  int num_seqs = 0;
  int max_seqlen_q = 0;
  int max_seqlen_k = 0;

  float scale = 1.f;        // softmax scale
  float scale_log2 = 1.f;   // scale * log2(e): scores are kept in base 2
  // Query i of a sequence of sq queries and sk keys sees key j when
  //   i + (sk - sq) - window_left <= j <= i + (sk - sq) + window_right,
  // both bounds kUnbounded when absent (causal is window_right = 0).
  int window_left = kUnbounded;
  int window_right = kUnbounded;

  // Optional additive mask in the launcher's dtype, read as mask[b, h, i, j] with these
  // strides (0 for broadcast dims; i and j are packed indices when packed).
  const void* attn_mask = nullptr;
  int64_t mask_strides[4] = {0, 0, 0, 0};
  // Optional key padding mask, bool (B, Sk): key_padding_mask[b, j] true = a real key.
  const bool* key_padding_mask = nullptr;
  int64_t kpm_strides[2] = {0, 0};

  // Dropout: probability (b, h, i, j) is kept when
  //   dropout_hash(seed, (b * H + h) * seqlen_q + i, j) >= dropout_threshold,
  // kept ones scaled by dropout_scale = 1 / (1 - p).
  bool dropout = false;
  uint32_t dropout_threshold = 0;
  uint32_t seed = 0;
  float dropout_scale = 1.f;

  // Backward only. dout has out's shape; dq, dk, dv have the shapes of q, k, v.
  const void* dout = nullptr;
  Strides dout_strides;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  Strides dq_strides, dk_strides, dv_strides;
  // Workspaces (fp32, owned by the glue, sizes from backward_workspace()):
  //   delta (B, H, seqlen_q) = rowsum(dout * out);
  //   dq_accum (B, H, seqlen_q, kHeadDim), zeroed by the glue;
  //   dk_accum, dv_accum (B, H, seqlen_k, kHeadDim) when H != Hkv (the per-query-head
  //   gradients, summed over each group by the glue), else null and dk, dv are written.
  float* delta = nullptr;
  float* dq_accum = nullptr;
  float* dk_accum = nullptr;
  float* dv_accum = nullptr;
};

// Forward: out and lse. p.batch, p.heads >= 1; zero-length sequences allowed.
template <Dtype D, int kHeadDim>
cudaError_t forward(const AttentionParams& p, cudaStream_t stream);

// Backward: dq, dk, dv (or dk_accum, dv_accum), using the workspaces above.
template <Dtype D, int kHeadDim>
cudaError_t backward(const AttentionParams& p, cudaStream_t stream);

// Decoding against a cache: q (B, H, Sq, D) new queries; k, v (B, Hkv, S_max, D) caches of
// which cache_seqlens[b] entries are valid. Split-K over the cache when it pays: the glue
// asks decode_splits() first and passes `splits` and fp32 workspaces of
// (splits, B, H, Sq, kHeadDim) partial outputs and (splits, B, H, Sq) partial lse (unused
// and null when splits == 1).
struct DecodeParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  Strides q_strides, k_strides, v_strides;
  void* out = nullptr;
  Strides out_strides;
  float* lse = nullptr;  // contiguous (B, H, Sq)
  const int* cache_seqlens = nullptr;
  int batch = 0, heads = 0, kv_heads = 0;
  int seqlen_q = 0;    // new queries per sequence
  int cache_len = 0;   // S_max
  int head_dim = 0;
  float scale_log2 = 1.f;
  bool causal = true;
  int window_left = kUnbounded;
  int splits = 1;
  float* partial_out = nullptr;
  float* partial_lse = nullptr;
};

// How many splits of the cache fill the device (1 = no combine step); never fails: a
// device query error gives a conservative answer, and the launch reports it.
template <Dtype D, int kHeadDim>
int decode_splits(const DecodeParams& p);

template <Dtype D, int kHeadDim>
cudaError_t decode(const DecodeParams& p, cudaStream_t stream);

// Defined in attention_{fwd,bwd,decode}_<dtype>_d<dim>.cu.
#define FASTARCH_ATTENTION_DECLARE(D, HD)                                 \
  template <>                                                             \
  cudaError_t forward<D, HD>(const AttentionParams&, cudaStream_t);       \
  template <>                                                             \
  cudaError_t backward<D, HD>(const AttentionParams&, cudaStream_t);      \
  template <>                                                             \
  int decode_splits<D, HD>(const DecodeParams&);                          \
  template <>                                                             \
  cudaError_t decode<D, HD>(const DecodeParams&, cudaStream_t);
FASTARCH_ATTENTION_DECLARE(Dtype::f16, 32)
FASTARCH_ATTENTION_DECLARE(Dtype::f16, 64)
FASTARCH_ATTENTION_DECLARE(Dtype::f16, 128)
FASTARCH_ATTENTION_DECLARE(Dtype::f16, 256)
FASTARCH_ATTENTION_DECLARE(Dtype::bf16, 32)
FASTARCH_ATTENTION_DECLARE(Dtype::bf16, 64)
FASTARCH_ATTENTION_DECLARE(Dtype::bf16, 128)
FASTARCH_ATTENTION_DECLARE(Dtype::bf16, 256)
#undef FASTARCH_ATTENTION_DECLARE

}  // namespace fastarch::cuda::attention
