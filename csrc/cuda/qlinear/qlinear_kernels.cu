// CUDA kernel of the linear layer on GGUF's block-quantized weights (Q4_0, Q4_1, Q8_0 blocks as
// the file stores them), y = x W^T + b for a few rows of x (a decode step).
//
// A thread block of 128 threads computes kCols output columns (W rows) for a group of up to
// kRows rows of x. Its threads split the W rows' quantized blocks, 32 blocks a step and four
// threads to a block: thread g of the four takes values 4g..4g+3 and 16+4g..16+4g+3 (in the 4-bit
// formats both nibbles of the same 4 bytes). So a warp reads consecutive bytes of W and
// consecutive 16- or 8-byte pieces of each x row (through the read-only cache: every thread block
// reads x), and the warps splitting K, not only N, keep enough of W's loads in flight to stream it
// when N is a few thousand. Each value is widened to fp32 once and used for every row of the
// group, each x value for kCols columns. The sums are added by shuffles within a warp, then
// across the warps in shared memory; the bias is added and the result rounded once. At one row
// W's bytes are the traffic (0.56-1.06 bytes a value, where fp16 is 2); more rows reuse each
// widened value more, until the FMAs are the cost. More than kMaxRows rows run as several row
// groups (grid.y), each reading W again (mostly from L2).
//
// Blocks are 18, 20 or 34 bytes, so a block starts at any 2-byte boundary (any byte, for a
// tensor at an odd offset): a thread reads the aligned 32-bit words that hold the bytes it needs
// and funnel-shifts them into place. Every word read holds one of those bytes, so no read leaves
// the tensor's allocation. 4-bit and 8-bit values become fp32 by bit operations (set into the
// mantissa of 2^23, then 2^23 subtracted): exact, where an int-to-float conversion per value
// runs at a quarter of the FMA rate or less and would bound the kernel. The values are exactly
// ggml's: (q - 8) * d and q * d are exact in fp32, Q4_1's q * d + m is one fmaf.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/linear/linear_elem.cuh"
#include "qlinear_launch.h"

namespace fastarch::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kThreadsPerQuantBlock = 4;                              // threads sharing a quantized block
constexpr int kQuantBlocksPerStep = kThreads / kThreadsPerQuantBlock;  // of each W row, per loop step
constexpr int kCols = 2;                                               // output columns per thread block
constexpr int kMaxRows = int(kQuantMaxRows);

// x[0..3] as fp32: one 16-byte (fp32) or 8-byte (fp16, bf16) load where aligned, else four.
template <LinearDtype D>
__device__ __forceinline__ void load_x4(const typename Elem<D>::type* x, bool vectors, float* v) {
  using E = Elem<D>;
  using T = typename E::type;
  if (vectors) {
    if constexpr (sizeof(T) == 4) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(x));
      v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
    } else {
      const uint2 u = __ldg(reinterpret_cast<const uint2*>(x));
      const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = E::widen(t[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = E::widen(__ldg(x + i));
  }
}

// The kBytes (at most 4) bytes at p, at any address, in the low bytes of a word: the aligned
// word holding p, and the next one only where the bytes reach into it.
template <int kBytes>
__device__ __forceinline__ uint32_t load_bytes(const uint8_t* p) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  const uint32_t* aligned = reinterpret_cast<const uint32_t*>(address & ~uintptr_t{3});
  const int head = int(address & 3);
  const uint32_t lo = __ldg(aligned);
  const uint32_t hi = head + kBytes > 4 ? __ldg(aligned + 1) : 0u;
  return __funnelshift_r(lo, hi, 8 * head);
}

__device__ __forceinline__ float half_bits(uint32_t bits) { return __half2float(__ushort_as_half(uint16_t(bits))); }

// (2^23 + byte i of word) - minus in fp32: the byte set into the mantissa of 2^23 (0x4B000000)
// is 2^23 + byte exactly, so minus = 2^23 + c gives byte - c, exact for these small integers.
template <int i>
__device__ __forceinline__ float byte_minus(uint32_t word, float minus) {
  return __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7440 | i)) - minus;
}

constexpr float kTwo23 = 8388608.0f;

