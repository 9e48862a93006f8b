"""How ``fastarch bench`` measures time and the machine's copy bandwidth.

A contender is a zero-argument callable that runs one iteration (it rotates through its own
input sets). ``measure`` warms every contender up (the first calls compile the torch.compile
one), then times them side by side:

- CPU: interleaved rounds. Each round runs every contender once, in turn, for a batch of
  iterations sized to take about ``TARGET_BATCH_S``; the result is the median over rounds of
  (batch time / iterations). Interleaving makes a shared machine's swings hit every contender
  alike, so the ratios hold even when the absolute times drift.
- CUDA: the same interleaved rounds, each batch timed between two CUDA events with the calls
  back to back, as a model's forward issues them: the host enqueues the next call while the
  GPU runs the last, so Python and launch overhead count only where they exceed the GPU's
  time. (``triton.testing.do_bench``, which times each call alone, also counts the host's
  time whenever it outlasts the L2 flush before the call: this project's first H200 decode
  times fit ~240 us per call plus the bytes at SDPA's rate.) Memory-bound cases rotate
  through input sets larger than the L2, as on the CPU.
- CUDA with ``set_cuda_graphs(True)`` (``fastarch bench --cuda-graphs``): each batch is captured
  once as a CUDA graph and the rounds replay it, so the times are the GPU's alone, without the
  host's: what a kernel reaches at sizes where a call is host-bound (a UNet's batch-1 maps, a
  decode step's rows), as under a captured decode step. A contender that cannot be captured (one
  that synchronizes with the host) is reported with its error; the others are still timed.
"""

from __future__ import annotations

import functools
import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

Contender = Callable[[], object]

WARMUP_CALLS = 3
TARGET_BATCH_S = 0.03
# CUDA: at most this many rounds (CUDA events time a batch precisely; the CPU's default of 15
# would double a lent GPU's time on the kernel benchmarks)
CUDA_ROUNDS = 7
DEFAULT_LLC_BYTES = 64 << 20


@dataclass(frozen=True)
class Timing:
    seconds: float  # per call: the median over rounds
    spread: float = 0.0  # the rounds' interquartile range / median; a noisy machine shows here
    rounds: tuple[float, ...] = ()  # the time per call in each round, in the order run
    peak_bytes: float | None = None  # memory one call holds at its peak beyond its inputs (see peak_memory)


def speedup(theirs: Timing, ours: Timing) -> float:
    """How many times faster ours is. On CPU, the median over rounds of the ratio within each
    round: the contenders of one round ran within a fraction of a second of each other, so a
    shared machine's swings (this one's memory bandwidth switches between states several
    times apart for seconds at a time) cancel out of each ratio. Else the ratio of medians."""
    if theirs.rounds and len(theirs.rounds) == len(ours.rounds):
        return statistics.median(t / o for t, o in zip(theirs.rounds, ours.rounds))
    return theirs.seconds / ours.seconds


def describe(e: BaseException) -> str:
    """A one-paragraph description of an error, for a table row and the JSON."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(
    contenders: dict[str, Contender], device: str, rounds: int, *, warmup: int = WARMUP_CALLS, memory: bool = True
) -> tuple[dict[str, Timing], dict[str, str]]:
    """The time per call of each contender, and the error of each one that failed. ``warmup``
    calls each first; ``memory=False`` skips the peak-memory call (for calls of seconds)."""
    errors: dict[str, str] = {}
    ready: dict[str, Contender] = {}
    for name, fn in contenders.items():
        try:
            for _ in range(warmup):
                fn()
            _synchronize(device)
            ready[name] = fn
        except Exception as e:  # a backend that cannot run, torch.compile failing, out of memory, ...
            errors[name] = describe(e)
    if not ready:
        return {}, errors
    try:
        if device == "cuda":
            times, failed = _time_cuda(ready, min(rounds, CUDA_ROUNDS), graphs=_cuda_graphs)
            errors.update(failed)
            ready = {name: fn for name, fn in ready.items() if name in times}
        else:
            times = _time_interleaved(ready, rounds)
    except Exception as e:
        return {}, {**errors, **{name: f"while timing: {describe(e)}" for name in ready}}
    if not memory:
        return times, errors
    return {name: replace(t, peak_bytes=peak_memory(ready[name], device)) for name, t in times.items()}, errors


def peak_memory(fn: Contender, device: str) -> float | None:
    """The memory one call of fn holds at its peak beyond what was held before the call, in
    bytes (None where it cannot be measured).

    CUDA: the caching allocator's peak. CPU: the growth of the process's resident set (its
    high-water mark reset through /proc/self/clear_refs), after malloc has handed its free
    memory back to the OS (malloc_trim): otherwise freed blocks that malloc keeps
    (keep_freed_memory) serve the call's allocations, even ones of hundreds of MB, without the
    resident set growing (a 128 MB temporary then measured 2 MB)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    status = Path("/proc/self/status")
    # Garbage first (its tensors' memory is then trimmed too), and no collection during the
    # call: one could shrink the resident set while the call grows it.
    gc.collect()
    _trim_malloc()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        before = _status_kib(status, "VmRSS")
        fn()
        return float(max(0, _status_kib(status, "VmHWM") - before) * 1024)
    except (OSError, ValueError):  # not Linux, or not allowed
        return None
    finally:
        if was_enabled:
            gc.enable()


