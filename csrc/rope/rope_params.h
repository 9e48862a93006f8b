// Arguments of the rotary embedding kernels, shared by the CPU and CUDA backends. Plain
// pointers, so the kernel translation units need no torch headers. The semantics are those of
// fastarch/ops/rope/reference.py.
#pragma once
#include <cstdint>

namespace fastarch {

// Rotates one tensor x, viewed as (batch, heads, seqlen, head_dim) with a contiguous last dim
// (packed (total, heads, head_dim) inputs are batch 1 with a batch stride of 0), into out.
struct RopeParams {
  const void* x;
  void* out;
  int64_t batch, heads, seqlen, head_dim;
  int64_t half;  // rot_dim / 2: pairs rotated per head; channels 2 * half .. head_dim - 1 are copied
  int64_t x_stride_b, x_stride_h, x_stride_s;
  int64_t out_stride_b, out_stride_h, out_stride_s;
  const void* cos;  // (max_pos, half) contiguous, fp32 (fp64 for fp64 x)
  const void* sin;
  int64_t max_pos;
  // Token s of sequence b is at (positions ? positions[b * pos_stride_b + s * pos_stride_s] : 0)
  // + (add_s ? s : 0).
  const int64_t* positions;
  int64_t pos_stride_b, pos_stride_s;
  bool add_s;
  bool interleaved;  // GPT-J pairs (2i, 2i + 1); else GPT-NeoX pairs (i, i + half)
  bool inverse;      // turn by the opposite angle: the backward
};

}  // namespace fastarch