// The part of a quantized block that thread g (0..3) of its four reads: the scale (and offset)
// and the bytes of values 4g..4g+3 and 16+4g..16+4g+3; widen(v) gives those values as fp32,
// v[0..3] and v[4..7].
template <Quant Q>
struct Group;

template <>
struct Group<Quant::q4_0> {
  float d;
  uint32_t qs;  // value bytes 4g..4g+3: values 4g.. in the low nibbles, 16+4g.. in the high
  static __device__ __forceinline__ Group load(const uint8_t* block, int g) {
    return {half_bits(load_bytes<2>(block)), load_bytes<4>(block + 2 + 4 * g)};
  }
  __device__ __forceinline__ void widen(float* v) const {
    const uint32_t low = qs & 0x0F0F0F0Fu, high = (qs >> 4) & 0x0F0F0F0Fu;
    constexpr float kMinus = kTwo23 + 8.0f;  // q - 8
    v[0] = byte_minus<0>(low, kMinus) * d, v[1] = byte_minus<1>(low, kMinus) * d;
    v[2] = byte_minus<2>(low, kMinus) * d, v[3] = byte_minus<3>(low, kMinus) * d;
    v[4] = byte_minus<0>(high, kMinus) * d, v[5] = byte_minus<1>(high, kMinus) * d;
    v[6] = byte_minus<2>(high, kMinus) * d, v[7] = byte_minus<3>(high, kMinus) * d;
  }
};

template <>
struct Group<Quant::q4_1> {
  float d, m;
  uint32_t qs;  // as Q4_0's
  static __device__ __forceinline__ Group load(const uint8_t* block, int g) {
    const uint32_t dm = load_bytes<4>(block);
    return {half_bits(dm), half_bits(dm >> 16), load_bytes<4>(block + 4 + 4 * g)};
  }
  __device__ __forceinline__ void widen(float* v) const {
    const uint32_t low = qs & 0x0F0F0F0Fu, high = (qs >> 4) & 0x0F0F0F0Fu;
    v[0] = fmaf(byte_minus<0>(low, kTwo23), d, m), v[1] = fmaf(byte_minus<1>(low, kTwo23), d, m);
    v[2] = fmaf(byte_minus<2>(low, kTwo23), d, m), v[3] = fmaf(byte_minus<3>(low, kTwo23), d, m);
    v[4] = fmaf(byte_minus<0>(high, kTwo23), d, m), v[5] = fmaf(byte_minus<1>(high, kTwo23), d, m);
    v[6] = fmaf(byte_minus<2>(high, kTwo23), d, m), v[7] = fmaf(byte_minus<3>(high, kTwo23), d, m);
  }
};

template <>
struct Group<Quant::q8_0> {
  float d;
  uint32_t first, second;  // value bytes 4g..4g+3 and 16+4g..16+4g+3, int8
  static __device__ __forceinline__ Group load(const uint8_t* block, int g) {
    return {half_bits(load_bytes<2>(block)), load_bytes<4>(block + 2 + 4 * g), load_bytes<4>(block + 18 + 4 * g)};
  }
  __device__ __forceinline__ void widen(float* v) const {
    // q ^ 0x80 is q + 128 as an unsigned byte
    const uint32_t lo = first ^ 0x80808080u, hi = second ^ 0x80808080u;
    constexpr float kMinus = kTwo23 + 128.0f;
    v[0] = byte_minus<0>(lo, kMinus) * d, v[1] = byte_minus<1>(lo, kMinus) * d;
    v[2] = byte_minus<2>(lo, kMinus) * d, v[3] = byte_minus<3>(lo, kMinus) * d;
    v[4] = byte_minus<0>(hi, kMinus) * d, v[5] = byte_minus<1>(hi, kMinus) * d;
    v[6] = byte_minus<2>(hi, kMinus) * d, v[7] = byte_minus<3>(hi, kMinus) * d;
  }
};

