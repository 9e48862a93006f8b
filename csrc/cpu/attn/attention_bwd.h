// The CPU attention backward (fastarch::_attention_bwd): what the glue (attention_bwd.cpp,
// torch side) hands the kernels, AVX-512 (attention_bwd_avx512.cpp, no torch headers) and
// portable (attention_bwd_generic.cpp).
//
// FlashAttention-2 order, transposed: a tile holds S^T = K Q^T (keys as rows, queries as
// columns), so P^T and dS^T come out of the elementwise pass already in the row-major form the
// dV += P^T dO and dK += dS^T Q products take as their left operand, and dQ^T += K^T dS^T reuses
// dS^T as the right one: no fp32 tile is ever transposed.
//
// Three passes, each parallel over independent pieces (no atomics, results independent of the
// thread count):
//  1. prepare, per (head, query block): Q and dO packed as GEMM right operands in both
//     orientations, delta = rowsum(dO * O) and the lse as the exponent offset;
//  2. key chunks, per (sequence, kv head, chunk of key blocks): for each key block, dK and dV
//     accumulate in fp32 over the query heads of the GQA group and the query blocks that see
//     the block; dQ^T accumulates into the chunk's own fp32 buffer;
//  3. finish, per (head, query block): dQ = scale * sum over chunks, in q's dtype.
//
// The products run on register tiles, or (BackwardParams::brgemm: bf16 at cpu/isa.h's level amx,
// every dtype when forced) through oneDNN's brgemm (brgemm.h), bf16 on the AMX tiles where the
// CPU has them.
#pragma once
#include <cstdint>

#include "attention_common.h"
#include "cpu/isa.h"

namespace fastarch::cpu::attention {

struct BackwardParams {
  AttentionParams a;  // q, k, v, out (read), lse (read), masks, dropout; window_right has causal folded in
  const void* dout;
  int64_t dout_stride[3];
  void* dq;
  void* dk;
  void* dv;
  int64_t dq_stride[3], dk_stride[3], dv_stride[3];

  int64_t block_q, block_k;  // queries and keys per tile; block_q a multiple of 16
  // the products through brgemm (AVX-512 kernel only; the tiles then brgemm.h's BrgemmBlocks
  // bwd_q x bwd_k); every bf16 right operand is then packed as column panels of kBrgemmPanel,
  // each with its own row-pair stride
  bool brgemm;
  int64_t chunks;            // key-block chunks per (sequence, kv head)

  // Per-head workspace over "padded rows": the query blocks of all sequences in order, each
  // rounded up to 16 rows; sequence n's block t starts at seq_rows[n] + t * block_q.
  const int64_t* seq_rows;  // (num_seqs,)
  int64_t rows_total;       // padded rows per head
  // Compute-type buffers (AVX-512: bf16 bits for bf16 inputs, fp32 for fp32 and fp16; portable:
  // fp32 for every dtype), per head h at
  // h * rows_total * width + R * width for the block at padded row R:
  void* q_t;   // width d_even: Q^T as right operand (pairs of d), rows16 columns
  void* q_n;   // width d16:    Q as right operand (pairs of query rows)
  void* do_t;  // width dv_even
  void* do_n;  // width dv16
  float* delta;  // width 1: rowsum(dO * O); 0 in padding
  float* lse;    // width 1: lse (times log2 e when exp2 is used); +inf for rows that see no key and padding
  float* dq_t;   // chunks x H x rows_total x D: dQ^T per block (D rows of rows16), fp32, zero on entry
};

inline int64_t bwd_round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Widths of the packed operands (elements).
inline int64_t bwd_d_even(const BackwardParams& p) { return bwd_round_up(p.a.D, 2); }
inline int64_t bwd_dv_even(const BackwardParams& p) { return bwd_round_up(p.a.Dv, 2); }
inline int64_t bwd_d16(const BackwardParams& p) { return bwd_round_up(p.a.D, 16); }
inline int64_t bwd_dv16(const BackwardParams& p) { return bwd_round_up(p.a.Dv, 16); }

// fp32 words of per-thread scratch that bwd_key_chunk needs.
int64_t bwd_workspace_floats(const BackwardParams& p);

// The passes (AVX-512 F/BW/VL/DQ + BF16: only after cpu_has_avx512_bf16()).
void bwd_prepare_block(const BackwardParams& p, int64_t h, int64_t n, int64_t t);
void bwd_key_chunk(const BackwardParams& p, int64_t n, int64_t hk, int64_t chunk, float* workspace);
void bwd_finish_block(const BackwardParams& p, int64_t h, int64_t n, int64_t t);

// The same passes, portable (any CPU).
template <Isa I>
int64_t bwd_workspace_floats_generic(const BackwardParams& p);
template <Isa I>
void bwd_prepare_block_generic(const BackwardParams& p, int64_t h, int64_t n, int64_t t);
template <Isa I>
void bwd_key_chunk_generic(const BackwardParams& p, int64_t n, int64_t hk, int64_t chunk, float* workspace);
template <Isa I>
void bwd_finish_block_generic(const BackwardParams& p, int64_t h, int64_t n, int64_t t);

}  // namespace fastarch::cpu::attention
