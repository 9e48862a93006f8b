// Kernels of the CPU group norm, without torch headers. Every pass works on "items" (tiles of
// one sample's spatial positions) so that at::parallel_for can share even one sample, one
// group, between the cores; the per-item partial sums are combined in a fixed order, so results
// do not depend on the thread count.
//
// Forward:  stats (per item and channel: sum and sum of squares of x - x[n, c, s=0], the
//           channel's first value, in fp32) -> combine (per group, in fp64: mean, rstd, and the
//           per-(n, c) tables below) -> apply (y = act((x - M) A + B), one fused pass).
// Backward: grad_stats (per item and channel: sum dz and sum dz (x - M)) -> combine_grad (per
//           group: the two means of the dx formula; dweight, dbias, dscale, dshift) ->
//           grad_apply (dx = dz Ad + (x - M) Bd + Cd).
// Why one statistics pass with a shift rather than Welford or two passes: the pass is bound by
// reading x, so a second read costs as much as the whole pass, and Welford's division per
// element is slower than the sums. Shifting by a value of the same channel keeps
// (mean_c - shift)^2 of the order of the channel's variance, so sum_sq - sum^2 / S loses only a
// bit or two to cancellation (unshifted, a channel with |mean| = 100 std would lose ~13 bits
// in fp32). Channels are then merged with Chan's formula in fp64.
#pragma once
#include <cstdint>

#include "cpu/dtype.h"
#include "cpu/isa.h"
#include "group_norms/group_norm_params.h"

namespace fastarch::cpu::gn {

// One sample's S positions cut into `chunks` tiles of `chunk` positions, fixed by the shape
// alone. NCHW: an item is one channel of one tile, (n, c, k) in that order; NHWC: an item is a
// tile with all its channels, (n, k).
struct Tiling {
  int64_t chunk;
  int64_t chunks;
  int64_t items;
  int64_t elements_per_item;  // for the parallel_for grain
};
Tiling make_tiling(int64_t batch, int64_t channels, int64_t spatial, bool channels_last);

// Acc: double for f64, else float. Array shapes (Acc):
//   partial: (N, C, chunks, 2)   the passes' per-item sums
//   tables:  (kTables, N, C)     M, A, B (forward) then Ad, Bd, Cd (backward)
// With xhat = (x - M) rstd: z = (x - M) A + B, A = rstd w (1 + scale), B = bias (1 + scale) + shift.
enum Table { kM = 0, kA, kB, kAd, kBd, kCd, kTables };

// Where the backward with SiLU keeps dz = dy silu'(z) between its passes: grad_stats writes
// it, grad_apply reads it (so the two run as a pair, on the same params) instead of recomputing
// silu' (an exp and a division per value). dz of element k at at[k - origin], in fp32: dx
// itself for fp32 (origin 0), a thread's buffer of one cache unit for 16-bit x; at null: not
// kept (16-bit x phase by phase). fp64 (portable passes only) ignores it in both passes.
struct DzStore {
  float* at = nullptr;
  int64_t origin = 0;
};

template <Isa I, Dtype D>
void group_norm_stats_generic(const GroupNormForwardParams& p, const Tiling& t, int64_t begin, int64_t end, void* partial);
template <Isa I, Dtype D>
void group_norm_apply_generic(const GroupNormForwardParams& p, const Tiling& t, int64_t begin, int64_t end, const void* tables);
template <Isa I, Dtype D>
void group_norm_grad_stats_generic(
    const GroupNormBackwardParams& p, const Tiling& t, int64_t begin, int64_t end, const void* tables, void* partial,
    const DzStore& keep);
template <Isa I, Dtype D>
void group_norm_grad_apply_generic(
    const GroupNormBackwardParams& p, const Tiling& t, int64_t begin, int64_t end, const void* tables,
    const DzStore& keep);

// Groups [begin, end) of n * G: mean, rstd and the forward tables.
template <Dtype D>
void group_norm_combine(const GroupNormForwardParams& p, const Tiling& t, int64_t begin, int64_t end, const void* partial, void* tables);
// The forward tables from saved mean and rstd, for the backward (groups [begin, end)).
template <Dtype D>
void group_norm_tables_from_stats(const GroupNormBackwardParams& p, int64_t begin, int64_t end, void* tables);
// The backward tables and dscale/dshift (when wanted) for groups [begin, end); dweight/dbias
// per (n, c) as fp64 terms into dweight_terms/dbias_terms (N, C) (null when not wanted), summed
// over n by group_norm_weight_grads.
template <Dtype D>
void group_norm_combine_grad(
    const GroupNormBackwardParams& p, const Tiling& t, int64_t begin, int64_t end, const void* partial, void* tables,
    double* dweight_terms, double* dbias_terms);
template <Dtype D>
void group_norm_weight_grads(const GroupNormBackwardParams& p, const double* dweight_terms, const double* dbias_terms);


// The AVX-512 builds of the four passes (f32, f16, bf16). bf16_instructions: the CPU has
// AVX512-BF16 (one instruction rounds fp32 to bf16).
template <Dtype D>
void group_norm_stats_avx512(const GroupNormForwardParams& p, const Tiling& t, int64_t begin, int64_t end, float* partial);
template <Dtype D>
void group_norm_apply_avx512(
    const GroupNormForwardParams& p, const Tiling& t, int64_t begin, int64_t end, const float* tables,
    bool bf16_instructions);
// apply() of items [apply_begin, +count) and stats() of items [stats_begin, +count) in one pass
// (item j with item j: NCHW stretches of equal length, or NHWC tiles of the same rows of two
// samples), the same results as the two.
template <Dtype D>
void group_norm_apply_stats_avx512(
    const GroupNormForwardParams& p, const Tiling& t, int64_t apply_begin, int64_t stats_begin, int64_t count,
    const float* tables, float* partial, bool bf16_instructions);
template <Dtype D>
void group_norm_grad_stats_avx512(
    const GroupNormBackwardParams& p, const Tiling& t, int64_t begin, int64_t end, const float* tables, float* partial,
    const DzStore& keep);
template <Dtype D>
void group_norm_grad_apply_avx512(
    const GroupNormBackwardParams& p, const Tiling& t, int64_t begin, int64_t end, const float* tables,
    const DzStore& keep, bool bf16_instructions);

}  // namespace fastarch::cpu::gn
