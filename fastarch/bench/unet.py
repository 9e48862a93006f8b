"""``fastarch bench --model unet``: the diffusion UNet at google/ddpm-cifar10-32's configuration
(~36M parameters, random weights, seed 0), ours against diffusers' UNet2DModel (its default
attention processor) on the same weights, side by side in interleaved rounds:

- "forward": one denoising step, batch 4, 32x32, per dtype (fp32, bf16);
- "graph" (on a GPU): the same step as the sampler runs it there, a CUDA graph's replay
  (fastarch.cuda_graphs.GraphedCall), against diffusers' eager step;
- "ddim": a whole DDIM sample (50 steps; 5 with --quick), batch 1, fp32: our
  fastarch.models.schedulers.sample against DDIMPipeline's loop (diffusers' DDIMScheduler).

--device cuda times the same on a GPU.

Each row also gives the largest difference of our output from diffusers' (relative to its
scale), so a fast wrong answer shows. For the "ddim" row that difference is not a correctness
measure: with random weights the 50-step trajectory amplifies rounding chaotically (diffusers'
own fp32 sample differs from its fp64 one by ~5% of the scale, ours by ~20%, on seed 0, while
one forward agrees to 2e-6).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastarch.bench import report, timing

# google/ddpm-cifar10-32's config.json (attention at 16x16 in the second down / third up stage)
CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256], layers_per_block=2,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], attention_head_dim=None,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
    act_fn="silu", center_input_sample=False, mid_block_scale_factor=1, time_embedding_type="positional",
)
FORWARD_BATCH = 4
SAMPLE_BATCH = 1
DDIM_STEPS = 50
QUICK_DDIM_STEPS = 5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class UNetRow:
    case: str  # "forward", "graph" (CUDA) or "ddim"
    batch: int
    steps: int  # model calls per timed call
    dtype: str
    ours_ms: float | None
    diffusers_ms: float | None
    vs: float | None  # diffusers / ours: how many times faster ours is (median of per-round ratios)
    rel_diff: float | None  # max |ours - diffusers| / max |diffusers|
    errors: dict


def run(args: argparse.Namespace) -> int:
    """Times the rows; 0 when ours was timed in every row."""
    import diffusers

    from fastarch.models.schedulers import DDIMScheduler, sample
    from fastarch.models.unet2d import UNet2D

    device = report.bench_device(args.device, "fastarch bench --model unet")
    if device is None:
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    info = report.machine(device, timing.copy_bandwidth(device))
    rounds = args.rounds or (2 if args.quick else 5)
    steps = QUICK_DDIM_STEPS if args.quick else DDIM_STEPS
    print(f"fastarch bench --model unet on {report.where(info)}; torch {info['torch']}, diffusers {diffusers.__version__};"
          f" load average {info['load_average']}")
    print("UNet2DModel at google/ddpm-cifar10-32's configuration, random weights; ms per call, vs = diffusers / ours"
          " (the median of the per-round ratios)")
    rows: list[UNetRow] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastarch-bench-unet-") as tmp:
        torch.manual_seed(0)
        diffusers.UNet2DModel(**CONFIG).save_pretrained(tmp)
        size = CONFIG["sample_size"]
        for dtype_name in args.dtype or list(DTYPES):
            dtype = DTYPES.get(dtype_name)
            if dtype is None:
                continue
            ours = UNet2D.from_pretrained(tmp, dtype=dtype, device=device)
            theirs = diffusers.UNet2DModel.from_pretrained(tmp, torch_dtype=dtype).to(device).eval()
            g = torch.Generator().manual_seed(1)
            x = torch.randn(FORWARD_BATCH, 3, size, size, generator=g).to(device, dtype)
            t = torch.randint(0, 1000, (FORWARD_BATCH,), generator=g).to(device)
            out = {}
            contenders = {
                "ours": _keeping(out, "ours", lambda m=ours, x=x, t=t: m(x, t)),
                "diffusers": _keeping(out, "diffusers", lambda m=theirs, x=x, t=t: m(x, t).sample),
            }
            rows.append(_timed("forward", FORWARD_BATCH, 1, dtype_name, contenders, out, rounds, device))
            print(_line(rows[-1]), flush=True)
            if device == "cuda":  # the same step as the sampler runs it on a GPU: a CUDA graph's replay
                rows.append(_graphed_step(ours, theirs, x, t, dtype_name, rounds, device))
                print(_line(rows[-1]), flush=True)
            if dtype == torch.float32:
                shape = (SAMPLE_BATCH, 3, size, size)
                out = {}
                contenders = {
                    "ours": _keeping(out, "ours", lambda m=ours, shape=shape: sample(
                        m, DDIMScheduler(), shape, num_inference_steps=steps, seed=0, progress=False)),
                    "diffusers": _keeping(out, "diffusers", lambda m=theirs, shape=shape: _diffusers_ddim(m, shape, steps, seed=0)),
                }
                rows.append(_timed("ddim", SAMPLE_BATCH, steps, dtype_name, contenders, out, max(1, rounds // 2), device))
                print(_line(rows[-1]), flush=True)
            if args.json:
                _write(args.json, info, rows)
    print(f"\n{len(rows)} rows in {time.perf_counter() - start:.0f} s")
    if args.json:
        _write(args.json, info, rows)
        print(f"saved {args.json}")
    return 0 if rows and all(r.ours_ms for r in rows) else 1


def _graphed_step(ours, theirs, x, t, dtype_name: str, rounds: int, device: str) -> UNetRow:
    """"graph": our step as fastarch.models.schedulers.sample runs it on a GPU (GraphedCall: the
    inputs copied into the captured graph, one replay) against diffusers' eager step."""
    from fastarch.cuda_graphs import GraphedCall

    denoiser = GraphedCall(ours, ours, "the graph row")
    with torch.no_grad():
        for _ in range(3):  # eager, the warm-up and the capture, the checked first replay
            denoiser(x, t)
    if not denoiser.kept:
        why = "; ".join(denoiser.refused.values()) or "no capture (not on a GPU, or FASTARCH_CUDA_GRAPHS=0)"
        return UNetRow("graph", FORWARD_BATCH, 1, dtype_name, None, None, None, None,
                       {"ours": f"the graph was not kept: {why}"})
    out = {}
    contenders = {
        "ours": _keeping(out, "ours", lambda: denoiser(x, t)),
        "diffusers": _keeping(out, "diffusers", lambda m=theirs: m(x, t).sample),
    }
    return _timed("graph", FORWARD_BATCH, 1, dtype_name, contenders, out, rounds, device)


