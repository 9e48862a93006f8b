// The torch side of the CPU attention ops, shared by the forward and decode
// (attention_cpu.cpp) and the backward (attention_bwd.cpp): argument checks, with errors that
// name the argument and what was expected, and the AttentionParams the kernels read.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "attention_common.h"

namespace fastarch::cpu::attention {

constexpr int64_t kMaxHeadDim = 512;

// float32, float16, bfloat16 as the kernels' Dtype; anything else is an error.
Dtype dtype_of(const char* who, const at::Tensor& q);

// Whether the AVX-512 kernels run dtype: compiled in, the active isa level (cpu/isa.h) avx512 or
// above, and for bf16, which they multiply with vdpbf16ps, avx512_bf16 or above. Else the
// portable kernels run. (The backward's AVX-512 unit needs avx512_bf16 for every dtype.)
bool use_avx512(Dtype dtype);

// t (named `name`): 4-D (batch, heads, seq, head_dim), on the CPU, q's dtype, a contiguous
// last dim of 1 to kMaxHeadDim elements.
void check_4d(const char* who, const at::Tensor& t, const char* name, const at::Tensor& q);

// q (B, H, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), each as check_4d, H a multiple of Hkv.
void check_qkv(const char* who, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

void set_strides(int64_t* dst, const at::Tensor& t);

// The attention's output: q's memory layout (empty_like) when its shape is q's, else contiguous.
at::Tensor make_out(const at::Tensor& q, int64_t dv);

// The inputs of an attention call, checked, as AttentionParams: everything but dtype, out and
// lse (and their strides). `p` points into this object (the expanded mask view, the packed
// offsets copied to the host), so it must outlive every use of `p`; it is filled in place
// (construct it, then call fill).
struct AttentionInputs {
  AttentionParams p{};
  at::Tensor mask;                  // attn_mask expanded to (B, H, Sq, Sk) (broadcast dims: stride 0)
  std::vector<int32_t> cu_q, cu_k;  // the packed offsets, empty when not packed

  AttentionInputs() = default;
  AttentionInputs(const AttentionInputs&) = delete;  // p points into it
  AttentionInputs& operator=(const AttentionInputs&) = delete;

  // check_qkv, finite scale, windows >= -1, dropout_p in [0, 1), cu_seqlens both or neither
  // (1-D int32 CPU, rising from 0 within the packed lengths, batch 1), attn_mask of q's dtype
  // broadcasting to (B, H, Sq, Sk), key_padding_mask bool (B, Sk).
  void fill(const char* who, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
            const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k, bool causal,
            double scale, int64_t window_left, int64_t window_right, double dropout_p, int64_t seed);
};

}  // namespace fastarch::cpu::attention
