"""Where the time of a small model goes on a GPU, ours against the unmodified model: for the
drop-in workloads that are launch-bound there (MiniLM's encode and the DDPM UNet's step, both
slower after fastarch.optimize on the H200 of 2026-12-04), one profiled call of each side (the
ops by their host time, and by their GPU time) and every host-device synchronization of ours
with the line of Python that asked for it.

    python bench/gpu_diagnose.py [--workload minilm,unet] [--rows 25] [--json out.json]

For the UNet it also times both sides under ``torch.compile(mode="reduce-overhead")`` (CUDA
graphs over the whole step, where no call pays its host time): the comparison of the kernels
alone, and what a user who compiles gets.

Random weights (fastarch/bench/dropin.py's models), so it runs on a machine without the weight
packages; needs a CUDA device (and diffusers for the UNet).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

import fastarch
from fastarch.bench import dropin


def _wall_ms(call, model, repeats: int = 10) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        call(model)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def _profile(call, model, rows: int, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call(model)
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(f"\n-- {label}: the ops by their host time (self CPU), one call", flush=True)
    print(table.table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)
    print(f"-- {label}: by their GPU time", flush=True)
    print(table.table(sort_by="self_cuda_time_total", row_limit=rows // 2), flush=True)


def _syncs(call, model) -> int:
    """Every synchronizing CUDA call of one call of the model, by the Python line that made it."""
    where: collections.Counter[str] = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call(model)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where[f"{w.filename}:{w.lineno}"] += 1
    print(f"-- synchronizations: {sum(where.values())}", flush=True)
    for line, n in where.most_common(15):
        print(f"   {n:4d}  {line}", flush=True)
    return sum(where.values())


def _compiled(call, model, fast) -> dict:
    """Both sides under torch.compile(mode="reduce-overhead"): wall ms per call, or the error."""
    times = {}
    for label, m in (("torch_compiled_ms", model), ("fastarch_compiled_ms", fast)):
        try:
            torch._dynamo.reset()
            compiled = torch.compile(m, mode="reduce-overhead")
            with torch.inference_mode():
                for _ in range(3):  # compile, record the graphs, replay
                    call(compiled)
                times[label] = _wall_ms(call, compiled)
        except Exception as e:  # a graph break under fullgraph, a capture that fails, ...
            times[label] = f"{type(e).__name__}: {str(e)[:300]}"
    print(f"compiled (reduce-overhead) wall ms per call: torch {times['torch_compiled_ms']},"
          f" fastarch {times['fastarch_compiled_ms']}", flush=True)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="minilm,unet")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--json", help="also save each workload's wall times and synchronizations")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; fastarch {fastarch.__version__}", flush=True)
    machine = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d", time.gmtime())}
    rows = []
    for name in args.workload.split(","):
        with tempfile.TemporaryDirectory(prefix="fastarch-diagnose-") as tmp:
            model, call, what = dropin.WORKLOADS[name]("cuda", True, Path(tmp))
        report = fastarch.optimize(model, inplace=False)
        fast = report.model
        print(f"\n==== {name} ({what}): {len(report.swapped)} modules swapped", flush=True)
        with torch.inference_mode():
            for m in (model, fast, model, fast):  # warm: compiles, autotuning, cuDNN's choices
                call(m)
            theirs, ours = _wall_ms(call, model), _wall_ms(call, fast)
            print(f"wall ms per call: torch {theirs:.2f}, fastarch {ours:.2f}", flush=True)
            rows.append({"workload": name, "input": what, "torch_ms": theirs, "fastarch_ms": ours,
                         "synchronizations": _syncs(call, fast)})
            _profile(call, fast, args.rows, f"{name} fastarch")
            _profile(call, model, args.rows // 2, f"{name} torch")
        if name == "unet":
            rows[-1].update(_compiled(call, model, fast))
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
