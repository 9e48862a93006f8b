"""fastarch.nn.MultiheadAttention against torch.nn.MultiheadAttention on the CPU, forward with
need_weights=False (the call fastarch runs), side by side in one run of interleaved rounds
(fastarch.bench.timing.measure). Contenders, sharing one set of parameters, no autograd:

- ``ours``: ``fastarch.nn.MultiheadAttention``: the projections on fastarch.ops.linear, the
  attention on fastarch.ops.attention;
- ``ours_torch_proj``: the same with the projections on ``F.linear`` (what it ran before the
  projections moved to ops.linear), to show what each part brings;
- ``torch``: ``torch.nn.MultiheadAttention`` (its fast path where it takes one, else its
  Python path with SDPA).

Shapes: ViT-B/16 (4 x 197 x 768, 12 heads), CLIP's text encoder (1 x 77 x 512, 8 heads), a
small one (8 x 64 x 256, 4 heads). Errors: max |out - out_fp64| over torch's own.

    python bench/mha.py [--threads 2] [--rounds 5] [--dtype fp32,bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from unittest import mock

import torch
import torch.nn.functional as F

from fastarch.bench import report
from fastarch.bench.timing import measure, speedup
from fastarch.nn import MultiheadAttention

SHAPES = [(4, 197, 768, 12), (1, 77, 512, 8), (8, 64, 256, 4)]  # (batch, length, embed, heads)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="fp32,bf16")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    machine = report.cpu_script_machine(a.threads)
    print(f"{'shape':<18} {'dtype':<5} {'ours ms':>8} {'ours, F.linear':>14} {'torch ms':>8} {'vs torch':>8}"
          f" {'vs F.linear':>11} {'err / torch':>11}")
    rows = []
    for name in a.dtype.split(","):
        dtype = DTYPES[name]
        for n, length, embed, heads in SHAPES:
            torch.manual_seed(n + length + embed)
            theirs = torch.nn.MultiheadAttention(embed, heads, batch_first=True).eval()
            ours = MultiheadAttention.from_torch(theirs)
            theirs.to(dtype)
            x = torch.randn(n, length, embed).to(dtype)

            def run_ours():
                return ours(x, x, x, need_weights=False)[0]

            def run_ours_torch_proj():
                with mock.patch("fastarch.nn.attention.linear", F.linear):
                    return ours(x, x, x, need_weights=False)[0]

            def run_torch():
                return theirs(x, x, x, need_weights=False)[0]

            with torch.no_grad():
                exact = theirs.double()(x.double(), x.double(), x.double(), need_weights=False)[0]
                theirs.to(dtype)
                err = {k: (fn().double() - exact).abs().max().item()
                       for k, fn in (("ours", run_ours), ("torch", run_torch))}
                times, errors = measure({"ours": run_ours, "ours_torch_proj": run_ours_torch_proj, "torch": run_torch},
                                        "cpu", a.rounds, memory=False)
            if errors:
                print(n, length, embed, heads, name, errors)
                continue
            row = {"shape": [n, length, embed, heads], "dtype": name,
                   **{f"{k}_ms": t.seconds * 1e3 for k, t in times.items()},
                   "vs_torch": speedup(times["torch"], times["ours"]),
                   "vs_torch_proj": speedup(times["ours_torch_proj"], times["ours"]), "max_err": err}
            rows.append(row)
            print(f"{f'{n}x{length}x{embed}/{heads}':<18} {name:<5} {row['ours_ms']:>8.2f} {row['ours_torch_proj_ms']:>14.2f}"
                  f" {row['torch_ms']:>8.2f} {row['vs_torch']:>7.2f}x {row['vs_torch_proj']:>10.2f}x"
                  f" {err['ours'] / err['torch']:>11.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
