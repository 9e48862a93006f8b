// What the attention kernels share: shared-memory tiles and their tensor-core fragments,
// which keys a query sees, the dropout hash. No torch headers.
//
// Shared-memory tiles hold rows of 16-bit elements in 16-byte chunks, XOR-swizzled so that
// the eight rows an ldmatrix (or eight lanes of a 16-byte cp.async) touch at the same logical
// chunk land in eight different bank groups: chunk c of row r is stored at chunk
// c ^ (r % 8) (rows of >= 8 chunks), or c ^ ((r / 2) % 4) (rows of 4 chunks, two per
// 128-byte line). No padding, so the tiles are as small as the data.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "attention_launch.h"
#include "attention_ptx.cuh"

namespace fastarch::cuda::attention {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();

// ------------------------------------------------------------------ elements

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// Whether x is -inf, from its 16 bits: a compare of the converted float instead cost the
// forward kernels 20-30 registers at sm_90 (D 32: 128 -> 158, a block less per SM).
__device__ __forceinline__ bool is_neg_inf(__half x) {
  unsigned short bits;
  memcpy(&bits, &x, sizeof(bits));
  return bits == 0xFC00u;
}
__device__ __forceinline__ bool is_neg_inf(__nv_bfloat16 x) {
  unsigned short bits;
  memcpy(&bits, &x, sizeof(bits));
  return bits == 0xFF80u;
}

// Two fp32 values rounded to T (to nearest even), the first in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t w;
  memcpy(&w, &h, sizeof(w));
  return w;
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t w;
  memcpy(&w, &h, sizeof(w));
  return w;
}

// Element e (0..7) of 8 packed 16-bit values.
template <typename T>
__device__ __forceinline__ float unpack8(const uint4& v, int e) {
  const uint32_t w = e < 2 ? v.x : e < 4 ? v.y : e < 6 ? v.z : v.w;
  const unsigned short bits = static_cast<unsigned short>(e % 2 ? w >> 16 : w & 0xffffu);
  T x;
  memcpy(&x, &bits, sizeof(x));
  return to_float<T>(x);
}

// ------------------------------------------------------------------ shared-memory tiles

// A row-major tile with kCols 16-bit elements per row; offset(r, c) is the element offset
// of logical chunk c (elements 8c .. 8c + 7) of row r.
template <int kCols>
struct Swizzled {
  static constexpr int kChunks = kCols / 8;
  static_assert(kChunks == 4 || kChunks % 8 == 0, "rows of 4 or a multiple of 8 chunks");
  static __device__ __forceinline__ int offset(int row, int chunk) {
    const int swizzled = kChunks == 4 ? chunk ^ ((row >> 1) & 3) : chunk ^ (row & 7);
    return row * kCols + swizzled * 8;
  }
};

// Rows [0, kRows) of a global (rows_valid x cols_valid) matrix -> a swizzled tile, by
// kThreads threads with 16-byte cp.async; zeros outside the matrix (those rows and columns
// are not read). cols_valid is a multiple of 8.
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(
    T* tile, const T* rows, int64_t row_stride, int rows_valid, int cols_valid, int tid) {
  constexpr int kChunks = kCols / 8;
  static_assert(kThreads % kChunks == 0 && kRows % (kThreads / kChunks) == 0, "whole passes");
  constexpr int kRowStep = kThreads / kChunks;  // rows per pass
  // Each thread copies one chunk column of every kRowStep-th row: one pointer stepped by a
  // constant, rather than a 64-bit address per pass kept live across the caller's loop.
  const int chunk = tid % kChunks, row0 = tid / kChunks;
  const bool col_valid = chunk * 8 < cols_valid;
  const T* src = rows + row0 * row_stride + chunk * 8;
  const int64_t step = kRowStep * row_stride;
#pragma unroll
  for (int pass = 0; pass < kRows / kRowStep; ++pass) {
    const int row = row0 + pass * kRowStep;
    const bool valid = col_valid && row < rows_valid;
    cp_async_16(tile + Swizzled<kCols>::offset(row, chunk), valid ? src : rows, valid);
    src += step;
  }
}

