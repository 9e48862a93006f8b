// Entry points of the attention forward and decode kernels, AVX-512 (attention_fwd_avx512.cpp,
// attention_decode_avx512.cpp) and portable (attention_fwd_generic.cpp,
// attention_decode_generic.cpp), called by the glue in attention_cpu.cpp, which plans the work,
// allocates the workspaces and runs these on torch's thread pool. Plain C++, no torch headers.
#pragma once
#include <cstdint>

#include "attention_common.h"
#include "brgemm.h"
#include "cpu/isa.h"

namespace fastarch::cpu::attention {

// ----------------------------------------------------------------------------- forward
// Tiles: kFwdBlockM queries (one task) x kFwdBlockN keys (one step of the online softmax).
// 72 = 12 register tiles of 6 rows (no partial tile); measured on the 2-core Zen 4 (1 thread,
// S 1024/2048, D 64): 5-10% faster than 64 (10 tiles of 6 + one of 4) and than 96 (whose
// coarser causal diagonal costs more).
constexpr int64_t kFwdBlockM = 72;
constexpr int64_t kFwdBlockN = 64;

// K and V packed once per call as GEMM B operands (attention_common.h), one packed key block
// of kFwdBlockN keys per (sequence n, kv head hk, key block kb), stored at block index
// seq_block0[n] * Hkv + hk * blocks(n) + kb (blocks(n) = seq_block0[n+1] - seq_block0[n]),
// each block_elems elements of the compute type: K^T (d_pad x kFwdBlockN) then V
// (kFwdBlockN x dv_pad). Reused by every query block and every query head of the group.
struct FwdPacking {
  bool bf16_gemm;             // compute type bf16 (vdpbf16ps), else fp32 (FMA)
  int64_t d_pad;              // D, padded to even for bf16
  int64_t dv_pad;             // Dv padded to a multiple of 16
  int64_t k_block_elems;      // d_pad * kFwdBlockN
  int64_t v_block_elems;      // kFwdBlockN * dv_pad
  const int64_t* seq_block0;  // (num_seqs + 1,) prefix sums of the key blocks of each sequence
  void* packed;               // seq_block0[num_seqs] * Hkv blocks
  // Per block: 0 not packed, 1 being packed, 2 packed (zeroed by the caller). Blocks are packed
  // by the first task that needs them, inside the one parallel region of the call.
  int32_t* block_state;
};

// One forward task: query block qblock of sequence seq, query head head.
struct FwdTask {
  int32_t seq, head, qblock;
};

// Bytes of one thread's scratch (64-byte aligned pieces).
int64_t fwd_scratch_bytes(const AttentionParams& p, const FwdPacking& pk);
// Runs tasks, taking the next one from *next (shared by all threads, atomically) until none is
// left; scratch: this thread's fwd_scratch_bytes.
void fwd_run_avx512(const AttentionParams& p, const FwdPacking& pk, const FwdTask* tasks, int64_t num_tasks,
                    int64_t* next, void* scratch);

// The forward through oneDNN's brgemm (attention_fwd_brgemm.cpp): bf16's AMX path (cpu/isa.h's
// level amx), every dtype with _set_cpu_brgemm("on") on any AVX512-BF16 CPU. The same
// FwdPacking, with key blocks of blocks.fwd_n keys (K^T and V in column panels of at most 64:
// pack32 layout for bf16, row-major fp32 otherwise) and tasks of blocks.fwd_m queries
// (brgemm.h: BrgemmBlocks).
int64_t fwd_scratch_bytes_brgemm(const FwdPacking& pk, const BrgemmBlocks& blocks);
void fwd_run_brgemm(const AttentionParams& p, const FwdPacking& pk, const BrgemmBlocks& blocks, const FwdTask* tasks,
                    int64_t num_tasks, int64_t* next, void* scratch);

// ----------------------------------------------------------------------------- decode
// Split-K: the cache of each (b, kv head) is cut into chunks of chunk_len keys; an item
// (b, hk, chunk) gives, for each of the group's rows (H/Hkv heads x Sq queries, row
// g * Sq + i), a partial (m, l, o[dv_pad]) in fp32, combined afterwards by decode_combine.
// Partials of item t start at partials + t * decode_item_floats(p).
int64_t decode_item_floats(const DecodeParams& p);
int64_t decode_scratch_bytes(const DecodeParams& p);
// Items [begin, end) of ((b * Hkv + hk) * chunks + c).
void decode_chunks_avx512(const DecodeParams& p, int64_t chunk_len, int64_t chunks, int64_t begin, int64_t end,
                          float* partials, void* scratch);
// Combines the partials of (b, hk) pairs [begin, end) into out and lse.
void decode_combine_avx512(const DecodeParams& p, int64_t chunks, int64_t begin, int64_t end, const float* partials);

// ----------------------------------------------------------------------------- portable build
// The same work plans: forward tasks of kFwdBlockMGeneric queries (72: whole register tiles of
// both builds, 6 rows for AVX2 and 4 on the baseline) over the same FwdPacking of K and V, in
// fp32 (bf16_gemm false, d_pad = D, dv_pad = Dv rounded up to 16); decode items and partials as
// above (with their own sizes).
constexpr int64_t kFwdBlockMGeneric = 72;
constexpr int64_t kFwdBlockNGeneric = 128;

template <Isa I>
int64_t fwd_scratch_bytes_generic(const AttentionParams& p);
template <Isa I>
void fwd_run_generic(const AttentionParams& p, const FwdPacking& pk, const FwdTask* tasks, int64_t num_tasks,
                     int64_t* next, void* scratch);

template <Isa I>
int64_t decode_item_floats_generic(const DecodeParams& p);
template <Isa I>
int64_t decode_scratch_bytes_generic(const DecodeParams& p);
template <Isa I>
void decode_chunks_generic(const DecodeParams& p, int64_t chunk_len, int64_t chunks, int64_t begin, int64_t end,
                           float* partials, void* scratch);
template <Isa I>
void decode_combine_generic(const DecodeParams& p, int64_t chunks, int64_t begin, int64_t end, const float* partials);

}  // namespace fastarch::cpu::attention
