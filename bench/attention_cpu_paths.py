"""The CPU attention's two AVX-512 paths side by side with torch SDPA, in one run of
interleaved rounds (fastarch.bench.timing.measure), forward and forward+backward, bf16 (and
fp32, fp16 with --dtype): the brgemm products (csrc/cpu/attn/brgemm.h: bf16 on the AMX tiles
on an AMX CPU, oneDNN's AVX-512 code elsewhere and for fp32), our register tiles
(vdpbf16ps or FMA: attention_fwd_avx512.cpp, attention_bwd_avx512.cpp), and
F.scaled_dot_product_attention (torch's CPU flash attention, on the AMX tiles where the CPU has
them). Names the CPU and its level. --blocks adds brgemm contenders of other block sizes
(brgemm.h's BrgemmBlocks, set before each of their calls), each row then giving their time
against the default sizes', so that one run on an AMX CPU says which sizes to keep.

    python bench/attention_cpu_paths.py [--threads 2] [--rounds 7] [--pass fwd,fwdbwd] [--dtype bf16,fp32]
        [--shapes 1x12x4096x64,1x12x1024x64] [--blocks 64x256/64x128,...] [--json out.json]
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
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def parse_blocks(spec: str) -> tuple[int, int, int, int]:
    """"FWDMxFWDN/BWDQxBWDK" (e.g. 128x256/64x64) -> (fwd_m, fwd_n, bwd_q, bwd_k)."""
    try:
        fwd, bwd = spec.split("/")
        sizes = tuple(int(x) for x in fwd.split("x") + bwd.split("x"))
    except ValueError:
        sizes = ()
    if len(sizes) != 4:
        raise SystemExit(f"--blocks: expected FWDMxFWDN/BWDQxBWDK such as 128x256/64x64, got {spec!r}")
    return sizes


def contenders(q, k, v, dout, causal: bool, backward: bool, blocks: dict) -> dict:
    """Ours through brgemm at the default block sizes and at each of ``blocks`` ({name: sizes}),
    on the register tiles, and SDPA."""
    _C = _extension._C
    default = blocks["brgemm"]

    def run(attention):
        if not backward:
            return attention()
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        attention(*leaves).backward(dout)
        return leaves[0].grad

    def ours(mode: str, sizes: tuple[int, ...]):
        def call(*qkv):
            _C._set_cpu_brgemm(mode)
            _C._set_cpu_brgemm_blocks(*sizes)
            return ops.attention(*(qkv or (q, k, v)), causal=causal, backend="cpu")
        return lambda: run(call)

    def sdpa(*qkv):
        return F.scaled_dot_product_attention(*(qkv or (q, k, v)), is_causal=causal)

    return {**{name: ours(mode, default) for name, mode in PATHS.items()},
            **{name: ours("on", sizes) for name, sizes in blocks.items() if name != "brgemm"},
            "sdpa": lambda: run(sdpa)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", default="1x12x4096x64,1x12x1024x64")
    ap.add_argument("--pass", dest="passes", default="fwd,fwdbwd", help="fwd, fwdbwd or both (comma-separated)")
    ap.add_argument("--dtype", default="bf16", help="bf16, fp32, fp16 (comma-separated)")
    ap.add_argument("--blocks", default="", help="more brgemm block sizes to time, FWDMxFWDN/BWDQxBWDK (comma-separated)")
    ap.add_argument("--json", help="also save the rows here, with the CPU and versions")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    _C = _extension._C
    info = _C.build_info()
    default = _C._cpu_brgemm_blocks()
    blocks = {"brgemm": default}
    for spec in filter(None, a.blocks.split(",")):
        sizes = parse_blocks(spec)
        try:
            _C._set_cpu_brgemm_blocks(*sizes)
        except ValueError as e:
            raise SystemExit(f"--blocks {spec}: {e}") from None
        blocks[f"brgemm {spec}"] = sizes
    _C._set_cpu_brgemm_blocks(*default)
    meta = {"cpu": cpu_model(), "threads": a.threads, "torch": torch.__version__, "level": info["cpu_isa"],
            "amx": "yes" if info["cpu_has_amx"] else info["cpu_amx_missing"], "date": time.strftime("%Y-%m-%d"),
            "rounds": a.rounds, "default_blocks": "{}x{}/{}x{}".format(*default)}
    _C._set_cpu_brgemm("on")
    meta["brgemm_check"] = _C.build_info()["cpu_brgemm_check"]  # (made now, if not yet)
    _C._set_cpu_brgemm(info["cpu_brgemm"])
    print(f"CPU: {meta['cpu']}; {a.threads} threads; torch {meta['torch']}; level {meta['level']}; AMX: {meta['amx']};"
          f" brgemm's check: {meta['brgemm_check']}")
    if meta["brgemm_check"] != "passed":
        print("(so the brgemm columns below ran the register tiles)")
    dtypes = a.dtype.split(",")
    if not set(dtypes) <= DTYPES.keys():
        raise SystemExit(f"--dtype: expected some of {', '.join(DTYPES)}, got {a.dtype!r}")
    print(f"{'shape':<16} {'dtype':<5} {'pass':<7} {'causal':<6} {'brgemm ms':>10} {'tiles ms':>9} {'sdpa ms':>8}"
          f" {'brgemm/tiles':>12} {'brgemm/sdpa':>11} {'tiles/sdpa':>10} {'brgemm GFLOP/s':>14}")
    rows = []
    for shape, dtype in ((shape, dtype) for shape in a.shapes.split(",") for dtype in dtypes):
        B, H, S, D = map(int, shape.split("x"))
        g = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(B, H, S, D, generator=g).to(DTYPES[dtype]) for _ in range(4))
        for pass_ in a.passes.split(","):
            for causal in (False, True):
                times, errors = measure(contenders(q, k, v, dout, causal, pass_ == "fwdbwd", blocks), "cpu",
                                        a.rounds, memory=False)
                _C._set_cpu_brgemm(info["cpu_brgemm"])  # the process's choice, as it was
                _C._set_cpu_brgemm_blocks(*default)
                if errors:
                    print(shape, dtype, pass_, causal, errors)
                    continue
                # the forward's two products, the backward's five (and the forward again)
                flops = 4 * B * H * S * S * D / (2 if causal else 1) * (3.5 if pass_ == "fwdbwd" else 1)
                ms = {n: times[n].seconds * 1e3 for n in times}
                row = {"shape": shape, "dtype": dtype, "pass": pass_, "causal": causal, **{f"{n}_ms": t for n, t in ms.items()},
                       "brgemm_vs_tiles": speedup(times["tiles"], times["brgemm"]),
                       "brgemm_vs_sdpa": speedup(times["sdpa"], times["brgemm"]),
                       "tiles_vs_sdpa": speedup(times["sdpa"], times["tiles"]),
                       "brgemm_gflops": flops / times["brgemm"].seconds / 1e9}
                rows.append(row)
                others = [name for name in blocks if name != "brgemm"]
                for name in others:  # > 1: faster than the default sizes
                    row[f"{name}_vs_default"] = speedup(times["brgemm"], times[name])
                print(f"{shape:<16} {dtype:<5} {pass_:<7} {str(causal):<6} {ms['brgemm']:>10.1f} {ms['tiles']:>9.1f}"
                      f" {ms['sdpa']:>8.1f} {row['brgemm_vs_tiles']:>11.2f}x {row['brgemm_vs_sdpa']:>10.2f}x"
                      f" {row['tiles_vs_sdpa']:>9.2f}x {row['brgemm_gflops']:>14.0f}"
                      + "".join(f"  {name}: {ms[name]:.1f} ms ({row[f'{name}_vs_default']:.2f}x)" for name in others),
                      flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"saved {a.json}")


if __name__ == "__main__":
    main()
