// The attention backward (FlashAttention-2), in three kernels:
//   delta    delta_i = rowsum(dO_i * O_i) (fp32), the softmax-gradient correction;
//   main     one block of 8 warps per key block of one (sequence, query head): dK and dV
//            stay in registers while the block walks the query blocks that see its keys,
//            recomputing P = exp2(S * scale_log2 - lse) from Q, K and the forward's lse:
//              S = Q K^T, dP = dO V^T                (warps 4 x 2 over 64 queries x keys)
//              dS = P * (dP - delta)                 (dropout: P and dP masked and scaled)
//              dV += P^T dO, dK += dS^T Q            (warps over keys x head dim, P and dS
//                                                     passed through shared memory)
//              dQ += dS K                            (fp32 atomics into dq_accum)
//   convert  dq = dq_accum * scale in the input dtype.
// Q, dO (and their rows' lse and delta) are double-buffered with cp.async for D <= 128.
// With grouped-query attention each query head writes its own fp32 dK/dV (dk_accum,
// dv_accum) and the glue sums each group: no atomics, deterministic dK/dV.
//
// Shared memory, 16-bit swizzled tiles: K, V (kBlockN x D), Q, dO (stages x 64 x D),
// P, dS (64 x kBlockN), plus lse/delta: D = 64: 64 KB, D = 128: 97 KB, D = 256: 105 KB.
#pragma once
#include "attention_common.cuh"

namespace fastarch::cuda::attention {
namespace {

template <int kHeadDim>
struct BwdConfig {
  static constexpr int kBlockM = 64;  // queries per step
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;  // keys per block
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStages = kHeadDim <= 128 ? 2 : 1;  // of Q and dO (D = 256: smem)
  // S, dP: warp (w % 4, w / 4) holds queries 16 (w % 4) .. + 16, keys kSKeys (w / 4) .. +
  static constexpr int kSKeys = kBlockN / 2;
  // dK, dV: warp w holds keys 16 (w % kKeySlabs) .. + 16, columns kKVCols (w / kKeySlabs) ..
  static constexpr int kKeySlabs = kBlockN / 16;
  static constexpr int kKVCols = kHeadDim * kKeySlabs / kWarps;
  // dQ: warp w holds queries 16 (w % 4) .. + 16, columns kQCols (w / 4) .., computed in
  // chunks of at most 64 columns (32 accumulator registers).
  static constexpr int kQCols = kHeadDim / 2;
  static constexpr int kQChunk = kQCols < 64 ? kQCols : 64;