@torch.no_grad()
def _diffusers_ddim(unet, shape, steps: int, seed: int) -> torch.Tensor:
    """DDIMPipeline's loop (eta 0), without its final [0, 1] mapping."""
    import diffusers

    scheduler = diffusers.DDIMScheduler()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=unet.dtype).to(unet.device)  # (drawn on the CPU, as sample's)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x, eta=0.0, generator=g).prev_sample
    return x


def _keeping(outputs: dict, name: str, fn):
    def call() -> None:
        with torch.no_grad():
            outputs[name] = fn()

    return call


def _timed(
    case: str, batch: int, steps: int, dtype: str, contenders: dict, outputs: dict, rounds: int, device: str
) -> UNetRow:
    times, errors = timing.measure(contenders, device, rounds, warmup=1, memory=False)
    ms = {name: t.seconds * 1e3 for name, t in times.items()}
    vs = timing.speedup(times["diffusers"], times["ours"]) if len(times) == 2 else None
    diff = None
    if "ours" in outputs and "diffusers" in outputs:
        a, b = outputs["ours"].double(), outputs["diffusers"].double()
        diff = ((a - b).abs().max() / b.abs().max()).item()
    return UNetRow(case, batch, steps, dtype, ms.get("ours"), ms.get("diffusers"), vs, diff, errors)


def _line(r: UNetRow) -> str:
    what = f"{r.case:<8} batch {r.batch}  {r.steps:>2} step{'s' if r.steps > 1 else ' '}  {r.dtype:<5}"
    ours = f"ours {r.ours_ms:9.1f} ms" if r.ours_ms else "ours    failed"
    theirs = f"diffusers {r.diffusers_ms:9.1f} ms" if r.diffusers_ms else "diffusers failed"
    vs = f"({r.vs:.2f}x)" if r.vs else ""
    diff = f"max rel diff {r.rel_diff:.1e}" if r.rel_diff is not None else ""
    note = "; ".join(f"{k}: {v}" for k, v in r.errors.items() if v)
    return "  ".join(c for c in (what, ours, theirs, vs, diff) if c) + (f"  [{note[:160]}]" if note else "")


def _write(path: Path, info: dict, rows: list[UNetRow]) -> None:
    from datetime import datetime, timezone

    doc = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": info, "config": CONFIG,
           "rows": [asdict(r) for r in rows]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
