// The schema of every fastarch:: kernel op, in one place. Backends only register
// implementations for their dispatch key (csrc/cpu/*, csrc/cuda/*). The public ops
// (fastarch::layer_norm, ...) are defined in Python (fastarch/ops), so that they exist even
// when this extension is missing; they call these kernels through the backend registry.
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <torch/library.h>

TORCH_LIBRARY(fastarch, m) {
  // Normalization over the last dim of a 2-D x (rows, cols) with contiguous columns.
  // Absent optional results are returned as empty tensors of shape (0,). weight_offset: the
  // weight is weight + weight_offset (Gemma's 1 + weight), added in fp32 (fp64 for fp64).
  m.def(
      "_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms,"
      " float weight_offset=0.0)"
      " -> (Tensor y, Tensor residual_out, Tensor mean, Tensor rstd)");
  m.def(
      "_norm_bwd(Tensor dy, Tensor? dresidual_out, Tensor xin, Tensor? weight, Tensor? mean,"
      " Tensor rstd, bool need_dweight, bool need_dbias, float weight_offset=0.0)"
      " -> (Tensor dx, Tensor dweight, Tensor dbias)");

  // Elementwise activations over a 2-D x (rows, cols) with contiguous columns, in fp32 (fp64
  // for fp64 inputs on the CPU), rounded once to x's dtype. tanh: GELU's tanh form, else erf.
  // dbias (the column sums of dx) is an empty tensor when not wanted.
  m.def("_bias_gelu_fwd(Tensor x, Tensor? bias, bool tanh) -> Tensor");
  m.def("_bias_gelu_bwd(Tensor dy, Tensor x, Tensor? bias, bool tanh, bool need_dbias) -> (Tensor dx, Tensor dbias)");
  // The gated activations act(gate) * up over 2-D gate and up of one shape and dtype (rows
  // may be strided: the two halves of one projection): act "silu" (swiglu), "gelu" (erf) or
  // "gelu_tanh" (geglu).
  m.def("_gated_act_fwd(Tensor gate, Tensor up, str act) -> Tensor");
  m.def("_gated_act_bwd(Tensor dy, Tensor gate, Tensor up, str act) -> (Tensor dgate, Tensor dup)");
  // The same backward for proj = [up | gate] (rows, 2 cols), diffusers' GEGLU layout: returns
  // the gradient of proj whole, each half written in place.
  m.def("_gated_act_bwd_packed(Tensor dy, Tensor proj, str act) -> Tensor dproj");

  // Attention over 4-D (B, H, S, D) views with contiguous last dims; the semantics of every
  // argument are those of fastarch/ops/attn/reference.py. Packed variable lengths: B == 1
  // and cu_seqlens_q/k (int32 (N + 1,)); max_seqlen_q/k are their longest sequences (0 when
  // not packed). out has q's shape and memory layout; lse is (B, H, Sq) fp32.
  m.def(
      "_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? key_padding_mask,"
      " Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, float scale,"
      " int window_left, int window_right, float dropout_p, int seed) -> (Tensor out, Tensor lse)");
  m.def(
      "_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask,"
      " Tensor? key_padding_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k,"
      " bool causal, float scale, int window_left, int window_right, float dropout_p, int seed)"
      " -> (Tensor dq, Tensor dk, Tensor dv)");
  // A few new queries (B, H, Sq, D) against caches (B, Hkv, S_max, D) holding cache_seqlens[b]
  // valid entries (int32 (B,)).
  m.def(
      "_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, bool causal, float scale,"
      " int window_left) -> (Tensor out, Tensor lse)");
  // Writes k_new (B, Hkv, S_new, D) and v_new (B, Hkv, S_new, Dv) into the caches at slots
  // cache_seqlens[b] .. cache_seqlens[b] + S_new of each sequence b. Slots outside the cache
  // are an error on the CPU and skipped on a GPU (the Python op asserts them on the device).
  m.def("_append_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, Tensor cache_seqlens) -> ()");

  // Rotary position embedding of q (B, Hq, S, D) or packed (total, Hq, D) and k (same, Hk
  // heads), last dims contiguous, by the cos/sin tables (max_pos, rot_dim / 2) (fp32; fp64 for
  // fp64 inputs) at positions: None (token s at s), (B,) int64 offsets, (B, S) or (total,)
  // int64. inverse turns the other way (the backward). Semantics: fastarch/ops/rope/reference.py.
  m.def(
      "_rotary(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? positions, bool interleaved, bool inverse)"
      " -> (Tensor q_out, Tensor k_out)");

  // y = x weight^T + bias for a few rows of x (rows, in_features) (last dim contiguous; any row
  // stride), weight (out_features, in_features) contiguous, bias (out_features,) or None, all of
  // one dtype; sums in fp32 (fp64 for fp64), rounded once. Meant for small row counts (a decode
  // step), where the weight's bytes are the cost. Semantics: fastarch/ops/linear/reference.py.
  m.def("_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");

  // y = x W^T + bias with W given as GGUF blocks (uint8 (out_features, in_features / 32 *
  // block bytes), contiguous, as the file stores them) of ggml type quant: 2 Q4_0, 3 Q4_1, 8
  // Q8_0; x (rows, in_features) float32/float16/bfloat16 (last dim contiguous), bias
  // (out_features,) of x's dtype or None. W's values exactly ggml's dequantized ones, sums in
  // fp32, rounded once. Semantics: fastarch/ops/qlinear/reference.py. onednn: past a decode
  // step's rows, where W is dequantized for a GEMM, run it on oneDNN's matmul (the CPU; else
  // PyTorch's fp32 GEMM). int8: x's rows first rounded to int8 per 32 values (activations
  // "int8", llama.cpp's arithmetic: the CPU only).
  m.def("_quantized_linear(Tensor x, Tensor blocks, int quant, Tensor? bias, bool onednn=False, bool int8=False)"
        " -> Tensor");

  // One decode step of a LLaMA-family decoder's layers (fastarch/models/llama.py), calling the
  // kernels above with no Python between them: x (batch * n, hidden) -> the final norm's
  // output. Per layer, in order: weights (input norm, qkv, o, post-attention norm, gate_up,
  // down; a stacked projection whose parts are blocks of mixed formats gives each part), quants
  // (each weight's block format, a ggml type id of _quantized_linear, or 0 for a dense tensor;
  // + 256 on a part followed by another of its stack; + 512 on a part whose x is rounded to int8), biases (one per projection weight, None
  // where absent), k/v caches appended in place, eps (input norm, post-attention norm); then
  // the final norm's weight and eps. cos/sin:
  // rotary tables; offsets: int64 (batch,) positions of the new tokens; seqlens_before/after:
  // int32 (batch,) cache lengths without and with them. linear_kernel: products on _linear,
  // else on PyTorch's GEMM.
  m.def(
      "_llama_decode_layers(Tensor x, Tensor[] weights, int[] quants, Tensor?[] biases, Tensor(a!)[] k_caches,"
      " Tensor(b!)[] v_caches, Tensor cos, Tensor sin, Tensor offsets, Tensor seqlens_before, Tensor seqlens_after,"
      " float[] eps, int batch, int n_head, int n_kv, int head_dim, float scale, int window_left, bool linear_kernel)"
      " -> Tensor");
  // The prefill of packed prompts through the same layers: x (total, hidden) the real tokens,
  // row b's at cu_seqlens[b] .. cu_seqlens[b + 1] (int32 (rows + 1,)), at positions (total,)
  // int64; seqlen: the padded length. The weights, biases and eps as above; the caches empty
  // (filled with the prompts) or none. products: 0 PyTorch's GEMM, 1 _linear, 2 oneDNN's matmul,
  // 3 widened (+ 4: _quantized_linear's GEMM on oneDNN).
  m.def(
      "_llama_prefill_layers(Tensor x, Tensor[] weights, int[] quants, Tensor?[] biases, Tensor(a!)[] k_caches,"
      " Tensor(b!)[] v_caches, Tensor cos, Tensor sin, Tensor positions, Tensor cu_seqlens, int seqlen, float[] eps,"
      " int n_head, int n_kv, int head_dim, float scale, int window_left, int products) -> Tensor");

  // A 3x3 convolution, stride 1, padding 1, of x (N, Ci, H, W) channels-last contiguous fp32
  // by Winograd's F(2x2, 3x3) (csrc/cpu/conv/winograd.h), + bias (Co,) + add (N, Co, H, W)
  // channels-last; u: the transformed weight of fastarch.nn.conv.winograd_weight. The output is
  // channels-last. CPU with AVX-512 only; used by fastarch.nn.Conv2d for inference.
  m.def("_winograd_conv3x3(Tensor x, Tensor u, int out_channels, Tensor? bias, Tensor? add) -> Tensor");

  // Group normalization of x (N, C, S) (channels_last false) or (N, S, C) (true), contiguous,
  // over num_groups groups of C / num_groups channels and all S positions, then weight/bias (C,),
  // the per-sample scale/shift (N, C) (z = u * (1 + scale) + shift) and optionally SiLU.
  // mean, rstd: (N, num_groups) fp32 (fp64 for fp64 x). Absent gradients are empty tensors.
  // Semantics: fastarch/ops/group_norms/reference.py.
  m.def(
      "_group_norm_fwd(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? scale,"
      " Tensor? shift, float eps, bool silu, bool channels_last) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def(
      "_group_norm_bwd(Tensor dy, Tensor x, Tensor mean, Tensor rstd, int num_groups,"
      " Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, bool silu,"
      " bool channels_last, bool need_dweight, bool need_dscale)"
      " -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dscale, Tensor dshift)");
}
