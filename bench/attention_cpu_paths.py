"""The CPU bf16 attention forward's two AVX-512 paths side by side with torch SDPA, in one run
of interleaved rounds (fastarch.bench.timing.measure): the brgemm kernel
(attention_fwd_brgemm.cpp: AMX tiles on an AMX CPU, oneDNN's AVX-512 code elsewhere), the
vdpbf16ps register tiles (attention_fwd_avx512.cpp), and F.scaled_dot_product_attention
(torch's CPU flash attention). Names the CPU and the path each row ran.

    python bench/attention_cpu_paths.py [--threads 2] [--rounds 7] [--shapes 1x12x4096x64,1x12x1024x64]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fastarch import _extension, ops
from fastarch.bench.report import _cpu_model as cpu_model
from fastarch.bench.timing import measure, speedup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", default="1x12x4096x64,1x12x1024x64")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    _C = _extension._C
    info = _C.build_info()
    print(f"CPU: {cpu_model()}; {a.threads} threads; torch {torch.__version__}; level {info['cpu_isa']};"
          f" AMX: {'yes' if info['cpu_has_amx'] else info['cpu_amx_missing']}")

    def ours(brgemm: str, q, k, v, causal):
        def call():
            _C._set_cpu_brgemm(brgemm)
            return ops.attention(q, k, v, causal=causal, backend="cpu")
        return call

    print(f"{'shape':<16} {'causal':<6} {'brgemm ms':>10} {'tiles ms':>9} {'sdpa ms':>8} {'brgemm/tiles':>12}"
          f" {'brgemm/sdpa':>11} {'tiles/sdpa':>10} {'brgemm GFLOP/s':>14}")
    for shape in a.shapes.split(","):
        B, H, S, D = map(int, shape.split("x"))
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, S, D, generator=g).to(torch.bfloat16) for _ in range(3))
        for causal in (False, True):
            contenders = {
                "brgemm": ours("on", q, k, v, causal),
                "tiles": ours("off", q, k, v, causal),
                "sdpa": lambda causal=causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            }
            times, errors = measure(contenders, "cpu", a.rounds, memory=False)
            _C._set_cpu_brgemm("auto")
            if errors:
                print(shape, causal, errors)
                continue
            flops = 4 * B * H * S * S * D / (2 if causal else 1)
            t = {n: times[n].seconds * 1e3 for n in times}
            print(f"{shape:<16} {str(causal):<6} {t['brgemm']:>10.1f} {t['tiles']:>9.1f} {t['sdpa']:>8.1f}"
                  f" {speedup(times['tiles'], times['brgemm']):>11.2f}x {speedup(times['sdpa'], times['brgemm']):>10.2f}x"
                  f" {speedup(times['sdpa'], times['tiles']):>9.2f}x {flops / times['brgemm'].seconds / 1e9:>14.0f}")


if __name__ == "__main__":
    main()
