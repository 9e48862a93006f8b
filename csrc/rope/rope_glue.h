// What the CPU and CUDA implementations of fastarch::_rotary share: the checks of their
// arguments (beyond the device type and dtypes, which each backend checks itself) and the
// filling of the kernels' parameter structs.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "rope_params.h"

namespace fastarch::rope_glue {

using at::Tensor;

inline void check(const char* who, const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                  const std::optional<Tensor>& positions, at::ScalarType table_dtype) {
  TORCH_CHECK(q.dim() == 3 || q.dim() == 4, who, ": q must be (B, H, S, D) or packed (total, H, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == q.dim(), who, ": k must have q's rank, got ", k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), who, ": k must have q's dtype ", q.scalar_type());
  const bool packed = q.dim() == 3;
  const int64_t d = q.size(-1);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(-1) == d && (packed || k.size(2) == q.size(2)), who,
              ": k must match q in every dim but the heads, got q ", q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(q.stride(-1) == 1 && k.stride(-1) == 1, who, ": q and k must have contiguous last dims");
  for (const Tensor* t : {&k, &cos, &sin}) {
    TORCH_CHECK(t->device() == q.device(), who, ": every tensor must be on q's device ", q.device());
  }
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) >= 1 && cos.is_contiguous() && sin.sizes() == cos.sizes() &&
                  sin.is_contiguous(),
              who, ": cos and sin must be contiguous (max_pos, rot_dim / 2) tables of one shape, got ", cos.sizes(),
              " and ", sin.sizes());
  TORCH_CHECK(cos.scalar_type() == table_dtype && sin.scalar_type() == table_dtype, who, ": cos and sin must be ",
              table_dtype, " for ", q.scalar_type(), " inputs");
  TORCH_CHECK(2 * cos.size(1) <= d, who, ": the rotary dim 2 * cos.size(1) = ", 2 * cos.size(1),
              " exceeds the head dim ", d);
  if (positions) {
    const Tensor& p = *positions;
    TORCH_CHECK(p.scalar_type() == at::kLong && p.device() == q.device(), who,
                ": positions must be int64 on q's device");
    const bool ok = packed ? (p.dim() == 1 && p.size(0) == q.size(0))
                           : ((p.dim() == 1 && p.size(0) == q.size(0)) ||
                              (p.dim() == 2 && p.size(0) == q.size(0) && p.size(1) == q.size(2)));
    TORCH_CHECK(ok, who, ": positions must be (total,) for packed q, (B,) or (B, S) otherwise, got ", p.sizes());
  } else {
    const int64_t tokens = packed ? q.size(0) : q.size(2);
    TORCH_CHECK(tokens <= cos.size(0), who, ": ", tokens, " tokens numbered from 0 exceed the table's ", cos.size(0),
                " positions");
  }
}

// Parameters rotating x into out (same shape).
inline RopeParams params(const Tensor& x, const Tensor& out, const Tensor& cos, const Tensor& sin,
                         const std::optional<Tensor>& positions, bool interleaved, bool inverse) {
  RopeParams p{};
  const bool packed = x.dim() == 3;
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.batch = packed ? 1 : x.size(0);
  p.heads = x.size(1);
  p.seqlen = packed ? x.size(0) : x.size(2);
  p.head_dim = x.size(-1);
  p.half = cos.size(1);
  p.x_stride_b = packed ? 0 : x.stride(0);
  p.x_stride_h = x.stride(1);
  p.x_stride_s = packed ? x.stride(0) : x.stride(2);
  p.out_stride_b = packed ? 0 : out.stride(0);
  p.out_stride_h = out.stride(1);
  p.out_stride_s = packed ? out.stride(0) : out.stride(2);
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.max_pos = cos.size(0);
  p.positions = positions ? positions->data_ptr<int64_t>() : nullptr;
  p.add_s = !positions || (!packed && positions->dim() == 1);
  if (positions) {
    if (packed) {
      p.pos_stride_b = 0;
      p.pos_stride_s = positions->stride(0);
    } else if (positions->dim() == 1) {  // offsets
      p.pos_stride_b = positions->stride(0);
      p.pos_stride_s = 0;
    } else {
      p.pos_stride_b = positions->stride(0);
      p.pos_stride_s = positions->stride(1);
    }
  }
  p.interleaved = interleaved;
  p.inverse = inverse;
  return p;
}

}  // namespace fastarch::rope_glue
