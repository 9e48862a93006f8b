// CPU implementation of fastarch::_group_norm_fwd / _group_norm_bwd: checks (the shared
// csrc/group_norms/group_norm_glue.h), allocation, threading (at::parallel_for over the items
// of group_norm_rows.h, so one sample's groups are shared by all cores), and the choice between
// the AVX-512 and portable passes.
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu/dtype_of.h"
#include "cpu/isa.h"
#include "group_norm_rows.h"
#include "group_norms/group_norm_glue.h"
#include "cpu/portable.h"

namespace fastarch::cpu {
namespace {

using at::Tensor;

constexpr const char* kFwd = "fastarch::_group_norm_fwd (cpu)";
constexpr const char* kBwd = "fastarch::_group_norm_bwd (cpu)";

// Items per task: ~32K elements, so that the pool's overhead stays small.
int64_t grain(const gn::Tiling& t) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(t.elements_per_item, 1)); }
// Groups per task in the combine steps.
int64_t group_grain(int64_t channels_per_group, int64_t chunks) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(channels_per_group * chunks, 1));
}

// The passes' schedule. Phase by phase over the whole tensor (each pass split into items across
// the threads, so that even one group fills them), or, when there are enough cache-sized units
// to share, every pass of one unit before the next (NCHW: a group, whose channels are
// contiguous; NHWC: a sample, whose groups interleave): the unit is read from memory once and
// from the core's cache after (in the forward, the next unit's statistics are read while this
// one is applied: group_norm_apply_stats_avx512; in the 16-bit backward, dz is kept between the
// passes). NHWC samples as units, against phase by phase, measured on the 2-core EPYC at
// 8x256x32x32: forward 0.92x the time in bf16, 0.97x in fp32; bf16 forward + backward 0.8x.
// Either way each item's sums and each group's combine are the same arithmetic, so the results
// are the same bits.
struct Units {
  int64_t count = 0;  // 0: phase by phase
  int64_t items = 0;  // items per unit (consecutive)
  int64_t groups = 0;  // groups per unit (consecutive)
};

template <typename P>
Units cache_units(const P& p, const gn::Tiling& t, int64_t bytes_per_element) {
  constexpr int64_t kGroupBytes = 256 * 1024;   // NCHW: well inside a core's L2 (1-2 MB on current x86)
  constexpr int64_t kSampleBytes = 2 << 20;     // NHWC: a few per core in the L3, which holds what L2 lets go
  const int64_t threads = at::get_num_threads();
  const int64_t cpg = p.channels / p.groups;
  if (p.channels_last) {  // (the units are shared evenly or are plenty)
    Units u{p.batch, t.chunks, p.groups};
    const bool even = u.count >= 4 * threads || (u.count >= 2 * threads && u.count % threads == 0);
    if (!even || p.channels * p.spatial * bytes_per_element > kSampleBytes) u.count = 0;
    return u;
  }
  Units u{p.batch * p.groups, cpg * t.chunks, 1};
  if (u.count < 4 * threads || cpg * p.spatial * bytes_per_element > kGroupBytes) u.count = 0;
  return u;
}

