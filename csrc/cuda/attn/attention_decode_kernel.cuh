// Attention of a few new queries against a key/value cache (flash-decoding). Memory-bound:
// every cache entry is read once per kv head for all the query rows that share it (the
// H / Hkv query heads x Sq new tokens, up to kRows per block), with 16-byte loads, and the
// cache is split into `splits` ranges (split-K) so that even one sequence fills the GPU; a
// combine kernel merges the splits' partial outputs by their log-sum-exp.
//
// A block is 4 warps; each warp takes 32 keys at a time:
//   scores   lane j computes the kRows dot products of key j (its 16-byte loads walk one
//            row; the queries, pre-scaled to base 2, are broadcast from shared memory);
//   softmax  online, fp32, the row max over the warp by shuffles;
//   P V      lanes own 8 columns of (32 / (D / 8)) keys at a time: the warp reads whole
//            value rows with 16-byte loads; the probabilities come from shared memory.
// At the end the warps' (max, sum, output) are merged through shared memory.
#pragma once
#include "attention_common.cuh"

namespace fastarch::cuda::attention {
namespace {

template <int kHeadDim>
struct DecodeConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = 8;  // query rows per block
  static constexpr int kLanesPerKey = kHeadDim / 8;
  static constexpr int kKeysPerStep = 32 / kLanesPerKey;  // value rows a warp loads at once
  static constexpr int kMinSplitKeys = 256;
  static constexpr int kMaxSplits = 64;
  // query rows (fp32) + probabilities (fp32, per warp) + the warps' outputs and max/sum
  static constexpr int kSmemBytes =
      (kRows * kHeadDim + kWarps * kRows * 32 + kWarps * kRows * kHeadDim + 2 * kWarps * kRows) * 4;
};

// Keys per split (a multiple of 32) of a cache of `cache_len` slots cut in `splits`.
__host__ __device__ __forceinline__ int decode_split_len(int cache_len, int splits) {
  const int len = (cache_len + splits - 1) / splits;
  return (len + 31) / 32 * 32;
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(DecodeConfig<kHeadDim>::kThreads)
    attention_decode_kernel(const DecodeParams p, int row_groups, int split_len) {
  using Config = DecodeConfig<kHeadDim>;
  constexpr int kRows = Config::kRows, kWarps = Config::kWarps;
  constexpr int kChunks = kHeadDim / 8;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  int idx = blockIdx.x;
  const int split = idx % p.splits;
  idx /= p.splits;
  const int group = idx % row_groups;
  idx /= row_groups;
  const int hk = idx % p.kv_heads, b = idx / p.kv_heads;
  const int heads_per_kv = p.heads / p.kv_heads;
  const int sq = p.seqlen_q;
  const int row0 = group * kRows;  // rows r = (h - hk * heads_per_kv) * sq + i
  const int nrows = min(kRows, heads_per_kv * sq - row0);
  // Unchecked on the host (reading them would synchronize every decoding step): clamped.
  const int n = min(max(p.cache_seqlens[b], 0), p.cache_len);
  const int off = n - sq;  // query i sits at cache position i + off

  // Keys the block's rows see, within this split.
  int i_min = sq, i_max = -1;
  for (int r = 0; r < nrows; ++r) {
    const int i = (row0 + r) % sq;
    i_min = min(i_min, i);
    i_max = max(i_max, i);
  }
  int64_t lo = static_cast<int64_t>(i_min) + off - p.window_left;
  int64_t hi = p.causal ? static_cast<int64_t>(i_max) + off + 1 : n;
  const int64_t split_lo = static_cast<int64_t>(split) * split_len;
  lo = lo > split_lo ? lo : split_lo;  // split_lo >= 0
  hi = hi < n ? hi : n;
  hi = hi < split_lo + split_len ? hi : split_lo + split_len;
  const int key_lo = static_cast<int>(lo), key_hi = static_cast<int>(hi > lo ? hi : lo);

  float* sq_rows = reinterpret_cast<float*>(dynamic_smem());   // kRows x kHeadDim
  float* sp = sq_rows + kRows * kHeadDim;                      // kWarps x kRows x 32
  float* s_out = sp + kWarps * kRows * 32;                     // kWarps x kRows x kHeadDim
  float* s_ml = s_out + kWarps * kRows * kHeadDim;             // kWarps x kRows x {m, l}

  for (int e = tid; e < kRows * kChunks; e += Config::kThreads) {
    const int r = e / kChunks, ch = e % kChunks;
    float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (r < nrows && ch * 8 < p.head_dim) {
      const int rr = row0 + r, h = hk * heads_per_kv + rr / sq, i = rr % sq;
      const T* q = static_cast<const T*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head +
          static_cast<int64_t>(i) * p.q_strides.row + ch * 8;
      const uint4 x = *reinterpret_cast<const uint4*>(q);
#pragma unroll
      for (int j = 0; j < 8; ++j) f[j] = unpack8<T>(x, j) * p.scale_log2;
    }
    st_shared_f32x4(sq_rows + r * kHeadDim + ch * 8, make_float4(f[0], f[1], f[2], f[3]));
    st_shared_f32x4(sq_rows + r * kHeadDim + ch * 8 + 4, make_float4(f[4], f[5], f[6], f[7]));
  }
  block_sync();

  // Visible keys of each row: [jmin, jmax].
  int jmin[kRows], jmax[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int i = (row0 + r) % sq;
    const int64_t first = static_cast<int64_t>(i) + off - p.window_left;
    jmin[r] = r < nrows ? static_cast<int>(first > 0 ? first : 0) : 1;
    jmax[r] = r < nrows ? (p.causal ? i + off : n - 1) : 0;
  }

  const T* kc = static_cast<const T*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
  const T* vc = static_cast<const T*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;
  const int v_chunk = lane % Config::kLanesPerKey;  // this lane's 8 value columns
  const int v_key = lane / Config::kLanesPerKey;    // and its key within a step
  float acc[kRows][8];
  float m_run[kRows], l_run[kRows];  // l_run: this lane's part
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m_run[r] = -kInf;
    l_run[r] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = 0.f;
  }
  float* my_p = sp + warp * kRows * 32;

  for (int base = key_lo + warp * 32; base < key_hi; base += kWarps * 32) {
    const int j = base + lane;
    float s[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) s[r] = 0.f;
    if (j < key_hi) {
      const T* krow = kc + static_cast<int64_t>(j) * p.k_strides.row;
#pragma unroll 4
      for (int ch = 0; ch < kChunks; ++ch) {
        if (ch * 8 >= p.head_dim) break;
        const uint4 x = *reinterpret_cast<const uint4*>(krow + ch * 8);
        float kf[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) kf[e] = unpack8<T>(x, e);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float4 q0 = ld_shared_f32x4(sq_rows + r * kHeadDim + ch * 8);
          const float4 q1 = ld_shared_f32x4(sq_rows + r * kHeadDim + ch * 8 + 4);
          s[r] += q0.x * kf[0] + q0.y * kf[1] + q0.z * kf[2] + q0.w * kf[3] + q1.x * kf[4] + q1.y * kf[5] +
              q1.z * kf[6] + q1.w * kf[7];
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float x = j < key_hi && j >= jmin[r] && j <= jmax[r] ? s[r] : -kInf;
      float mx = fmaxf(m_run[r], x);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, shfl_xor(mx, o));
      const float m_ref = mx == -kInf ? 0.f : mx;
      const float alpha = fast_exp2(m_run[r] - m_ref);
      m_run[r] = mx;
      const float pr = fast_exp2(x - m_ref);
      l_run[r] = l_run[r] * alpha + pr;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[r][e] *= alpha;
      st_shared_f32(my_p + r * 32 + lane, pr);
    }
    warp_sync();
    if (v_chunk * 8 < p.head_dim) {
#pragma unroll 4
      for (int step = 0; step < 32 / Config::kKeysPerStep; ++step) {
        const int jj = step * Config::kKeysPerStep + v_key;
        const int key = base + jj;
        if (key >= key_hi) break;  // keys only grow with step
        const uint4 x = *reinterpret_cast<const uint4*>(vc + static_cast<int64_t>(key) * p.v_strides.row + v_chunk * 8);
        float vf[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) vf[e] = unpack8<T>(x, e);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float pr = ld_shared_f32(my_p + r * 32 + jj);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[r][e] += pr * vf[e];
        }
      }
    }
    warp_sync();  // my_p is rewritten by the next step
  }