@functools.cache
def _glibc():
    """glibc through ctypes, or None where the C library is not glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _trim_malloc() -> None:
    """Returns glibc malloc's free memory (in every arena, the heap's inside too) to the OS."""
    if _glibc() is not None:
        _glibc().malloc_trim(0)


def _status_kib(status: Path, key: str) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise ValueError(f"{key} not in {status}")


def _time_cuda(contenders: dict[str, Contender], rounds: int = CUDA_ROUNDS,
               graphs: bool = False) -> tuple[dict[str, Timing], dict[str, str]]:
    """Interleaved rounds of back-to-back batches of about TARGET_BATCH_S each (sized from a
    first estimate), each timed by CUDA events after the L2 is overwritten; with ``graphs``,
    each batch captured once as a CUDA graph and replayed. The times, and the contenders that
    could not be captured with their errors."""
    from triton.testing import do_bench

    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    estimate = {name: _cuda_estimate(fn, do_bench) for name, fn in contenders.items()}
    batch = {name: max(1, min(1000, round(TARGET_BATCH_S / max(t, 1e-7)))) for name, t in estimate.items()}
    runs: dict[str, Contender] = {}
    errors: dict[str, str] = {}
    for name, fn in contenders.items():
        if not graphs:
            runs[name] = functools.partial(_calls, fn, batch[name])
            continue
        try:
            runs[name] = _captured(fn, batch[name]).replay
        except Exception as e:  # a synchronization inside the call, an op that cannot be captured
            errors[name] = f"not captured as a CUDA graph: {describe(e)}"
    samples: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs.items())
    for r in range(rounds):
        for name, run in order if r % 2 == 0 else order[::-1]:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) * 1e-3 / batch[name])
    return {name: _summary(s) for name, s in samples.items()}, errors


def _calls(fn: Contender, n: int) -> None:
    for _ in range(n):
        fn()


def _captured(fn: Contender, n: int) -> torch.cuda.CUDAGraph:
    """n calls of fn as one CUDA graph (fn runs once on a side stream first, as capture needs:
    its lazy initializations must not happen inside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _calls(fn, n)
    return graph


def _cuda_estimate(fn: Contender, do_bench) -> float:
    """Seconds per call of fn: one call timed by CUDA events, or for calls under 10 ms (where
    one call is not a measurement) triton's do_bench, which runs fn over ~25 ms (for a model's
    generation of seconds it would run fn 8 times just to estimate)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = start.elapsed_time(end) * 1e-3
    return once if once >= 0.01 else do_bench(fn, warmup=5, rep=20, return_mode="median") * 1e-3


def _batch_size(fn: Contender) -> int:
    """How many calls of fn take about TARGET_BATCH_S (doubling until a batch is measurable)."""
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= TARGET_BATCH_S / 4 or n >= 1 << 16:
            return max(1, round(n * TARGET_BATCH_S / max(elapsed, 1e-9)))
        n *= 2


def _time_interleaved(contenders: dict[str, Contender], rounds: int) -> dict[str, Timing]:
    batch = {name: _batch_size(fn) for name, fn in contenders.items()}
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders.items())
    for r in range(rounds):
        for name, fn in order if r % 2 == 0 else order[::-1]:  # alternate, so no one always runs first
            start = time.perf_counter()
            for _ in range(batch[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / batch[name])
    return {name: _summary(s) for name, s in samples.items()}


def _summary(samples: list[float]) -> Timing:
    median = statistics.median(samples)
    if len(samples) < 2:
        return Timing(median, rounds=tuple(samples))
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return Timing(median, (q3 - q1) / median, tuple(samples))


def last_level_cache_bytes(device: str = "cpu") -> int:
    """The GPU's L2 on CUDA; else the largest CPU cache on this machine (Linux sysfs), or
    DEFAULT_LLC_BYTES."""
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            pass
    return max(sizes, default=DEFAULT_LLC_BYTES)


# "cold" (the default): every call reads its inputs from memory; "warm": every call finds them
# in cache, as an op does whose input the op before it has just written (set by --cache).
_cuda_graphs = False


def set_cuda_graphs(on: bool) -> None:
    """CUDA timing by graph replays (True) or by back-to-back eager calls (False, the default)."""
    global _cuda_graphs
    _cuda_graphs = bool(on)


CACHE_MODES = ("cold", "warm")
_cache_mode = "cold"


def set_cache_mode(mode: str) -> None:
    global _cache_mode
    if mode not in CACHE_MODES:
        raise ValueError(f"cache mode must be one of {CACHE_MODES}, got {mode!r}")
    _cache_mode = mode


def input_sets_needed(bytes_per_call: int, device: str, max_sets: int = 32) -> int:
    """How many input sets to rotate through so that a call does not find its data in cache:
    enough that one pass over all of them touches twice the last-level cache (the L2 on CUDA).
    One in the "warm" cache mode: the same inputs every call, left in cache by the last."""
    if _cache_mode == "warm":
        return 1
    return max(1, min(max_sets, math.ceil(2 * last_level_cache_bytes(device) / max(bytes_per_call, 1))))


def copy_bandwidth(device: str) -> float:
    """The machine's memory bandwidth in GB/s: a large ``dst.copy_(src)`` (256 MiB on CPU,
    1 GiB on CUDA) with the current thread count, counting bytes read + written. CPU: the best
    of 7 copies, the one least disturbed by other processes; CUDA: the median of back-to-back
    batches."""
    n_bytes = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    if device == "cuda":
        seconds = _time_cuda({"copy": lambda: dst.copy_(src)})[0]["copy"].seconds
    else:
        dst.copy_(src)  # first touch of dst's pages
        seconds = min(_seconds_of(lambda: dst.copy_(src)) for _ in range(7))
    return 2 * n_bytes / seconds / 1e9


def matmul_tflops(device: str, dtype: torch.dtype) -> float:
    """The machine's matrix-multiply rate in TFLOP/s: a square torch.mm (4096 on CUDA, 2048
    on CPU) with the current thread count; the best of a few (CUDA: the median of back-to-back
    batches). On a CPU a 16-bit dtype's rate is at least fp32's: where PyTorch's 16-bit product
    is slower (no AVX-512: ~1 GFLOP/s on an AMD Zen 3, 14 s for one 2048 product), a kernel can
    widen to fp32, so fp32's rate is the peak (a 256 product tells, before the long one)."""
    if device == "cpu" and dtype in (torch.bfloat16, torch.float16):
        fp32 = matmul_tflops(device, torch.float32)
        if _mm_tflops(device, dtype, 256) < fp32 / 2:
            return fp32
        return max(_mm_tflops(device, dtype, 2048), fp32)
    return _mm_tflops(device, dtype, 4096 if device == "cuda" else 2048)


