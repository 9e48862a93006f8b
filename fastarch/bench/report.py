"""What ``fastarch bench`` reports: one ``Row`` per (op, shape, dtype, pass, backend), printed as
a table and saved, with a description of the machine, as JSON."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import fastarch
from fastarch import _extension, availability
from fastarch.bench.timing import Timing, speedup

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


@dataclass
class Row:
    """Ours with one backend against the op family's baselines (for the norms: PyTorch eager
    and torch.compile); times in µs per iteration."""

    op: str
    shape: str  # "4096x768"
    dtype: str  # "fp32"
    pass_: str  # "fwd" or "fwd+bwd"
    backend: str  # as requested: "auto" or a backend name
    ran: str  # the backend that ran ours ("auto": the registry's choice); "" when none could
    ours_us: float | None
    baseline_us: dict[str, float | None]  # baseline name -> its time (None: failed or not asked for)
    speedup: dict[str, float | None]  # baseline name -> its time / ours
    work: float  # one iteration's minimum bytes moved (unit GB/s) or FLOPs (unit TFLOP/s)
    unit: str  # "GB/s" or "TFLOP/s"
    rate: float | None  # work / our time, in unit
    peak_fraction: float | None  # rate / the machine's measured copy bandwidth or matmul rate
    spread: float  # the largest interquartile range of rounds / median among the contenders (CPU)
    peak_mb: dict[str, float | None]  # "ours", a baseline's name -> timing.peak_memory of one call, MB
    errors: dict[str, str]  # "ours", a baseline's name (or "inputs") -> what went wrong

    @classmethod
    def of(cls, case, backend: str, times: dict[str, Timing], errors: dict[str, str], peak: float | None) -> Row:
        """The row of ``case`` (an op family's Case) for ``ours:<backend>``, from ``measure``'s
        times and errors; ``peak``: the machine's rate in the case's unit."""
        mine = f"ours:{backend}"
        ours_t = times.get(mine)
        ours = ours_t.seconds if ours_t else None
        names = case.baseline_names
        baseline_us = {n: times[n].seconds * 1e6 if n in times else None for n in names}
        scale = 1e9 if case.unit == "GB/s" else 1e12
        rate = case.work / ours / scale if ours else None
        why = {"ours" if k == mine else k: v for k, v in errors.items()}
        return cls(
            op=case.op,
            shape="x".join(map(str, case.shape)),
            dtype=DTYPE_NAMES.get(case.dtype, str(case.dtype)),
            pass_="fwd+bwd" if case.backward else "fwd",
            backend=backend,
            ran=_path(case.backend_that_runs(backend), case),
            ours_us=ours * 1e6 if ours else None,
            baseline_us=baseline_us,
            speedup={n: speedup(times[n], ours_t) if ours_t and n in times else None for n in names},
            work=case.work,
            unit=case.unit,
            rate=rate,
            peak_fraction=rate / peak if rate and peak else None,
            spread=max((times[n].spread for n in (mine, *names) if n in times), default=0.0),
            peak_mb={("ours" if n == mine else n): _mb(times[n].peak_bytes) if n in times else None
                     for n in (mine, *names)},
            errors={k: v for k, v in why.items() if not k.startswith("ours:")},
        )

    def to_json(self) -> dict:
        return {("pass" if k == "pass_" else k): v for k, v in asdict(self).items()}


_NOTE_CHARS = 110
NOISY_SPREAD = 0.2  # rows whose rounds spread more than this get a note


def _path(ran: str, case) -> str:
    """The backend that ran, the CPU one with its instruction-set path (cpu/amx, cpu/avx512_bf16, ...)."""
    return _extension.cpu_path(case.op, case.dtype) if ran == "cpu" else ran


def _mb(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / 1e6


def _us(t: float | None) -> str:
    return "-" if t is None else f"{t:.1f}" if t < 1000 else f"{t:.0f}"


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _columns(baselines: tuple[str, ...], unit: str) -> list:
    """(header, width, how a row shows it); negative widths are left-aligned."""
    cols = [
        ("op", -16, lambda r: r.op),
        ("shape", -14, lambda r: r.shape),
        ("dtype", -5, lambda r: r.dtype),
        ("pass", -7, lambda r: r.pass_),
        ("backend", -22, lambda r: f"{r.ran or '-'} (auto)" if r.backend == "auto" else r.ran or r.backend),
        ("ours us", 9, lambda r: _us(r.ours_us)),
    ]
    for name in baselines:
        cols.append((f"{name} us", max(9, len(name) + 3), lambda r, n=name: _us(r.baseline_us.get(n))))
    for name in baselines:
        cols.append((f"vs {name}", max(8, len(name) + 3), lambda r, n=name: _ratio(r.speedup.get(n))))
    cols.append((unit, 7, lambda r: f"{r.rate:.1f}" if r.rate else "-"))
    cols.append(("of peak", 7, lambda r: f"{r.peak_fraction:.0%}" if r.peak_fraction else "-"))
    if unit == "TFLOP/s":  # attention: the memory a call holds, which grows as S^2 for the math path
        for name in ("ours", *baselines):
            cols.append((f"{name} MB", max(8, len(name) + 3), lambda r, n=name: _megabytes(r.peak_mb.get(n))))
    return cols


def _megabytes(mb: float | None) -> str:
    return "-" if mb is None else f"{mb:.0f}"


def _line(cells: list[str], cols: list) -> str:
    return "  ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, (_, w, _) in zip(cells, cols)).rstrip()


def table_header(baselines: tuple[str, ...], unit: str) -> str:
    cols = _columns(baselines, unit)
    return _line([name for name, _, _ in cols], cols) + "  note"


def table_row(row: Row) -> str:
    """The row as the table shows it; errors go in a last column, one line each, shortened."""
    cols = _columns(tuple(row.baseline_us), row.unit)
    notes = [f"{who}: {why.splitlines()[0] if why else ''}" for who, why in row.errors.items()]
    if row.spread > NOISY_SPREAD:
        notes.insert(0, f"noisy (rounds spread {row.spread:.0%})")
    note = "; ".join(notes)
    if len(note) > _NOTE_CHARS:
        note = note[: _NOTE_CHARS - 3] + "..."
    return (_line([show(row) for _, _, show in cols], cols) + "  " + note).rstrip()


_cpu_model = availability.cpu_name


def cpu_script_machine(threads: int) -> dict:
    """The machine of a bench/*.py CPU script (its JSON's "machine": the CPU, threads, torch,
    the CPU kernels' path, the date), printed as the script's first line."""
    machine = {"cpu": _cpu_model(), "threads": threads, "torch": torch.__version__, "path": _extension.cpu_path(),
               "date": time.strftime("%Y-%m-%d")}
    print(f"CPU: {machine['cpu']}; {threads} threads; {machine['path']}; torch {torch.__version__}")
    return machine


def _physical_cores() -> int | None:
    """Distinct (socket, core) pairs in /proc/cpuinfo; None where that is not available."""
    try:
        cores, socket = set(), None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (s.strip() for s in line.partition(":"))
            if key == "physical id":
                socket = value
            elif key == "core id":
                cores.add((socket, value))
        return len(cores) or None
    except OSError:
        return None


def machine(device: str, copy_gbps: float, matmul_tflops: dict[str, float] | None = None) -> dict:
    """The machine and software the numbers come from, with its measured peaks."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device,
        "cpu": _cpu_model(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "physical_cores": _physical_cores(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,  # others' work skews CPU times
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "fastarch": fastarch.__version__,
        "fastarch_C": _extension.build_info() or {"load_error": _extension.LOAD_ERROR},
        "copy_bandwidth_gbps": copy_gbps,
        "matmul_tflops": matmul_tflops or {},
        # what restricts either side's instruction set (e.g. PyTorch to AVX2, to compare with
        # fastarch's avx2 level as on an x86 CPU without AVX-512), when set
        "isa_environment": {k: os.environ[k] for k in ISA_ENVIRONMENT if os.environ.get(k)},
    }


# The environment variables that pick an instruction set: fastarch's, ATen's kernels',
# oneDNN's and MKL's.
ISA_ENVIRONMENT = ("FASTARCH_CPU_ISA", "FASTARCH_CPU_BRGEMM", "FASTARCH_CPU_INT8", "ATEN_CPU_CAPABILITY",
                   "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


INPUTS = {
    "cold": "cold (memory-bound cases rotate input sets twice the last-level cache: each call reads from memory)",
    "warm": "warm (--cache warm: the same inputs every call, in cache as the op before left them)",
}


def bench_device(requested: str | None, who: str) -> str | None:
    """--device's answer: requested, else cuda where a GPU is visible, else cpu; None, with the
    reason on stderr, when cuda is asked for and none is visible."""
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print(f"{who}: --device cuda, but no CUDA device is visible", file=sys.stderr)
        return None
    return device


def where(info: dict) -> str:
    """The machine of ``machine()``'s info in a few words: the GPU, or the CPU and its threads."""
    threads = info["torch_threads"]
    return f"GPU {info['gpu']}" if info["gpu"] else f"CPU {info['cpu']}, {threads} thread{'s' * (threads != 1)}"


def preamble(info: dict, rounds: int) -> str:
    """The lines above the table: where the numbers come from and how to read them."""
    if info.get("cuda_graphs"):
        how = ("median of 7 interleaved rounds of ~30 ms batches, each batch one CUDA graph replay (CUDA events):"
               " the GPU's time alone, no host time, per iteration")
    elif info["gpu"]:
        how = "median of 7 interleaved rounds of ~30 ms back-to-back batches (CUDA events), per iteration"
    else:
        how = f"median of {rounds} interleaved rounds of ~30 ms batches, per iteration"
    return "\n".join(
        [
            f"fastarch {info['fastarch']} bench on {where(info)}; torch {info['torch']}, triton {info['triton']}",
            f"copy bandwidth {info['copy_bandwidth_gbps']:.1f} GB/s (a large dst.copy_(src), bytes read + written)"
            + "".join(f"; {d} matmul {t:.2f} TFLOP/s" for d, t in info.get("matmul_tflops", {}).items()),
            f"times: {how}; vs = their time / ours"
            + ("" if info["gpu"] else " (the median of the ratios within each round)")
            + "; GB/s = minimum bytes moved, TFLOP/s = FLOPs, over our time; of peak: of the copy or matmul rate",
            *([f"inputs: {INPUTS[info['inputs']]}"] if info.get("inputs") in INPUTS else []),
            *(["instruction sets: " + ", ".join(f"{k}={v}" for k, v in info["isa_environment"].items())]
              if info.get("isa_environment") else []),
            "MB (attention): the memory one call holds beyond its inputs at its peak"
            + (" (CUDA allocator)" if info["gpu"] else " (resident-set growth, malloc's free pages handed back first)"),
            *(["malloc keeps freed memory (mallopt), so no contender page-faults its outputs in anew each call"]
              if info.get("steady_cpu_allocator") else []),
            "",
        ]
    )


def write_json(path: Path, info: dict, arguments: dict, rows: list[Row]) -> None:
    """Saves the date, the machine (with its copy bandwidth), the arguments and every row."""
    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "arguments": arguments,
        "rows": [r.to_json() for r in rows],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