  // Merge the lanes (sums over the lanes that took other keys of the same columns), then
  // the warps.
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l_run[r] += shfl_xor(l_run[r], o);
#pragma unroll
    for (int o = 16; o >= Config::kLanesPerKey; o >>= 1) {
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[r][e] += shfl_xor(acc[r][e], o);
    }
  }
  if (v_key == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float* dst = s_out + (warp * kRows + r) * kHeadDim + v_chunk * 8;
      st_shared_f32x4(dst, make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
      st_shared_f32x4(dst + 4, make_float4(acc[r][4], acc[r][5], acc[r][6], acc[r][7]));
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      st_shared_f32(s_ml + (warp * kRows + r) * 2, m_run[r]);
      st_shared_f32(s_ml + (warp * kRows + r) * 2 + 1, l_run[r]);
    }
  }
  block_sync();

  for (int e = tid; e < kRows * kChunks; e += Config::kThreads) {
    const int r = e / kChunks, ch = e % kChunks;
    if (r >= nrows || ch * 8 >= p.head_dim) continue;
    float m = -kInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, ld_shared_f32(s_ml + (w * kRows + r) * 2));
    const float m_ref = m == -kInf ? 0.f : m;
    float l = 0.f, o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float scale = fast_exp2(ld_shared_f32(s_ml + (w * kRows + r) * 2) - m_ref);
      l += ld_shared_f32(s_ml + (w * kRows + r) * 2 + 1) * scale;
      const float4 a = ld_shared_f32x4(s_out + (w * kRows + r) * kHeadDim + ch * 8);
      const float4 bq = ld_shared_f32x4(s_out + (w * kRows + r) * kHeadDim + ch * 8 + 4);
      o[0] += a.x * scale, o[1] += a.y * scale, o[2] += a.z * scale, o[3] += a.w * scale;
      o[4] += bq.x * scale, o[5] += bq.y * scale, o[6] += bq.z * scale, o[7] += bq.w * scale;
    }
    // l = 0: the row saw no key (zeros, lse -inf); NaN: it saw a NaN score (out, lse NaN)
    const bool seen = l != 0.f;
    const float inv = seen ? 1.f / l : 0.f;
    // selected, not scaled by 0: a NaN in v times the p = 0 of a hidden key stays out
    for (int e = 0; e < 8; ++e) o[e] = seen ? o[e] * inv : 0.f;
    const float lse2 = seen ? m + log2f(l) : -kInf;
    const int rr = row0 + r, h = hk * heads_per_kv + rr / sq, i = rr % sq;
    const int64_t row = (static_cast<int64_t>(b) * p.heads + h) * sq + i;
    if (p.splits == 1) {
      uint4 packed;
      packed.x = pack2<T>(o[0], o[1]);
      packed.y = pack2<T>(o[2], o[3]);
      packed.z = pack2<T>(o[4], o[5]);
      packed.w = pack2<T>(o[6], o[7]);
      T* out = static_cast<T*>(p.out) + b * p.out_strides.batch + h * p.out_strides.head +
          static_cast<int64_t>(i) * p.out_strides.row + ch * 8;
      *reinterpret_cast<uint4*>(out) = packed;
      if (ch == 0) p.lse[row] = lse2 * kLn2;
    } else {
      const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * sq;
      float* dst = p.partial_out + (split * rows + row) * kHeadDim + ch * 8;
      *reinterpret_cast<float4*>(dst) = make_float4(o[0], o[1], o[2], o[3]);
      *reinterpret_cast<float4*>(dst + 4) = make_float4(o[4], o[5], o[6], o[7]);
      if (ch == 0) p.partial_lse[split * rows + row] = lse2;
    }
  }
}