  static constexpr int kTileQ = kBlockM * kHeadDim;
  static constexpr int kTileK = kBlockN * kHeadDim;
  static constexpr int kTileP = kBlockM * kBlockN;
  static constexpr int kSmemBytes =
      (2 * kTileK + 2 * kStages * kTileQ + 2 * kTileP) * 2 + 2 * kStages * kBlockM * 4;
  static_assert(kKVCols % 16 == 0 && kQChunk % 16 == 0 && kSKeys % 16 == 0, "whole fragment pairs");
};

// Threads per row and rows per block of the delta and convert kernels: 8 columns a thread.
template <int kHeadDim>
struct RowsConfig {
  static constexpr int kThreads = 128;
  static constexpr int kThreadsPerRow = kHeadDim / 8;
  static constexpr int kRowsPerBlock = kThreads / kThreadsPerRow;
};

// delta[(b * H + h) * seqlen_q + i] = sum_d dout * out, over every (b, h, i) row (packed
// rows included: the sum needs no sequence bounds).
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(RowsConfig<kHeadDim>::kThreads) attention_bwd_delta_kernel(const AttentionParams p) {
  using Config = RowsConfig<kHeadDim>;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.seqlen_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * Config::kRowsPerBlock + threadIdx.x / Config::kThreadsPerRow;
  const int t = threadIdx.x % Config::kThreadsPerRow;
  float sum = 0.f;
  if (row < rows && t * 8 < p.head_dim) {
    const int64_t bh = row / p.seqlen_q, i = row - bh * p.seqlen_q;
    const int64_t b = bh / p.heads, h = bh - b * p.heads;
    const T* dout = static_cast<const T*>(p.dout) + b * p.dout_strides.batch + h * p.dout_strides.head +
        i * p.dout_strides.row + t * 8;
    const T* out = static_cast<const T*>(p.out) + b * p.out_strides.batch + h * p.out_strides.head +
        i * p.out_strides.row + t * 8;
    const uint4 x = *reinterpret_cast<const uint4*>(dout);
    const uint4 y = *reinterpret_cast<const uint4*>(out);
#pragma unroll
    for (int e = 0; e < 8; ++e) sum += unpack8<T>(x, e) * unpack8<T>(y, e);
  }
#pragma unroll
  for (int offset = Config::kThreadsPerRow / 2; offset > 0; offset >>= 1) sum += shfl_xor(sum, offset);
  if (row < rows && t == 0) p.delta[row] = sum;
}

// dq = dq_accum * scale, rounded to T.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(RowsConfig<kHeadDim>::kThreads) attention_bwd_dq_kernel(const AttentionParams p) {
  using Config = RowsConfig<kHeadDim>;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.seqlen_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * Config::kRowsPerBlock + threadIdx.x / Config::kThreadsPerRow;
  const int t = threadIdx.x % Config::kThreadsPerRow;
  if (row >= rows || t * 8 >= p.head_dim) return;
  const int64_t bh = row / p.seqlen_q, i = row - bh * p.seqlen_q;
  const int64_t b = bh / p.heads, h = bh - b * p.heads;
  const float* acc = p.dq_accum + row * kHeadDim + t * 8;
  const float4 x = *reinterpret_cast<const float4*>(acc);
  const float4 y = *reinterpret_cast<const float4*>(acc + 4);
  uint4 packed;
  packed.x = pack2<T>(x.x * p.scale, x.y * p.scale);
  packed.y = pack2<T>(x.z * p.scale, x.w * p.scale);
  packed.z = pack2<T>(y.x * p.scale, y.y * p.scale);
  packed.w = pack2<T>(y.z * p.scale, y.w * p.scale);
  T* dq = static_cast<T*>(p.dq) + b * p.dq_strides.batch + h * p.dq_strides.head + i * p.dq_strides.row + t * 8;
  *reinterpret_cast<uint4*>(dq) = packed;
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(BwdConfig<kHeadDim>::kThreads) attention_bwd_kernel(const AttentionParams p) {
  using Config = BwdConfig<kHeadDim>;
  using FragD = Fragments<kHeadDim, T>;            // tiles of D columns: Q, dO, K, V
  using FragN = Fragments<Config::kBlockN, T>;     // tiles of kBlockN columns: P, dS
  using TileN = Swizzled<Config::kBlockN>;
  constexpr int kBlockM = Config::kBlockM, kBlockN = Config::kBlockN, kStages = Config::kStages;
  constexpr int kSTiles = Config::kSKeys / 8;
  constexpr int kKVTiles = Config::kKVCols / 8;
  constexpr int kQTiles = Config::kQChunk / 8;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c = lane & 3;

  const int keys_per_seq = p.cu_seqlens_k != nullptr ? p.max_seqlen_k : p.seqlen_k;
  const int n_blocks = (keys_per_seq + kBlockN - 1) / kBlockN;
  const int bh = blockIdx.x / n_blocks;
  const int n_block = blockIdx.x - bh * n_blocks;
  const int b = bh / p.heads, h = bh - b * p.heads;
  const int hk = h / (p.heads / p.kv_heads);
  const Sequence s = sequence_of(p, b);
  const int n0 = n_block * kBlockN;
  if (n0 >= s.sk) return;  // packed: a shorter sequence
  const Band band{s.sq, s.sk, p.window_left, p.window_right};
  const int keys = min(kBlockN, s.sk - n0);
  int m_lo, m_hi;
  band.queries_of(n0, n0 + keys, &m_lo, &m_hi);
  const int64_t lse_row0 = (static_cast<int64_t>(s.b) * p.heads + h) * p.seqlen_q + s.q_start;

  // This warp's dK/dV tile: keys kv_key0 .. + 16, columns kv_col0 .. + kKVCols.
  const int kv_key0 = (warp % Config::kKeySlabs) * 16;
  const int kv_col0 = (warp / Config::kKeySlabs) * Config::kKVCols;
  float dk[kKVTiles][4], dv[kKVTiles][4];
#pragma unroll
  for (int t = 0; t < kKVTiles; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[t][e] = dv[t][e] = 0.f;
  }

  if (m_lo < m_hi) {
    char* smem = dynamic_smem();
    T* sK = reinterpret_cast<T*>(smem);
    T* sV = sK + Config::kTileK;
    T* sQ = sV + Config::kTileK;                 // kStages
    T* sdO = sQ + kStages * Config::kTileQ;      // kStages
    T* sP = sdO + kStages * Config::kTileQ;
    T* sdS = sP + Config::kTileP;
    float* sLse = reinterpret_cast<float*>(sdS + Config::kTileP);  // kStages x kBlockM
    float* sDelta = sLse + kStages * kBlockM;                       // kStages x kBlockM

    const T* k = static_cast<const T*>(p.k) + s.b * p.k_strides.batch + hk * p.k_strides.head +
        static_cast<int64_t>(s.k_start + n0) * p.k_strides.row;
    const T* v = static_cast<const T*>(p.v) + s.b * p.v_strides.batch + hk * p.v_strides.head +
        static_cast<int64_t>(s.k_start + n0) * p.v_strides.row;
    const T* q = static_cast<const T*>(p.q) + s.b * p.q_strides.batch + h * p.q_strides.head +
        static_cast<int64_t>(s.q_start) * p.q_strides.row;
    const T* dout = static_cast<const T*>(p.dout) + s.b * p.dout_strides.batch + h * p.dout_strides.head +
        static_cast<int64_t>(s.q_start) * p.dout_strides.row;
    load_tile_async<kBlockN, kHeadDim, Config::kThreads>(sK, k, p.k_strides.row, keys, p.head_dim, tid);
    load_tile_async<kBlockN, kHeadDim, Config::kThreads>(sV, v, p.v_strides.row, keys, p.head_dim, tid);
    auto load_queries = [&](int m_block, int stage) {
      const int m0 = m_block * kBlockM, rows = s.sq - m0;
      load_tile_async<kBlockM, kHeadDim, Config::kThreads>(
          sQ + stage * Config::kTileQ, q + m0 * p.q_strides.row, p.q_strides.row, rows, p.head_dim, tid);
      load_tile_async<kBlockM, kHeadDim, Config::kThreads>(
          sdO + stage * Config::kTileQ, dout + m0 * p.dout_strides.row, p.dout_strides.row, rows, p.head_dim, tid);
      if (tid < kBlockM) {
        const bool valid = tid < rows;
        const int64_t i = lse_row0 + m0 + (valid ? tid : 0);
        cp_async_4(sLse + stage * kBlockM + tid, p.lse + i, valid);
        cp_async_4(sDelta + stage * kBlockM + tid, p.delta + i, valid);
      }
    };
    const int mb_lo = m_lo / kBlockM, mb_hi = (m_hi + kBlockM - 1) / kBlockM;
    load_queries(mb_lo, 0);
    cp_async_commit();

    // This warp's S/dP tile: queries s_row0 .. + 16 of the step, keys s_key0 .. + kSKeys.
    const int s_row0 = (warp & 3) * 16;
    const int s_key0 = (warp >> 2) * Config::kSKeys;
    uint32_t col_hash_base = 0;
    if (p.dropout) col_hash_base = static_cast<uint32_t>(s.k_start + n0 + s_key0 + 2 * c);

    for (int mb = mb_lo; mb < mb_hi; ++mb) {
      const int stage = kStages == 2 ? (mb - mb_lo) & 1 : 0;
      cp_async_wait<0>();
      block_sync();
      if (kStages == 2) {
        if (mb + 1 < mb_hi) load_queries(mb + 1, stage ^ 1);
        cp_async_commit();
      }
      const int m0 = mb * kBlockM;
      const T* tQ = sQ + stage * Config::kTileQ;
      const T* tdO = sdO + stage * Config::kTileQ;

      float sc[kSTiles][4], dp[kSTiles][4];
#pragma unroll
      for (int t = 0; t < kSTiles; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[t][e] = dp[t][e] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        uint32_t aq[4], ado[4];
        FragD::a(aq, tQ, s_row0, kk * 16, lane);
        FragD::a(ado, tdO, s_row0, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < kSTiles / 2; ++np) {
          uint32_t bk[2][2], bv[2][2];
          FragD::b_pair(bk, sK, s_key0 + np * 16, kk * 16, lane);
          mma_16x8x16<T>(sc[2 * np], aq, bk[0]);
          mma_16x8x16<T>(sc[2 * np + 1], aq, bk[1]);
          FragD::b_pair(bv, sV, s_key0 + np * 16, kk * 16, lane);
          mma_16x8x16<T>(dp[2 * np], ado, bv[0]);
          mma_16x8x16<T>(dp[2 * np + 1], ado, bv[1]);
        }
      }

      // P = exp2(S * scale_log2 - lse * log2(e)) (0 where masked: a row with lse = -inf
      // saw no key in the forward), dS = P (dP - delta); both to shared memory.
      const bool unmasked = p.key_padding_mask == nullptr && p.attn_mask == nullptr && m0 + kBlockM <= s.sq &&
          band.sees_all(m0, m0 + kBlockM, n0, n0 + kBlockN);
      const float* tLse = sLse + stage * kBlockM;
      const float* tDelta = sDelta + stage * kBlockM;
#pragma unroll
      for (int t = 0; t < kSTiles; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[t][e] *= p.scale_log2;
      }
      if (!unmasked) mask_scores<T>(sc, p, s, band, h, m0 + s_row0 + g, m0 + s_row0 + g + 8, n0 + s_key0 + 2 * c);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = s_row0 + g + 8 * r;  // within the step
        const float lse2 = ld_shared_f32(tLse + row) * kLog2e;
        const float delta = ld_shared_f32(tDelta + row);
        const uint32_t row_hash =
            p.dropout ? dropout_row_hash(p.seed, static_cast<uint32_t>(lse_row0 + m0 + row)) : 0u;
#pragma unroll
        for (int t = 0; t < kSTiles; ++t) {
          float pv[2], dsv[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float x = sc[t][2 * r + e];
            // 0 where masked; a row with lse = -inf saw no key in the forward
            const float pr = unmasked ? fast_exp2(x - lse2) : x == -kInf || lse2 == -kInf ? 0.f : fast_exp2(x - lse2);
          float dpv = dp[t][2 * r + e];
            float used = pr;
            if (p.dropout) {
              const bool keep =
                  dropout_keep(row_hash, col_hash_base + static_cast<uint32_t>(t * 8 + e), p.dropout_threshold);
              dpv = keep ? dpv * p.dropout_scale : 0.f;
              used = keep ? pr * p.dropout_scale : 0.f;
            }
            pv[e] = used;
            dsv[e] = pr * (dpv - delta);
          }
          const int offset = TileN::offset(row, (s_key0 >> 3) + t) + 2 * c;
          st_shared_u32(sP + offset, pack2<T>(pv[0], pv[1]));
          st_shared_u32(sdS + offset, pack2<T>(dsv[0], dsv[1]));
        }
      }
      block_sync();

      // dV += P^T dO, dK += dS^T Q over the step's 64 queries.
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
        uint32_t ap[4], ads[4];
        FragN::a_transposed(ap, sP, kv_key0, kk * 16, lane);
        FragN::a_transposed(ads, sdS, kv_key0, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < kKVTiles / 2; ++np) {
          uint32_t bdo[2][2], bq[2][2];
          FragD::b_pair_transposed(bdo, tdO, kv_col0 + np * 16, kk * 16, lane);
          mma_16x8x16<T>(dv[2 * np], ap, bdo[0]);
          mma_16x8x16<T>(dv[2 * np + 1], ap, bdo[1]);
          FragD::b_pair_transposed(bq, tQ, kv_col0 + np * 16, kk * 16, lane);
          mma_16x8x16<T>(dk[2 * np], ads, bq[0]);
          mma_16x8x16<T>(dk[2 * np + 1], ads, bq[1]);
        }
      }

      // dQ (this warp: queries s_row0 .., columns q_col0 ..) += dS K, added to dq_accum.
      const int q_col0 = (warp >> 2) * Config::kQCols;
#pragma unroll
      for (int chunk = 0; chunk < Config::kQCols / Config::kQChunk; ++chunk) {
        float dq[kQTiles][4];
#pragma unroll
        for (int t = 0; t < kQTiles; ++t) dq[t][0] = dq[t][1] = dq[t][2] = dq[t][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          uint32_t a[4];
          FragN::a(a, sdS, s_row0, kk * 16, lane);
#pragma unroll
          for (int np = 0; np < kQTiles / 2; ++np) {
            uint32_t bk[2][2];
            FragD::b_pair_transposed(bk, sK, q_col0 + chunk * Config::kQChunk + np * 16, kk * 16, lane);
            mma_16x8x16<T>(dq[2 * np], a, bk[0]);
            mma_16x8x16<T>(dq[2 * np + 1], a, bk[1]);
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = m0 + s_row0 + g + 8 * r;
          if (row >= s.sq) continue;
          float* acc = p.dq_accum + (lse_row0 + row) * kHeadDim;
#pragma unroll
          for (int t = 0; t < kQTiles; ++t) {
            const int col = q_col0 + chunk * Config::kQChunk + t * 8 + 2 * c;
            if (col < p.head_dim) {
              atomic_add_f32(acc + col, dq[t][2 * r]);
              atomic_add_f32(acc + col + 1, dq[t][2 * r + 1]);
            }
          }
        }
      }

      if (kStages == 1) {  // every warp is done with Q and dO: load the next step
        block_sync();
        if (mb + 1 < mb_hi) load_queries(mb + 1, 0);
        cp_async_commit();
      }
    }
  }

