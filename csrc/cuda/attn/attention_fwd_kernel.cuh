// The attention forward (FlashAttention-2): one block of 4 warps per 64 queries of one
// (sequence, head); each warp owns 16 query rows. The block walks the key blocks its queries
// see (causal and window bands skip the rest), with
//   S = Q K^T          tensor cores (mma.m16n8k16, fp32 accumulators), Q and K from shared
//                      memory through ldmatrix;
//   online softmax     in registers, fp32, base 2 (log2(e) folded into the scale): running
//                      max m and sum l per row, the output rescaled when m grows;
//   O += P V           P rounded to the input dtype straight from the accumulators.
// K/V tiles are double-buffered: the cp.async loads of key block n + 1 are issued before
// block n is computed, so they land while it runs; one barrier per key block.
// Blocks that need no masking (inside the band, whole, no masks) skip the per-element work.
//
// Shared memory: Q (64 x D) + 2 stages of K and V (kBlockN x D each), swizzled, 16-bit:
// D = 64: 40 KB, D = 128: 80 KB, D = 256 (kBlockN = 32): 96 KB.
#pragma once
#include "attention_common.cuh"

namespace fastarch::cuda::attention {
namespace {

template <int kHeadDim>
struct FwdConfig {
  static constexpr int kBlockM = 64;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  // D = 256: 32 keys per block keeps S small beside the 128 output accumulators per thread.
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;
  static constexpr int kSmemBytes = (kBlockM + 4 * kBlockN) * kHeadDim * 2;
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(FwdConfig<kHeadDim>::kThreads)
    attention_fwd_kernel(const AttentionParams p) {
  using Config = FwdConfig<kHeadDim>;
  using Frag = Fragments<kHeadDim, T>;
  constexpr int kBlockM = Config::kBlockM, kBlockN = Config::kBlockN;
  constexpr int kNTiles = kBlockN / 8;    // n8 tiles of S per warp
  constexpr int kDTiles = kHeadDim / 8;   // n8 tiles of O per warp
  constexpr int kTileKV = kBlockN * kHeadDim;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c = lane & 3;  // fragment row group and column pair

  // Heavier query blocks (later ones, under a causal mask) first.
  const int rows_per_seq = p.cu_seqlens_q != nullptr ? p.max_seqlen_q : p.seqlen_q;
  const int m_blocks = (rows_per_seq + kBlockM - 1) / kBlockM;
  const int bh = blockIdx.x / m_blocks;
  const int m_block = m_blocks - 1 - (blockIdx.x - bh * m_blocks);
  const int b = bh / p.heads, h = bh - b * p.heads;
  const int hk = h / (p.heads / p.kv_heads);
  const Sequence s = sequence_of(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= s.sq) return;  // packed: a shorter sequence
  const Band band{s.sq, s.sk, p.window_left, p.window_right};
  const int rows = min(kBlockM, s.sq - m0);
  int n_lo, n_hi;
  band.keys_of(m0, m0 + rows, &n_lo, &n_hi);

  // lse index of row 0 of the sequence; also the dropout row of query i is lse_row0 + i.
  const int64_t lse_row0 = (static_cast<int64_t>(s.b) * p.heads + h) * p.seqlen_q + s.q_start;
  T* out = static_cast<T*>(p.out) + s.b * p.out_strides.batch + h * p.out_strides.head +
      static_cast<int64_t>(s.q_start) * p.out_strides.row;
  const int row_a = m0 + warp * 16 + g, row_b = row_a + 8;  // this thread's two query rows

  float o[kDTiles][4];
#pragma unroll
  for (int t = 0; t < kDTiles; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
  float m_run[2] = {-kInf, -kInf};  // running max (base 2) of each row
  float l_run[2] = {0.f, 0.f};      // this thread's part of each row's running sum

  if (n_lo < n_hi) {
    T* sQ = reinterpret_cast<T*>(dynamic_smem());
    T* sK = sQ + kBlockM * kHeadDim;  // 2 stages
    T* sV = sK + 2 * kTileKV;         // 2 stages
    const T* q = static_cast<const T*>(p.q) + s.b * p.q_strides.batch + h * p.q_strides.head +
        static_cast<int64_t>(s.q_start + m0) * p.q_strides.row;
    const T* k = static_cast<const T*>(p.k) + s.b * p.k_strides.batch + hk * p.k_strides.head +
        static_cast<int64_t>(s.k_start) * p.k_strides.row;
    const T* v = static_cast<const T*>(p.v) + s.b * p.v_strides.batch + hk * p.v_strides.head +
        static_cast<int64_t>(s.k_start) * p.v_strides.row;
    auto load_kv = [&](int n_block, int stage) {
      const int n0 = n_block * kBlockN;
      load_tile_async<kBlockN, kHeadDim, Config::kThreads>(
          sK + stage * kTileKV, k + n0 * p.k_strides.row, p.k_strides.row, s.sk - n0, p.head_dim, tid);
      load_tile_async<kBlockN, kHeadDim, Config::kThreads>(
          sV + stage * kTileKV, v + n0 * p.v_strides.row, p.v_strides.row, s.sk - n0, p.head_dim, tid);
    };
    load_tile_async<kBlockM, kHeadDim, Config::kThreads>(sQ, q, p.q_strides.row, rows, p.head_dim, tid);
    const int nb_lo = n_lo / kBlockN, nb_hi = (n_hi + kBlockN - 1) / kBlockN;
    load_kv(nb_lo, 0);
    cp_async_commit();

    uint32_t row_hash[2] = {0u, 0u};
    if (p.dropout) {
      row_hash[0] = dropout_row_hash(p.seed, static_cast<uint32_t>(lse_row0 + row_a));
      row_hash[1] = dropout_row_hash(p.seed, static_cast<uint32_t>(lse_row0 + row_b));
    }

    for (int nb = nb_lo; nb < nb_hi; ++nb) {
      const int stage = (nb - nb_lo) & 1;
      // Block nb has landed (this thread's copies), and every thread is past block nb - 1
      // (whose stage the next loads overwrite); after the barrier, everyone's copies.
      cp_async_wait<0>();
      block_sync();
      if (nb + 1 < nb_hi) load_kv(nb + 1, stage ^ 1);
      cp_async_commit();
      const T* tK = sK + stage * kTileKV;
      const T* tV = sV + stage * kTileKV;

      float sc[kNTiles][4];
#pragma unroll
      for (int t = 0; t < kNTiles; ++t) sc[t][0] = sc[t][1] = sc[t][2] = sc[t][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        uint32_t a[4];
        Frag::a(a, sQ, warp * 16, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
          uint32_t bk[2][2];
          Frag::b_pair(bk, tK, np * 16, kk * 16, lane);
          mma_16x8x16<T>(sc[2 * np], a, bk[0]);
          mma_16x8x16<T>(sc[2 * np + 1], a, bk[1]);
        }
      }

      const int n0 = nb * kBlockN;
      const bool unmasked = p.key_padding_mask == nullptr && p.attn_mask == nullptr &&
          band.sees_all(m0, m0 + kBlockM, n0, n0 + kBlockN);
#pragma unroll
      for (int t = 0; t < kNTiles; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[t][e] *= p.scale_log2;
      }
      if (!unmasked) mask_scores<T>(sc, p, s, band, h, row_a, row_b, n0 + 2 * c);

      // Online softmax: new row maxima over the 4 lanes holding a row; a row that has seen
      // no key yet keeps m = -inf and uses 0 as its reference (no inf - inf).
      float m_ref[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = m_run[r];
#pragma unroll
        for (int t = 0; t < kNTiles; ++t) mx = fmaxf(mx, fmaxf(sc[t][2 * r], sc[t][2 * r + 1]));
        mx = fmaxf(mx, shfl_xor(mx, 1));
        mx = fmaxf(mx, shfl_xor(mx, 2));
        m_ref[r] = mx == -kInf ? 0.f : mx;
        const float alpha = fast_exp2(m_run[r] - m_ref[r]);
        m_run[r] = mx;
        l_run[r] *= alpha;
#pragma unroll
        for (int t = 0; t < kDTiles; ++t) {
          o[t][2 * r] *= alpha;
          o[t][2 * r + 1] *= alpha;
        }
      }
#pragma unroll
      for (int t = 0; t < kNTiles; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pr = fast_exp2(sc[t][e] - m_ref[e >> 1]);
          l_run[e >> 1] += pr;  // the sum is over all probabilities, dropped or not
          sc[t][e] = pr;
        }
      }
      if (p.dropout) {
#pragma unroll
        for (int t = 0; t < kNTiles; ++t) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const uint32_t col = static_cast<uint32_t>(s.k_start + n0 + t * 8 + 2 * c + (e & 1));
            if (!dropout_keep(row_hash[e >> 1], col, p.dropout_threshold)) sc[t][e] = 0.f;
          }
        }
      }

#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        uint32_t a[4];
        accumulators_to_a<T>(a, sc[2 * kk], sc[2 * kk + 1]);
#pragma unroll
        for (int np = 0; np < kDTiles / 2; ++np) {
          uint32_t bv[2][2];
          Frag::b_pair_transposed(bv, tV, np * 16, kk * 16, lane);
          mma_16x8x16<T>(o[2 * np], a, bv[0]);
          mma_16x8x16<T>(o[2 * np + 1], a, bv[1]);
        }
      }
    }
  }