@functools.cache  # (fp32's rate, asked again for each 16-bit dtype of a run)
def _mm_tflops(device: str, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    if device == "cuda":
        seconds = _time_cuda({"mm": lambda: torch.mm(a, b)})[0]["mm"].seconds
    else:
        torch.mm(a, b)
        seconds = min(_seconds_of(lambda: torch.mm(a, b)) for _ in range(3))
    return 2 * n**3 / seconds / 1e12


def keep_freed_memory() -> bool:
    """Makes glibc's malloc serve every block from its heap (M_MMAP_MAX 0: none mapped anew)
    and never return the heap's top to the OS (M_TRIM_THRESHOLD); True if it could.

    By default glibc adjusts both as the process runs, so whether a fresh 12 MB output is
    recycled or handed back and page-faulted in anew on every call depends on the order of the
    allocations before it: the same kernel measured 1.3 ms or 19 ms per call. With this, every
    contender works in the steady state a caching allocator gives (as on CUDA), so the
    comparison is between kernels, not between allocation histories. Blocks of 32 MiB and more
    (glibc's largest M_MMAP_THRESHOLD) were still mapped anew each call until M_MMAP_MAX 0: a
    2048 x 4096 fp32 rms_norm took 20 ms for its 32 MiB output's page faults where one row
    fewer took 4.5 (AMD EPYC Zen 5 under KVM); peak_memory's malloc_trim still hands the heap's
    free pages back before it measures."""
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    # (mallopt takes a C int: 2**31 - 1 is the largest trim threshold it can say)
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def _seconds_of(fn: Contender) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