// out = sum over splits of exp2(lse_s - lse) out_s, lse = log2(sum exp2(lse_s)) (base 2 in
// the partials, natural in lse).
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(128) attention_decode_combine_kernel(const DecodeParams p) {
  constexpr int kThreadsPerRow = kHeadDim / 8, kRowsPerBlock = 128 / kThreadsPerRow;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.seqlen_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  const int t = threadIdx.x % kThreadsPerRow;
  if (row >= rows) return;
  float m = -kInf;
  for (int sp = 0; sp < p.splits; ++sp) m = fmaxf(m, p.partial_lse[sp * rows + row]);
  const float m_ref = m == -kInf ? 0.f : m;
  float l = 0.f, o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int sp = 0; sp < p.splits; ++sp) {
    // w is NaN for a split whose lse is NaN (the row saw a NaN score there): it must reach o
    const float w = fast_exp2(p.partial_lse[sp * rows + row] - m_ref);
    l += w;
    if (w != 0.f && t * 8 < p.head_dim) {
      const float* src = p.partial_out + (sp * rows + row) * kHeadDim + t * 8;
      const float4 a = *reinterpret_cast<const float4*>(src);
      const float4 c = *reinterpret_cast<const float4*>(src + 4);
      o[0] += w * a.x, o[1] += w * a.y, o[2] += w * a.z, o[3] += w * a.w;
      o[4] += w * c.x, o[5] += w * c.y, o[6] += w * c.z, o[7] += w * c.w;
    }
  }
  const int64_t bh = row / p.seqlen_q, i = row - bh * p.seqlen_q;
  const int64_t b = bh / p.heads, h = bh - b * p.heads;
  if (t * 8 < p.head_dim) {
    const float inv = l != 0.f ? 1.f / l : 0.f;  // NaN l: NaN out
    uint4 packed;
    packed.x = pack2<T>(o[0] * inv, o[1] * inv);
    packed.y = pack2<T>(o[2] * inv, o[3] * inv);
    packed.z = pack2<T>(o[4] * inv, o[5] * inv);
    packed.w = pack2<T>(o[6] * inv, o[7] * inv);
    T* out = static_cast<T*>(p.out) + b * p.out_strides.batch + h * p.out_strides.head + i * p.out_strides.row + t * 8;
    *reinterpret_cast<uint4*>(out) = packed;
  }
  if (t == 0) p.lse[row] = l != 0.f ? (m + log2f(l)) * kLn2 : -kInf;
}