// Fragments of mma.m16n8k16 from swizzled tiles of kCols columns, loaded by one warp.
template <int kCols, typename T>
struct Fragments {
  using Tile = Swizzled<kCols>;
  // A (16 x 16) at rows m0, columns k0 of a tile stored [m][k].
  static __device__ __forceinline__ void a(uint32_t (&f)[4], const T* tile, int m0, int k0, int lane) {
    const int mat = lane >> 3, r = lane & 7;
    ldmatrix_x4(f, tile + Tile::offset(m0 + (mat & 1) * 8 + r, (k0 >> 3) + (mat >> 1)));
  }
  // A (16 x 16) at m0, k0 of the transpose of a tile stored [k][m].
  static __device__ __forceinline__ void a_transposed(uint32_t (&f)[4], const T* tile, int m0, int k0, int lane) {
    const int mat = lane >> 3, r = lane & 7;
    ldmatrix_x4_trans(f, tile + Tile::offset(k0 + (mat >> 1) * 8 + r, (m0 >> 3) + (mat & 1)));
  }
  // B of two n8 tiles (columns n0 .. n0 + 15, rows k0 .. k0 + 15) of a tile stored [n][k]
  // (B = tile^T: the keys of Q K^T).
  static __device__ __forceinline__ void b_pair(uint32_t (&f)[2][2], const T* tile, int n0, int k0, int lane) {
    const int mat = lane >> 3, r = lane & 7;
    uint32_t x[4];
    ldmatrix_x4(x, tile + Tile::offset(n0 + (mat >> 1) * 8 + r, (k0 >> 3) + (mat & 1)));
    f[0][0] = x[0], f[0][1] = x[1], f[1][0] = x[2], f[1][1] = x[3];
  }
  // The same from a tile stored [k][n] (B = tile: the values of P V).
  static __device__ __forceinline__ void b_pair_transposed(
      uint32_t (&f)[2][2], const T* tile, int n0, int k0, int lane) {
    const int mat = lane >> 3, r = lane & 7;
    uint32_t x[4];
    ldmatrix_x4_trans(x, tile + Tile::offset(k0 + (mat & 1) * 8 + r, (n0 >> 3) + (mat >> 1)));
    f[0][0] = x[0], f[0][1] = x[1], f[1][0] = x[2], f[1][1] = x[3];
  }
};

// The accumulators of n8 tiles 2j and 2j + 1 (16 x 16, fp32) as the A fragment of k-step j
// (rounded to T): the C and A layouts of mma.m16n8k16 line up.
template <typename T>
__device__ __forceinline__ void accumulators_to_a(uint32_t (&f)[4], const float (&lo)[4], const float (&hi)[4]) {
  f[0] = pack2<T>(lo[0], lo[1]);
  f[1] = pack2<T>(lo[2], lo[3]);
  f[2] = pack2<T>(hi[0], hi[1]);
  f[3] = pack2<T>(hi[2], hi[3]);
}

// ------------------------------------------------------------------ sequences and masks

// One (batch entry or packed sequence) x head: where its rows are in the tensors.
struct Sequence {
  int b;        // batch index into the tensors (0 when packed)
  int q_start;  // first row of q (packed) or 0
  int sq;
  int k_start;
  int sk;
};

__device__ __forceinline__ Sequence sequence_of(const AttentionParams& p, int b) {
  if (p.cu_seqlens_q != nullptr) {
    const int q0 = p.cu_seqlens_q[b], q1 = p.cu_seqlens_q[b + 1];
    const int k0 = p.cu_seqlens_k[b], k1 = p.cu_seqlens_k[b + 1];
    return {0, q0, q1 - q0, k0, k1 - k0};
  }
  return {b, 0, p.seqlen_q, 0, p.seqlen_k};
}

// The causal / sliding-window band of one sequence: query i sees key j (0 <= j < sk) when
// -left <= j - (i + sk - sq) <= right. Positions are < kUnbounded, so the differences below
// fit an int; the range ends are computed in 64 bits.
struct Band {
  int sq, sk, left, right;

