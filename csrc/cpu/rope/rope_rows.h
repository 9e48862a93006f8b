// Row kernels of the CPU rotary embedding: each turns rows [begin, end) of one tensor, a row
// being one head of one token (see rope_row). Two builds: AVX-512 (picked at run time when the
// CPU has it) and portable C++. The glue has checked that every position lies inside the table.
#pragma once
#include <cstdint>

#include "cpu/dtype.h"
#include "cpu/isa.h"

#include "rope/rope_params.h"

namespace fastarch::cpu {

struct RopeRow {
  int64_t b, h, s;
};

// Row r of 0 .. batch * heads * seqlen - 1 in x's memory order: the tokens of a head one after
// another for (B, H, S, D) layouts, the heads of a token for (B, S, H, D) and packed ones, so
// that a thread's rows are neighbours in memory (a few streams for the prefetchers, not one
// per head).
inline RopeRow rope_row(const RopeParams& p, int64_t r) {
  RopeRow row;
  if (p.x_stride_s <= p.x_stride_h) {
    row.s = r % p.seqlen;
    r /= p.seqlen;
    row.h = r % p.heads;
    row.b = r / p.heads;
  } else {
    row.h = r % p.heads;
    r /= p.heads;
    row.s = r % p.seqlen;
    row.b = r / p.seqlen;
  }
  return row;
}

// rope_row(p, r) for r = begin, begin + 1, ...: the first by divisions, each next by a carry
// (at head_dim 64 a row's arithmetic is a few dozen instructions, and three 64-bit divisions
// per row cost more).
class RopeRows {
 public:
  RopeRows(const RopeParams& p, int64_t begin)
      : row_(rope_row(p, begin)), tokens_inner_(p.x_stride_s <= p.x_stride_h), seqlen_(p.seqlen), heads_(p.heads) {}
  const RopeRow& operator*() const { return row_; }
  void next() {
    int64_t& inner = tokens_inner_ ? row_.s : row_.h;
    int64_t& outer = tokens_inner_ ? row_.h : row_.s;
    if (++inner < (tokens_inner_ ? seqlen_ : heads_)) return;
    inner = 0;
    if (++outer < (tokens_inner_ ? heads_ : seqlen_)) return;
    outer = 0;
    ++row_.b;
  }

 private:
  RopeRow row_;
  bool tokens_inner_;
  int64_t seqlen_, heads_;
};

inline int64_t rope_position(const RopeParams& p, const RopeRow& row) {
  const int64_t pos = p.positions ? p.positions[row.b * p.pos_stride_b + row.s * p.pos_stride_s] : 0;
  return p.add_s ? pos + row.s : pos;
}

template <Isa I, Dtype D>
void rope_rows_generic(const RopeParams& p, int64_t begin, int64_t end);
// fp32, fp16 and bf16 only; bf16_instructions: the CPU has AVX512-BF16.
template <Dtype D>
void rope_rows_avx512(const RopeParams& p, int64_t begin, int64_t end, bool bf16_instructions);

}  // namespace fastarch::cpu