template <int kHeadDim>
int decode_row_groups(const DecodeParams& p) {
  const int rows = p.heads / p.kv_heads * p.seqlen_q;
  return (rows + DecodeConfig<kHeadDim>::kRows - 1) / DecodeConfig<kHeadDim>::kRows;
}

template <typename T, int kHeadDim>
int decode_splits_impl(const DecodeParams& p) {
  using Config = DecodeConfig<kHeadDim>;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    sms = 1;
  }
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.kv_heads * decode_row_groups<kHeadDim>(p);
  // About 8 blocks per SM: a block holds one key per lane in flight, so decoding (bound by the
  // bytes in flight) wants many resident blocks (two per SM measured 16-28% of copy bandwidth
  // on an H200).
  const int64_t want = blocks > 0 ? (8 * static_cast<int64_t>(sms) + blocks - 1) / blocks : 1;
  const int64_t most = (static_cast<int64_t>(p.cache_len) + Config::kMinSplitKeys - 1) / Config::kMinSplitKeys;
  int64_t splits = want < most ? want : most;
  if (splits > Config::kMaxSplits) splits = Config::kMaxSplits;
  if (splits < 1) splits = 1;
  // no empty splits
  const int len = decode_split_len(p.cache_len, static_cast<int>(splits));
  if (len > 0) splits = (p.cache_len + len - 1) / len;
  return static_cast<int>(splits < 1 ? 1 : splits);
}

template <typename T, int kHeadDim>
cudaError_t decode_impl(const DecodeParams& p, cudaStream_t stream) {
  using Config = DecodeConfig<kHeadDim>;
  const int row_groups = decode_row_groups<kHeadDim>(p);
  const int64_t grid = static_cast<int64_t>(p.batch) * p.kv_heads * row_groups * p.splits;
  if (grid == 0) return cudaSuccess;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  auto kernel = attention_decode_kernel<T, kHeadDim>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Config::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int split_len = decode_split_len(p.cache_len, p.splits);
  kernel<<<static_cast<unsigned>(grid), Config::kThreads, Config::kSmemBytes, stream>>>(p, row_groups, split_len);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.splits == 1) return err;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.seqlen_q;
  const int64_t combine_grid = (rows + 128 / (kHeadDim / 8) - 1) / (128 / (kHeadDim / 8));
  if (combine_grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  attention_decode_combine_kernel<T, kHeadDim><<<static_cast<unsigned>(combine_grid), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace fastarch::cuda::attention