  // dK = scale * dS^T Q, dV: this block's keys (zeros for keys no query sees).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = n0 + kv_key0 + g + 8 * r;
    if (key >= s.sk) continue;
    const int64_t kj = static_cast<int64_t>(s.k_start) + key;
    if (p.dk_accum != nullptr) {
      const int64_t row = ((static_cast<int64_t>(s.b) * p.heads + h) * p.seqlen_k + kj) * kHeadDim;
#pragma unroll
      for (int t = 0; t < kKVTiles; ++t) {
        const int col = kv_col0 + t * 8 + 2 * c;
        if (col < p.head_dim) {
          *reinterpret_cast<float2*>(p.dk_accum + row + col) = make_float2(dk[t][2 * r] * p.scale, dk[t][2 * r + 1] * p.scale);
          *reinterpret_cast<float2*>(p.dv_accum + row + col) = make_float2(dv[t][2 * r], dv[t][2 * r + 1]);
        }
      }
    } else {
      T* dkr = static_cast<T*>(p.dk) + s.b * p.dk_strides.batch + hk * p.dk_strides.head + kj * p.dk_strides.row;
      T* dvr = static_cast<T*>(p.dv) + s.b * p.dv_strides.batch + hk * p.dv_strides.head + kj * p.dv_strides.row;
#pragma unroll
      for (int t = 0; t < kKVTiles; ++t) {
        const int col = kv_col0 + t * 8 + 2 * c;
        if (col < p.head_dim) {
          *reinterpret_cast<uint32_t*>(dkr + col) = pack2<T>(dk[t][2 * r] * p.scale, dk[t][2 * r + 1] * p.scale);
          *reinterpret_cast<uint32_t*>(dvr + col) = pack2<T>(dv[t][2 * r], dv[t][2 * r + 1]);
        }
      }
    }
  }
}