template <Quant Q, LinearDtype D, int kRows>
__global__ void __launch_bounds__(kThreads) qlinear_kernel(QuantLinearArgs a, bool vectors) {
  using E = Elem<D>;
  using T = typename E::type;
  constexpr int64_t kBytes = quant_block_bytes(Q);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int slot = threadIdx.x / kThreadsPerQuantBlock, g = threadIdx.x % kThreadsPerQuantBlock;
  const int64_t N = a.out_features;
  const int64_t n0 = int64_t(blockIdx.x) * kCols, m0 = int64_t(blockIdx.y) * kRows;
  const int rows = a.rows - m0 < kRows ? int(a.rows - m0) : kRows;
  const int64_t nb = a.in_features / kQuantBlock, row_bytes = nb * kBytes;
  const uint8_t* w[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    // a column past the last reads the last one's blocks; its sums are not stored
    w[c] = a.w + (n0 + c < N ? n0 + c : N - 1) * row_bytes;
  }
  const T* x = static_cast<const T*>(a.x) + m0 * a.ldx + 4 * g;
  float acc[kCols][kRows] = {};
  for (int64_t b = slot; b < nb; b += kQuantBlocksPerStep) {
    float v[kCols][8];
#pragma unroll
    for (int c = 0; c < kCols; ++c) Group<Q>::load(w[c] + b * kBytes, g).widen(v[c]);
    const T* xb = x + b * kQuantBlock;
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      if (m < rows) {
        float xv[8];
        load_x4<D>(xb + m * a.ldx, vectors, xv);
        load_x4<D>(xb + m * a.ldx + 16, vectors, xv + 4);
#pragma unroll
        for (int c = 0; c < kCols; ++c)
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[c][m] = fmaf(v[c][i], xv[i], acc[c][m]);
      }
    }
  }
  __shared__ float partial[kWarps][kCols][kRows];
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) acc[c][m] += __shfl_xor_sync(0xFFFFFFFFu, acc[c][m], offset);
      if (lane == 0) partial[warp][c][m] = acc[c][m];
    }
  }
  __syncthreads();
  const int c = threadIdx.x / kRows, m = threadIdx.x % kRows;
  if (c < kCols && m < rows && n0 + c < N) {
    float sum = partial[0][c][m];
#pragma unroll
    for (int i = 1; i < kWarps; ++i) sum += partial[i][c][m];
    const float bias = a.bias ? E::widen(static_cast<const T*>(a.bias)[n0 + c]) : 0.0f;
    static_cast<T*>(a.out)[(m0 + m) * N + n0 + c] = E::narrow(sum + bias);
  }
}

template <Quant Q, LinearDtype D, int kRows>
cudaError_t launch(const QuantLinearArgs& a, bool vectors, cudaStream_t stream) {
  const dim3 grid(unsigned((a.out_features + kCols - 1) / kCols), unsigned((a.rows + kRows - 1) / kRows));
  qlinear_kernel<Q, D, kRows><<<grid, kThreads, 0, stream>>>(a, vectors);
  return cudaGetLastError();
}

}  // namespace

template <Quant Q, LinearDtype D>
cudaError_t quantized_linear_forward(const QuantLinearArgs& a, cudaStream_t stream) {
  constexpr int64_t kVecBytes = 4 * sizeof(typename Elem<D>::type);  // the 4 values of load_x4
  const bool vectors = a.ldx % 4 == 0 && reinterpret_cast<uintptr_t>(a.x) % kVecBytes == 0;
  if (a.rows == 1) return launch<Q, D, 1>(a, vectors, stream);
  if (a.rows <= 4) return launch<Q, D, 4>(a, vectors, stream);
  return launch<Q, D, kMaxRows>(a, vectors, stream);
}

#define FASTARCH_QLINEAR_CUDA(Q)                                                                                \
  template cudaError_t quantized_linear_forward<Q, LinearDtype::f32>(const QuantLinearArgs&, cudaStream_t); \
  template cudaError_t quantized_linear_forward<Q, LinearDtype::f16>(const QuantLinearArgs&, cudaStream_t); \
  template cudaError_t quantized_linear_forward<Q, LinearDtype::bf16>(const QuantLinearArgs&, cudaStream_t);
FASTARCH_QLINEAR_CUDA(Quant::q4_0)
FASTARCH_QLINEAR_CUDA(Quant::q4_1)
FASTARCH_QLINEAR_CUDA(Quant::q8_0)
#undef FASTARCH_QLINEAR_CUDA

}  // namespace fastarch::cuda