  __device__ __forceinline__ bool contains(int i, int j) const {
    const int d = j - i - (sk - sq);
    return j < sk && d <= right && -d <= left;
  }
  // The keys [*lo, *hi) that queries [i0, i1) see (empty when *lo >= *hi).
  __device__ __forceinline__ void keys_of(int i0, int i1, int* lo, int* hi) const {
    const int64_t off = static_cast<int64_t>(sk) - sq;
    const int64_t a = static_cast<int64_t>(i0) + off - left;
    const int64_t b = static_cast<int64_t>(i1) - 1 + off + right + 1;
    *lo = static_cast<int>(a < 0 ? 0 : a);
    *hi = static_cast<int>(b > sk ? sk : b);
  }
  // The queries [*lo, *hi) that see any of keys [j0, j1).
  __device__ __forceinline__ void queries_of(int j0, int j1, int* lo, int* hi) const {
    const int64_t off = static_cast<int64_t>(sk) - sq;
    const int64_t a = static_cast<int64_t>(j0) - off - right;
    const int64_t b = static_cast<int64_t>(j1) - 1 - off + left + 1;
    *lo = static_cast<int>(a < 0 ? 0 : a);
    *hi = static_cast<int>(b > sq ? sq : b);
  }
  // Whether every query of [i0, i1) sees every key of [j0, j1) (then no masking is needed).
  __device__ __forceinline__ bool sees_all(int i0, int i1, int j0, int j1) const {
    const int64_t off = static_cast<int64_t>(sk) - sq;
    return j1 <= sk && static_cast<int64_t>(j1) - 1 - (i0 + off) <= right && (i1 - 1 + off) - j0 <= left;
  }
};

// ------------------------------------------------------------------ dropout

// _mix32 of fastarch/ops/attn/reference.py in uint32 arithmetic.
__device__ __forceinline__ uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x4C7D19F3u;
  h ^= h >> 16;
  return h;
}

// dropout_hash(seed, row, col) = mix32(row_hash ^ col), row_hash = mix32(row + seed): the
// row part is computed once per row.
__device__ __forceinline__ uint32_t dropout_row_hash(uint32_t seed, uint32_t row) { return mix32(row + seed); }
__device__ __forceinline__ bool dropout_keep(uint32_t row_hash, uint32_t col, uint32_t threshold) {
  return mix32(row_hash ^ col) >= threshold;
}

// ------------------------------------------------------------------ score masking

// Masks the base-2 scores x of one thread's mma accumulator fragment: element (t, e) is
// query row_a (e < 2) or row_b (e >= 2) and key col0 + 8 t + (e & 1) of the sequence. Adds
// attn_mask * log2(e) (a -inf entry gives -inf even where x is NaN: a NaN q or k must not
// reach a query through a key its mask hides), then sets -inf where the band, the sequence
// ends or key_padding_mask hide the key (in that order, so that a +inf mask on a hidden key
// cannot make a NaN).
// Every load is issued before any result is used (indices clamped into the sequence, which
// is not empty here, instead of branches), so a tile costs one round trip to memory, not one
// per element.
template <typename T, int kTiles>
__device__ __forceinline__ void mask_scores(
    float (&x)[kTiles][4], const AttentionParams& p, const Sequence& s, const Band& band, int h, int row_a, int row_b,
    int col0) {
  const int64_t qi_a = static_cast<int64_t>(s.q_start) + min(row_a, s.sq - 1);
  const int64_t qi_b = static_cast<int64_t>(s.q_start) + min(row_b, s.sq - 1);
  if (p.attn_mask != nullptr) {
    const T* mask = static_cast<const T*>(p.attn_mask) + s.b * p.mask_strides[0] + h * p.mask_strides[1];
    T m[kTiles][4];
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t kj = static_cast<int64_t>(s.k_start) + min(col0 + t * 8 + (e & 1), s.sk - 1);
        m[t][e] = mask[(e < 2 ? qi_a : qi_b) * p.mask_strides[2] + kj * p.mask_strides[3]];
      }
    }
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float bias = to_float<T>(m[t][e]) * kLog2e;
        x[t][e] = is_neg_inf(m[t][e]) ? -kInf : x[t][e] + bias;
      }
    }
  }
  if (p.key_padding_mask != nullptr) {
    const bool* kpm = p.key_padding_mask + s.b * p.kpm_strides[0];
    bool real[kTiles][2];
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t kj = static_cast<int64_t>(s.k_start) + min(col0 + t * 8 + e, s.sk - 1);
        real[t][e] = kpm[kj * p.kpm_strides[1]];
      }
    }
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) x[t][e] = real[t][e & 1] ? x[t][e] : -kInf;
    }
  }
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = e < 2 ? row_a : row_b, j = col0 + t * 8 + (e & 1);
      if (i >= s.sq || !band.contains(i, j)) x[t][e] = -kInf;
    }
  }
}

}  // namespace
}  // namespace fastarch::cuda::attention
