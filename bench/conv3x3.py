"""fastarch.nn.Conv2d's fp32 3x3 convolution on the CPU (Winograd F(2x2, 3x3),
csrc/cpu/conv/winograd.h) against oneDNN's direct convolution on the same shapes, side by side
in one run of interleaved rounds (fastarch.bench.timing.measure): the 3x3 convolutions of the
DDPM-CIFAR10 UNet at batch 4 and 1, and a Stable-Diffusion-sized 320-channel 64x64 map.
Contenders, all channels-last, no autograd:

- ``ours``: ``fastarch.nn.Conv2d`` (its transformed weight cached, as in a model);
- ``onednn``: oneDNN's convolution on its packed weight (``torch.ops.mkldnn``), what
  fastarch.nn.Conv2d ran before (FASTARCH_CONV_WINOGRAD=0), the fastest direct kernel here;
- ``torch``: ``F.conv2d``, what an unmodified model runs (it re-lays the weight out per call).

GFLOP/s counts the direct convolution's 2·N·H·W·Ci·Co·9 for every contender. Errors: max
|y - y_fp64| over torch's own.

    python bench/conv3x3.py [--threads 2] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from fastarch.bench import report
from fastarch.bench.timing import measure, speedup
from fastarch.nn import Conv2d

# (N, Ci, Co, H): the UNet's 3x3 convolutions (down, mid and up blocks; concatenated skips in)
SHAPES = [(4, 128, 128, 32), (4, 256, 128, 32), (4, 128, 256, 16), (4, 256, 256, 16), (4, 512, 256, 16),
          (4, 256, 256, 8), (4, 512, 256, 8), (4, 256, 256, 4), (1, 128, 128, 32), (1, 256, 256, 16),
          (1, 256, 256, 8), (1, 320, 320, 64)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    machine = report.cpu_script_machine(a.threads)
    print(f"{'N x Ci -> Co @ HxW':<22} {'ours ms':>8} {'onednn ms':>9} {'torch ms':>8} {'vs onednn':>9} {'vs torch':>8}"
          f" {'ours GF/s':>9} {'onednn GF/s':>11} {'err / torch':>11}")
    rows = []
    for n, ci, co, h in SHAPES:
        g = torch.Generator().manual_seed(n * ci + co + h)
        conv = Conv2d(ci, co, 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(co, ci, 3, 3, generator=g) / (9 * ci) ** 0.5)
        w, b = conv.weight.detach(), conv.bias.detach()
        x = torch.randn(n, ci, h, h, generator=g).contiguous(memory_format=torch.channels_last)
        packed = torch.ops.mkldnn._reorder_convolution_weight(w, [1, 1], [1, 1], [1, 1], 1, list(x.shape))

        def onednn():
            return torch.ops.mkldnn._convolution_pointwise(x, packed, b, [1, 1], [1, 1], [1, 1], 1, "none", [], "")

        with torch.no_grad():
            exact = F.conv2d(x.double(), w.double(), b.double(), padding=1)
            err = {name: (fn().double() - exact).abs().max().item()
                   for name, fn in (("ours", lambda: conv(x)), ("onednn", onednn), ("torch", lambda: F.conv2d(x, w, b, padding=1)))}
            times, errors = measure({"ours": lambda: conv(x), "onednn": onednn, "torch": lambda: F.conv2d(x, w, b, padding=1)},
                                    "cpu", a.rounds, memory=False)
        if errors:
            print(n, ci, co, h, errors)
            continue
        flop = 2 * n * h * h * ci * co * 9
        row = {"shape": [n, ci, co, h, h], "ours_ms": times["ours"].seconds * 1e3, "onednn_ms": times["onednn"].seconds * 1e3,
               "torch_ms": times["torch"].seconds * 1e3, "vs_onednn": speedup(times["onednn"], times["ours"]),
               "vs_torch": speedup(times["torch"], times["ours"]), "ours_gflops": flop / times["ours"].seconds / 1e9,
               "onednn_gflops": flop / times["onednn"].seconds / 1e9, "max_err": err}
        rows.append(row)
        print(f"{f'{n} x {ci} -> {co} @ {h}x{h}':<22} {row['ours_ms']:>8.3f} {row['onednn_ms']:>9.3f} {row['torch_ms']:>8.3f}"
              f" {row['vs_onednn']:>8.2f}x {row['vs_torch']:>7.2f}x {row['ours_gflops']:>9.0f} {row['onednn_gflops']:>11.0f}"
              f" {err['ours'] / err['torch']:>11.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