  // out = O / l (times 1 / (1 - p) under dropout); a row that saw no key (l = 0) gets zeros
  // and lse = -inf. A row with a NaN score has l = NaN (fmaxf left the NaN out of the max, not
  // out of its exp2): out and lse NaN, even where dropout left O without it.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += shfl_xor(l, 1);
    l += shfl_xor(l, 2);
    const bool seen = l != 0.f;  // true for NaN
    const float inv = seen ? p.dropout_scale / l : 0.f;
    const int row = r == 0 ? row_a : row_b;
    if (row < s.sq) {
      T* dst = out + static_cast<int64_t>(row) * p.out_strides.row;
#pragma unroll
      for (int t = 0; t < kDTiles; ++t) {
        const int col = t * 8 + 2 * c;
        if (col < p.head_dim) {
          // (selected, not scaled by 0: a NaN in v times the p = 0 of a hidden key stays out)
          *reinterpret_cast<uint32_t*>(dst + col) =
              pack2<T>(seen ? o[t][2 * r] * inv : 0.f, seen ? o[t][2 * r + 1] * inv : 0.f);
        }
      }
      if (c == 0) p.lse[lse_row0 + row] = seen ? (m_run[r] + log2f(l)) * kLn2 : -kInf;
    }
  }
}

template <typename T, int kHeadDim>
cudaError_t forward_impl(const AttentionParams& p, cudaStream_t stream) {
  using Config = FwdConfig<kHeadDim>;
  const int rows_per_seq = p.cu_seqlens_q != nullptr ? p.max_seqlen_q : p.seqlen_q;
  const int64_t seqs = p.cu_seqlens_q != nullptr ? p.num_seqs : p.batch;
  const int64_t grid = (rows_per_seq + Config::kBlockM - 1) / Config::kBlockM * seqs * p.heads;
  if (grid == 0) return cudaSuccess;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  auto kernel = attention_fwd_kernel<T, kHeadDim>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Config::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(grid), Config::kThreads, Config::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace fastarch::cuda::attention