std::tuple<Tensor, Tensor, Tensor> group_norm_fwd_cpu(
    const Tensor& x, int64_t num_groups, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& scale, const std::optional<Tensor>& shift, double eps, bool silu,
    bool channels_last) {
  TORCH_CHECK(x.device().is_cpu(), kFwd, ": x must be on the CPU, got ", x.device());
  const Dtype d = dtype_of(x, kFwd, "x");
  group_norm_glue::check_forward(kFwd, x, num_groups, weight, bias, scale, shift, eps, channels_last);
  const int64_t n = x.size(0);
  const auto stats = x.options().dtype(acc_dtype(d));
  Tensor y = at::empty(x.sizes(), x.options());
  Tensor mean = at::empty({n, num_groups}, stats);
  Tensor rstd = at::empty({n, num_groups}, stats);
  if (n == 0) return {y, mean, rstd};
  const GroupNormForwardParams p = group_norm_glue::forward_params(
      x, num_groups, weight, bias, scale, shift, eps, silu, channels_last, y, mean, rstd);
  const gn::Tiling t = gn::make_tiling(p.batch, p.channels, p.spatial, channels_last);
  Tensor partial = at::empty({p.batch * p.channels * t.chunks * 2}, stats);
  Tensor tables = at::empty({gn::kTables * p.batch * p.channels}, stats);
  void* part = partial.data_ptr();
  void* tab = tables.data_ptr();
  const bool avx512 = use_avx512(d);
  const bool bf16_insn = isa_bf16();
  with_dtype(d, [&]<Dtype D>() {
    auto stats_items = [&](int64_t begin, int64_t end) {
#ifdef FASTARCH_WITH_AVX512  // (active_isa() is never avx512 in a build without those kernels)
      if constexpr (D != Dtype::f64) {
        if (avx512) return gn::group_norm_stats_avx512<D>(p, t, begin, end, static_cast<float*>(part));
      }
#endif
      with_portable_build([&]<Isa I>() { gn::group_norm_stats_generic<I, D>(p, t, begin, end, part); });
    };
    auto combine_groups = [&](int64_t begin, int64_t end) { gn::group_norm_combine<D>(p, t, begin, end, part, tab); };
    auto apply_items = [&](int64_t begin, int64_t end) {
#ifdef FASTARCH_WITH_AVX512
      if constexpr (D != Dtype::f64) {
        if (avx512) return gn::group_norm_apply_avx512<D>(p, t, begin, end, static_cast<const float*>(tab), bf16_insn);
      }
#endif
      with_portable_build([&]<Isa I>() { gn::group_norm_apply_generic<I, D>(p, t, begin, end, tab); });
    };
    const Units u = cache_units(p, t, x.element_size());
    // Units in a pipeline: the statistics of unit i + 1 read from memory while unit i is
    // applied from cache (AVX-512 only; the same results as the passes one by one).
    auto apply_then_stats = [&](int64_t i) {
#ifdef FASTARCH_WITH_AVX512
      if constexpr (D != Dtype::f64) {
        if (avx512) {
          return gn::group_norm_apply_stats_avx512<D>(p, t, i * u.items, (i + 1) * u.items, u.items,
                                                      static_cast<const float*>(tab), static_cast<float*>(part),
                                                      bf16_insn);
        }
      }
#endif
      apply_items(i * u.items, (i + 1) * u.items);
      stats_items((i + 1) * u.items, (i + 2) * u.items);
    };
    if (u.count > 0) {
      at::parallel_for(0, u.count, 1, [&](int64_t begin, int64_t end) {
        stats_items(begin * u.items, (begin + 1) * u.items);
        for (int64_t i = begin; i < end; ++i) {
          combine_groups(i * u.groups, (i + 1) * u.groups);
          if (i + 1 < end) {
            apply_then_stats(i);
          } else {
            apply_items(i * u.items, (i + 1) * u.items);
          }
        }
      });
      return;
    }
    at::parallel_for(0, t.items, grain(t), stats_items);
    at::parallel_for(0, p.batch * p.groups, group_grain(p.channels / p.groups, t.chunks), combine_groups);
    at::parallel_for(0, t.items, grain(t), apply_items);
  });
  (void)avx512;
  (void)bf16_insn;
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> group_norm_bwd_cpu(
    const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& rstd, int64_t num_groups,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, const std::optional<Tensor>& scale,
    const std::optional<Tensor>& shift, bool silu, bool channels_last, bool need_dweight, bool need_dscale) {
  TORCH_CHECK(x.device().is_cpu(), kBwd, ": x must be on the CPU, got ", x.device());
  const Dtype d = dtype_of(x, kBwd, "x");
  group_norm_glue::check_backward(kBwd, dy, x, mean, rstd, num_groups, weight, bias, scale, shift, channels_last,
                                  acc_dtype(d));
  const auto stats = x.options().dtype(acc_dtype(d));
  Tensor dx = at::empty(x.sizes(), x.options());
  auto [dweight, dbias, dscale, dshift] = group_norm_glue::weight_gradients(
      x, channels_last, weight, bias, scale, shift, need_dweight, need_dscale);
  const GroupNormBackwardParams p = group_norm_glue::backward_params(
      dy, x, mean, rstd, num_groups, weight, bias, scale, shift, silu, channels_last, dx, dweight, dbias, dscale,
      dshift);
  const gn::Tiling t = gn::make_tiling(p.batch, p.channels, p.spatial, channels_last);
  const int64_t nc = p.batch * p.channels;
  Tensor partial = at::empty({std::max<int64_t>(nc * t.chunks * 2, 1)}, stats);
  Tensor tables = at::empty({std::max<int64_t>(gn::kTables * nc, 1)}, stats);
  // dweight/dbias: per-(n, c) terms in fp64, summed over n in order at the end.
  Tensor terms = at::empty({2, std::max<int64_t>(nc, 1)}, x.options().dtype(at::kDouble));
  double* dweight_terms = p.dweight ? terms.data_ptr<double>() : nullptr;
  double* dbias_terms = p.dbias ? terms.data_ptr<double>() + terms.size(1) : nullptr;
  void* part = partial.data_ptr();
  void* tab = tables.data_ptr();
  const bool avx512 = use_avx512(d);
  const bool bf16_insn = isa_bf16();
  const int64_t groups_grain = group_grain(p.channels / p.groups, t.chunks);
  with_dtype(d, [&]<Dtype D>() {
    if (p.batch > 0) {
      auto tables_groups = [&](int64_t begin, int64_t end) { gn::group_norm_tables_from_stats<D>(p, begin, end, tab); };
      // keep: where the AVX-512 passes leave dz between them (gn::DzStore).
      auto stats_items = [&](int64_t begin, int64_t end, const gn::DzStore& keep) {
#ifdef FASTARCH_WITH_AVX512
        if constexpr (D != Dtype::f64) {
          if (avx512) {
            return gn::group_norm_grad_stats_avx512<D>(p, t, begin, end, static_cast<const float*>(tab),
                                                       static_cast<float*>(part), keep);
          }
        }
#endif
        with_portable_build([&]<Isa I>() { gn::group_norm_grad_stats_generic<I, D>(p, t, begin, end, tab, part, keep); });
      };
      auto combine_groups = [&](int64_t begin, int64_t end) {
        gn::group_norm_combine_grad<D>(p, t, begin, end, part, tab, dweight_terms, dbias_terms);
      };
      auto apply_items = [&](int64_t begin, int64_t end, const gn::DzStore& keep) {
#ifdef FASTARCH_WITH_AVX512
        if constexpr (D != Dtype::f64) {
          if (avx512) {
            return gn::group_norm_grad_apply_avx512<D>(p, t, begin, end, static_cast<const float*>(tab), keep,
                                                       bf16_insn);
          }
        }
#endif
        with_portable_build([&]<Isa I>() { gn::group_norm_grad_apply_generic<I, D>(p, t, begin, end, tab, keep); });
      };
      // fp32 keeps dz in dx: the stores that bring dx's lines into cache overlap the SiLU
      // derivative's arithmetic (a buffer of its own, dx then written once, measured slower: the
      // reads for ownership move to the light apply pass). 16-bit x keeps it, in fp32, in a
      // per-thread buffer of one cache unit (bf16 fwd+bwd 1.25 against 1.56 ms at 8x256x32x32 on
      // the 2-core EPYC), or recomputes it phase by phase.
      const gn::DzStore in_dx{p.silu && D == Dtype::f32 ? static_cast<float*>(p.dx) : nullptr, 0};
      const Units u = cache_units(p, t, 2 * x.element_size());  // x and dy
      if (u.count > 0) {
        const int64_t unit_elements = x.numel() / u.count;
        const bool buffer = p.silu && !in_dx.at && D != Dtype::f64;
        at::parallel_for(0, u.count, 1, [&](int64_t begin, int64_t end) {
          std::vector<float> dz(buffer ? unit_elements : 0);
          for (int64_t i = begin; i < end; ++i) {
            const gn::DzStore keep = buffer ? gn::DzStore{dz.data(), i * unit_elements} : in_dx;
            tables_groups(i * u.groups, (i + 1) * u.groups);
            stats_items(i * u.items, (i + 1) * u.items, keep);
            combine_groups(i * u.groups, (i + 1) * u.groups);
            apply_items(i * u.items, (i + 1) * u.items, keep);
          }
        });
      } else {
        at::parallel_for(0, p.batch * p.groups, groups_grain, tables_groups);
        at::parallel_for(0, t.items, grain(t), [&](int64_t begin, int64_t end) { stats_items(begin, end, in_dx); });
        at::parallel_for(0, p.batch * p.groups, groups_grain, combine_groups);
        at::parallel_for(0, t.items, grain(t), [&](int64_t begin, int64_t end) { apply_items(begin, end, in_dx); });
      }
    }
    gn::group_norm_weight_grads<D>(p, dweight_terms, dbias_terms);  // zeros for N == 0
  });
  (void)avx512;
  (void)bf16_insn;
  return {dx, dweight, dbias, dscale, dshift};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastarch, CPU, m) {
  m.impl("_group_norm_fwd", &group_norm_fwd_cpu);
  m.impl("_group_norm_bwd", &group_norm_bwd_cpu);
}

}  // namespace fastarch::cpu
