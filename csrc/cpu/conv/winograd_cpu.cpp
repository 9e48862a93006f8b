// CPU implementation of fastarch::_winograd_conv3x3 (winograd.h): checks, the output, and the
// work items over torch's thread pool, each run by the AVX-512 build of the item at level
// avx512 and above, else by the portable build (cpu/portable.h: AVX2 + FMA at level avx2, the
// baseline at level generic, where fastarch.nn.Conv2d runs oneDNN's convolution instead).
#include "fastarch_torch.h"  // first: the precompiled torch headers (setup.py)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/isa.h"
#include "cpu/portable.h"
#include "winograd.h"

namespace fastarch::cpu::winograd {
namespace {

using at::Tensor;

constexpr const char* kWho = "fastarch::_winograd_conv3x3 (cpu)";

void check_nhwc(const Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, kWho, ": ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.sizes() == shape, kWho, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), kWho, ": ", name, " must be channels-last contiguous");
}

// The item kernel of the level in use, and the tiles of its register tile.
using ItemKernel = void (*)(const Params&, int64_t, int64_t, int64_t, int64_t, float*);
struct Build {
  ItemKernel run_item;
  int64_t rows;
};

Build item_build() {
#ifdef FASTARCH_WITH_AVX512
  if (isa_avx512()) return {&run_item_avx512, kRowsAvx512};
#endif
  return with_portable_build([]<Isa I>() { return Build{&run_item_generic<I>, kRowsPortable}; });
}

// How the work is cut: tile blocks of `tile_block` tiles (a multiple of the build's register
// tile of `rows` tiles), each item one block and one of `groups` equal ranges of the output
// panels. Big images give every thread many blocks; small ones (8x8 and 4x4 maps) need the
// panels split too, at the price of one input transform per item. The plan minimises the
// modelled time of the busiest thread of at::parallel_for's contiguous split, in units of one
// tile's products for one panel: a row tile of r rows costs r + 2 (its loads of the panel), a
// tile's input transform 0.4 (both per input channel; measured on Zen 4 as 1/10 of four panels'
// products with AVX-512, and used unrefitted for the portable build's 3-tile register tile).
struct Plan {
  int64_t tile_block = 14;
  int64_t groups = 1;
};

double item_cost(int64_t count, int64_t item_panels, int64_t rows) {
  double cost = 0;
  for (int64_t r0 = 0; r0 < count; r0 += rows) cost += static_cast<double>(std::min(rows, count - r0)) + 2;
  return 0.4 * static_cast<double>(count) + static_cast<double>(item_panels) * cost;
}

Plan search_plan(int64_t tiles, int64_t panels, int64_t threads, int64_t rows) {
  Plan best{rows, 1};
  double best_time = -1, best_work = 0;
  for (int64_t tb = rows; tb <= kMaxTileBlock; tb += rows) {
    const int64_t blocks = (tiles + tb - 1) / tb;
    for (int64_t groups = 1; groups <= std::min<int64_t>(panels, 16); ++groups) {
      const int64_t items = blocks * groups, chunk = (items + threads - 1) / threads;
      double slowest = 0, work = 0;
      for (int64_t first = 0; first < items; first += chunk) {
        double t = 0;
        for (int64_t item = first; item < std::min(items, first + chunk); ++item) {
          const int64_t block = item / groups, group = item % groups;
          t += item_cost(std::min(tb, tiles - block * tb), (group + 1) * panels / groups - group * panels / groups, rows);
        }
        slowest = std::max(slowest, t);
        work += t;
      }
      if (best_time < 0 || slowest < best_time * 0.999 || (slowest <= best_time * 1.001 && work < best_work)) {
        best = Plan{tb, groups};
        best_time = slowest;
        best_work = work;
      }
    }
  }
  return best;
}

// The plan depends on the tile count, the panels, the threads and the register tile only:
// searched once per combination (a model's few shapes), and not at all for images with many
// blocks per thread, where blocks of about 28 tiles with every panel leave the threads within
// 1/8 of a block of each other.
Plan choose_plan(const Params& p, int64_t threads, int64_t rows) {
  if (p.tiles() >= kMaxTileBlock * 8 * threads) return Plan{28 / rows * rows, 1};
  static std::mutex mutex;
  static std::map<std::tuple<int64_t, int64_t, int64_t, int64_t>, Plan> plans;
  const auto key = std::make_tuple(p.tiles(), p.panels, threads, rows);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans.find(key);
  if (it == plans.end()) it = plans.emplace(key, search_plan(p.tiles(), p.panels, threads, rows)).first;
  return it->second;
}

Tensor winograd_conv3x3_cpu(const Tensor& x, const Tensor& u, int64_t out_channels, const std::optional<Tensor>& bias,
                            const std::optional<Tensor>& add) {
  TORCH_CHECK(x.dim() == 4, kWho, ": x must be (N, C, H, W), got ", x.dim(), " dims");
  check_nhwc(x, "x", x.sizes());
  TORCH_CHECK(out_channels > 0 && x.size(1) > 0, kWho, ": in and out channels must be positive, got ", x.size(1),
              " and ", out_channels);
  const int64_t n = x.size(0), ci = x.size(1), h = x.size(2), w = x.size(3), co = out_channels;
  const int64_t ci_pad = (ci + kChunk - 1) / kChunk * kChunk, panels = (co + kPanel - 1) / kPanel;
  TORCH_CHECK(u.device().is_cpu() && u.scalar_type() == at::kFloat && u.is_contiguous() &&
                  u.sizes() == at::IntArrayRef({16, panels, ci_pad, kPanel}),
              kWho, ": u must be the contiguous float32 (16, ", panels, ", ", ci_pad, ", ", kPanel,
              ") weight of fastarch.nn.conv.winograd_weight, got ", u.scalar_type(), " ", u.sizes());
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->sizes() == at::IntArrayRef({co}),
                kWho, ": bias must be a contiguous float32 (", co, ",) CPU tensor, got ", bias->scalar_type(), " ",
                bias->sizes());
  }
  if (add) check_nhwc(*add, "add", {n, co, h, w});
  Tensor y = at::empty({n, co, h, w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  Params p{x.data_ptr<float>(), u.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr,
           add ? add->data_ptr<float>() : nullptr, y.data_ptr<float>(), n, h, w, ci, co, ci_pad, panels,
           (h + 1) / 2, (w + 1) / 2, 0};
  const Build build = item_build();
  const Plan plan = choose_plan(p, at::get_num_threads(), build.rows);
  p.tile_block = plan.tile_block;
  const int64_t blocks = (p.tiles() + p.tile_block - 1) / p.tile_block;
  at::parallel_for(0, blocks * plan.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(scratch_floats(p));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t block = item / plan.groups, group = item % plan.groups, tile0 = block * p.tile_block;
      build.run_item(p, tile0, std::min(p.tile_block, p.tiles() - tile0), group * panels / plan.groups,
                     (group + 1) * panels / plan.groups, scratch.data());
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastarch, CPU, m) { m.impl("_winograd_conv3x3", &winograd_conv3x3_cpu); }

}  // namespace fastarch::cpu::winograd
