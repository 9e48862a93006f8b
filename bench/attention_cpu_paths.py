"""The CPU bf16 attention's two AVX-512 paths side by side with torch SDPA, in one run of
interleaved rounds (fastarch.bench.timing.measure), forward and forward+backward: the brgemm
products (csrc/cpu/attn/brgemm.h: AMX tiles on an AMX CPU, oneDNN's AVX-512 code elsewhere),
the vdpbf16ps register tiles (attention_fwd_avx512.cpp, attention_bwd_avx512.cpp), and
F.scaled_dot_product_attention (torch's CPU flash attention, on the AMX tiles where the CPU has
them). Names the CPU and its level.

    python bench/attention_cpu_paths.py [--threads 2] [--rounds 7] [--pass fwd,fwdbwd]
        [--shapes 1x12x4096x64,1x12x1024x64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from fastarch import _extension, ops
from fastarch.bench.report import _cpu_model as cpu_model
from fastarch.bench.timing import measure, speedup

PATHS = {"brgemm": "on", "tiles": "off"}  # FASTARCH_CPU_BRGEMM of each of our contenders


def contenders(q, k, v, dout, causal: bool, backward: bool) -> dict:
    _C = _extension._C

    def run(attention):
        if not backward:
            return attention()
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        attention(*leaves).backward(dout)
        return leaves[0].grad

    def ours(mode: str):
        def call(*qkv):
            _C._set_cpu_brgemm(mode)
            return ops.attention(*(qkv or (q, k, v)), causal=causal, backend="cpu")
        return lambda: run(call)

    def sdpa(*qkv):
        return F.scaled_dot_product_attention(*(qkv or (q, k, v)), is_causal=causal)

    return {**{name: ours(mode) for name, mode in PATHS.items()}, "sdpa": lambda: run(sdpa)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", default="1x12x4096x64,1x12x1024x64")
    ap.add_argument("--pass", dest="passes", default="fwd,fwdbwd", help="fwd, fwdbwd or both (comma-separated)")
    ap.add_argument("--json", help="also save the rows here, with the CPU and versions")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    _C = _extension._C
    info = _C.build_info()
    meta = {"cpu": cpu_model(), "threads": a.threads, "torch": torch.__version__, "level": info["cpu_isa"],
            "amx": "yes" if info["cpu_has_amx"] else info["cpu_amx_missing"], "date": time.strftime("%Y-%m-%d"),
            "rounds": a.rounds}
    print(f"CPU: {meta['cpu']}; {a.threads} threads; torch {meta['torch']}; level {meta['level']}; AMX: {meta['amx']}")
    print(f"{'shape':<16} {'pass':<7} {'causal':<6} {'brgemm ms':>10} {'tiles ms':>9} {'sdpa ms':>8}"
          f" {'brgemm/tiles':>12} {'brgemm/sdpa':>11} {'tiles/sdpa':>10} {'brgemm GFLOP/s':>14}")
    rows = []
    for shape in a.shapes.split(","):
        B, H, S, D = map(int, shape.split("x"))
        g = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(B, H, S, D, generator=g).to(torch.bfloat16) for _ in range(4))
        for pass_ in a.passes.split(","):
            for causal in (False, True):
                times, errors = measure(contenders(q, k, v, dout, causal, pass_ == "fwdbwd"), "cpu", a.rounds,
                                        memory=False)
                _C._set_cpu_brgemm(info["cpu_brgemm"])  # the process's choice, as it was
                if errors:
                    print(shape, pass_, causal, errors)
                    continue
                # the forward's two products, the backward's five (and the forward again)
                flops = 4 * B * H * S * S * D / (2 if causal else 1) * (3.5 if pass_ == "fwdbwd" else 1)
                ms = {n: times[n].seconds * 1e3 for n in times}
                row = {"shape": shape, "pass": pass_, "causal": causal, **{f"{n}_ms": t for n, t in ms.items()},
                       "brgemm_vs_tiles": speedup(times["tiles"], times["brgemm"]),
                       "brgemm_vs_sdpa": speedup(times["sdpa"], times["brgemm"]),
                       "tiles_vs_sdpa": speedup(times["sdpa"], times["tiles"]),
                       "brgemm_gflops": flops / times["brgemm"].seconds / 1e9}
                rows.append(row)
                print(f"{shape:<16} {pass_:<7} {str(causal):<6} {ms['brgemm']:>10.1f} {ms['tiles']:>9.1f}"
                      f" {ms['sdpa']:>8.1f} {row['brgemm_vs_tiles']:>11.2f}x {row['brgemm_vs_sdpa']:>10.2f}x"
                      f" {row['tiles_vs_sdpa']:>9.2f}x {row['brgemm_gflops']:>14.0f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"saved {a.json}")


if __name__ == "__main__":
    main()
