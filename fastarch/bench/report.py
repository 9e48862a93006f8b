"""What ``fastarch bench`` reports: one ``Row`` per (op, shape, dtype, pass, backend), printed as
a table and saved, with a description of the machine, as JSON."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import fastarch
from fastarch import _extension
from fastarch.bench.timing import Timing, speedup

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


@dataclass
class Row:
    """Ours with one backend against eager and torch.compile; times in µs per iteration."""

    op: str
    shape: str  # "4096x768"
    dtype: str  # "fp32"
    pass_: str  # "fwd" or "fwd+bwd"
    backend: str  # as requested: "auto" or a backend name
    ran: str  # the backend that ran ours ("auto": the registry's choice); "" when none could
    ours_us: float | None
    eager_us: float | None
    compile_us: float | None  # None when it failed or was not asked for
    speedup_vs_eager: float | None  # eager time / our time
    speedup_vs_compile: float | None
    bytes: int  # the minimum traffic of one iteration (see the op family's Case.bytes_moved)
    gbps: float | None  # bytes / our time
    copy_fraction: float | None  # gbps / the measured copy bandwidth
    spread: float  # the largest of the three's interquartile range of rounds / median (CPU)
    errors: dict[str, str]  # "ours", "eager", "compile" (or "inputs") -> what went wrong

    @classmethod
    def of(cls, case, backend: str, times: dict[str, Timing], errors: dict[str, str], copy_gbps: float) -> Row:
        """The row of ``case`` (an op family's Case) for ``ours:<backend>``, from ``measure``'s
        times and errors."""
        names = (f"ours:{backend}", "eager", "compile")
        ours, eager, compiled = (times[n].seconds if n in times else None for n in names)
        ours_t = times.get(names[0])
        gbps = case.bytes_moved / ours / 1e9 if ours else None
        why = {"ours" if k == f"ours:{backend}" else k: v for k, v in errors.items()}
        return cls(
            op=case.op,
            shape="x".join(map(str, case.shape)),
            dtype=DTYPE_NAMES.get(case.dtype, str(case.dtype)),
            pass_="fwd+bwd" if case.backward else "fwd",
            backend=backend,
            ran=case.backend_that_runs(backend),
            ours_us=ours * 1e6 if ours else None,
            eager_us=eager * 1e6 if eager else None,
            compile_us=compiled * 1e6 if compiled else None,
            speedup_vs_eager=speedup(times["eager"], ours_t) if ours and eager else None,
            speedup_vs_compile=speedup(times["compile"], ours_t) if ours and compiled else None,
            bytes=case.bytes_moved,
            gbps=gbps,
            copy_fraction=gbps / copy_gbps if gbps else None,
            spread=max((times[n].spread for n in names if n in times), default=0.0),
            errors={k: v for k, v in why.items() if not k.startswith("ours:")},
        )

    def to_json(self) -> dict:
        return {("pass" if k == "pass_" else k): v for k, v in asdict(self).items()}


# (header, width, how a row shows it); numbers are right-aligned
_COLUMNS = [
    ("op", -15, lambda r: r.op),
    ("shape", -11, lambda r: r.shape),
    ("dtype", -5, lambda r: r.dtype),
    ("pass", -7, lambda r: r.pass_),
    ("backend", -13, lambda r: f"{r.ran or '-'} (auto)" if r.backend == "auto" else r.backend),
    ("ours us", 9, lambda r: _us(r.ours_us)),
    ("eager us", 9, lambda r: _us(r.eager_us)),
    ("compile us", 10, lambda r: _us(r.compile_us)),
    ("vs eager", 8, lambda r: _ratio(r.speedup_vs_eager)),
    ("vs compile", 10, lambda r: _ratio(r.speedup_vs_compile)),
    ("GB/s", 6, lambda r: f"{r.gbps:.1f}" if r.gbps else "-"),
    ("of copy", 7, lambda r: f"{r.copy_fraction:.0%}" if r.copy_fraction else "-"),
]
_NOTE_CHARS = 110
NOISY_SPREAD = 0.2  # rows whose rounds spread more than this get a note


def _us(t: float | None) -> str:
    return "-" if t is None else f"{t:.1f}" if t < 1000 else f"{t:.0f}"


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _line(cells: list[str]) -> str:
    return "  ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, (_, w, _) in zip(cells, _COLUMNS)).rstrip()


def table_header() -> str:
    return _line([name for name, _, _ in _COLUMNS]) + "  note"


def table_row(row: Row) -> str:
    """The row as the table shows it; errors go in a last column, one line each, shortened."""
    notes = [f"{who}: {why.splitlines()[0] if why else ''}" for who, why in row.errors.items()]
    if row.spread > NOISY_SPREAD:
        notes.insert(0, f"noisy (rounds spread {row.spread:.0%})")
    note = "; ".join(notes)
    if len(note) > _NOTE_CHARS:
        note = note[: _NOTE_CHARS - 3] + "..."
    return (_line([show(row) for _, _, show in _COLUMNS]) + "  " + note).rstrip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def machine(device: str, copy_gbps: float) -> dict:
    """The machine and software the numbers come from."""
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
    }


def preamble(info: dict, rounds: int) -> str:
    """The lines above the table: where the numbers come from and how to read them."""
    threads = info["torch_threads"]
    where = f"GPU {info['gpu']}" if info["gpu"] else f"CPU {info['cpu']}, {threads} thread{'s' * (threads != 1)}"
    how = (
        "median of triton.testing.do_bench"
        if info["gpu"]
        else f"median of {rounds} interleaved rounds of ~30 ms batches, per iteration"
    )
    return "\n".join(
        [
            f"fastarch {info['fastarch']} bench on {where}; torch {info['torch']}, triton {info['triton']}",
            f"copy bandwidth {info['copy_bandwidth_gbps']:.1f} GB/s (a large dst.copy_(src), bytes read + written)",
            f"times: {how}; vs = their time / ours"
            + ("" if info["gpu"] else " (the median of the ratios within each round)")
            + "; GB/s = minimum bytes moved / our time",
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