template <typename T, int kHeadDim>
cudaError_t backward_impl(const AttentionParams& p, cudaStream_t stream) {
  using Config = BwdConfig<kHeadDim>;
  using Rows = RowsConfig<kHeadDim>;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.seqlen_q;
  const int64_t row_grid = (rows + Rows::kRowsPerBlock - 1) / Rows::kRowsPerBlock;
  const int keys_per_seq = p.cu_seqlens_k != nullptr ? p.max_seqlen_k : p.seqlen_k;
  const int64_t seqs = p.cu_seqlens_k != nullptr ? p.num_seqs : p.batch;
  const int64_t grid = (keys_per_seq + Config::kBlockN - 1) / Config::kBlockN * seqs * p.heads;
  if (row_grid > 0x7fffffff || grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (row_grid > 0) {
    attention_bwd_delta_kernel<T, kHeadDim><<<static_cast<unsigned>(row_grid), Rows::kThreads, 0, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (grid > 0) {
    auto kernel = attention_bwd_kernel<T, kHeadDim>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Config::kSmemBytes);
    if (err != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(grid), Config::kThreads, Config::kSmemBytes, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (row_grid > 0) {
    attention_bwd_dq_kernel<T, kHeadDim><<<static_cast<unsigned>(row_grid), Rows::kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace fastarch::cuda::attention
