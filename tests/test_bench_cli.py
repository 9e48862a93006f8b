"""fastarch bench: a tiny run prints the table and saves the JSON; the bytes it counts."""

import json

import pytest
import torch

from fastarch.bench import norms
from fastarch.cli import main

ROW_FIELDS = {
    "op", "shape", "dtype", "pass", "backend", "ran", "ours_us", "baseline_us", "speedup", "work", "unit", "rate",
    "peak_fraction", "spread", "errors", "peak_mb",
}
MACHINE_FIELDS = {
    "device", "cpu", "gpu", "physical_cores", "logical_cpus", "torch_threads", "load_average", "python", "torch",
    "triton", "fastarch", "fastarch_C", "copy_bandwidth_gbps", "matmul_tflops",
}


def test_bench_prints_a_table_and_saves_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    # cuda cannot run CPU tensors: its rows must show the error, not end the run
    args = ["bench", "--op", "layer_norm", "--op", "add_rms_norm", "--device", "cpu", "--shapes", "64x128",
            "--dtype", "fp32", "--pass", "both", "--backend", "auto,cuda", "--no-compile", "--rounds", "2",
            "--json", str(path)]
    assert main(args) == 0

    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("op "))
    for column in ("shape", "dtype", "pass", "backend", "ours us", "eager us", "compile us", "vs eager", "GB/s"):
        assert column in header
    table = [line for line in lines if line.startswith(("layer_norm ", "add_rms_norm "))]
    assert len(table) == 2 * 2 * 2  # ops x passes x backends
    cuda_rows = [line for line in table if " cuda " in line]
    assert len(cuda_rows) == 4 and all("ours: NoBackendError" in line for line in cuda_rows)

    doc = json.loads(path.read_text())
    assert MACHINE_FIELDS <= set(doc["machine"])
    assert doc["machine"]["torch"] == torch.__version__
    assert doc["machine"]["copy_bandwidth_gbps"] > 0 and doc["date"]
    assert len(doc["rows"]) == len(table)
    for row in doc["rows"]:
        assert set(row) == ROW_FIELDS
        assert row["baseline_us"]["eager"] > 0 and row["baseline_us"]["compile"] is None
        assert row["unit"] == "GB/s"
        if row["backend"] == "auto":
            assert row["ours_us"] > 0 and row["rate"] > 0 and row["ran"] and not row["errors"]
            assert row["speedup"]["eager"] > 0
        else:
            assert row["ours_us"] is None and "cannot run" in row["errors"]["ours"]


def test_bench_warm_cache_reuses_one_input_set(tmp_path, capsys, monkeypatch):
    """--cache warm: one input set per case (cold: enough sets to fill twice the last-level
    cache), said in the preamble and the JSON, and no fraction of the copy bandwidth."""
    from fastarch.bench import timing

    made = []
    real = norms.Case._inputs
    monkeypatch.setattr(norms.Case, "_inputs", lambda self: made.append(1) or real(self))
    path = tmp_path / "bench.json"
    args = ["bench", "--op", "layer_norm", "--device", "cpu", "--shapes", "64x128", "--dtype", "fp32", "--pass",
            "fwd", "--no-compile", "--rounds", "2", "--json", str(path)]
    try:
        assert main([*args, "--cache", "warm"]) == 0
        assert len(made) == 1
        assert "inputs: warm" in capsys.readouterr().out
        doc = json.loads(path.read_text())
        assert doc["arguments"]["cache"] == "warm" and doc["machine"]["inputs"] == "warm"
        (row,) = doc["rows"]
        assert row["rate"] > 0 and row["peak_fraction"] is None
        made.clear()
        assert main(args) == 0
        assert len(made) == timing.input_sets_needed(norms.Case("layer_norm", (64, 128), torch.float32, False,
                                                                "cpu").bytes_moved, "cpu") > 1
        assert json.loads(path.read_text())["rows"][0]["peak_fraction"] > 0
    finally:
        timing.set_cache_mode("cold")


R, N = 64, 128
# layer_norm fp32: x read, y written, weight and bias read, mean and rstd (fp32) written
LN_FWD = 2 * R * N * 4 + 2 * N * 4 + 2 * R * 4
# then x and dy read, dx written, weight read, dweight and dbias written, mean and rstd read
LN_BWD = 3 * R * N * 4 + 3 * N * 4 + 2 * R * 4
# add_rms_norm bf16: x and residual read, y and s written, weight read, rstd written
ADD_RMS_FWD = 4 * R * N * 2 + N * 2 + R * 4
# then s, dy and ds read, dx (shared by x and residual) written, weight read, dweight written, rstd read
ADD_RMS_BWD = 4 * R * N * 2 + 2 * N * 2 + R * 4


@pytest.mark.parametrize(
    "op, dtype, backward, expected",
    [
        ("layer_norm", torch.float32, False, LN_FWD),
        ("layer_norm", torch.float32, True, LN_FWD + LN_BWD),
        ("add_rms_norm", torch.bfloat16, False, ADD_RMS_FWD),
        ("add_rms_norm", torch.bfloat16, True, ADD_RMS_FWD + ADD_RMS_BWD),
    ],
)
def test_bytes_moved(op, dtype, backward, expected):
    assert norms.Case(op, (R, N), dtype, backward, "cpu").work == expected


@pytest.mark.slow
def test_bench_times_torch_compile(tmp_path):
    path = tmp_path / "bench.json"
    args = ["bench", "--op", "rms_norm", "--device", "cpu", "--shapes", "64x128", "--dtype", "fp32", "--pass", "fwd",
            "--rounds", "2", "--json", str(path)]
    assert main(args) == 0
    (row,) = json.loads(path.read_text())["rows"]
    assert row["baseline_us"]["compile"] > 0 and row["speedup"]["compile"] > 0 and not row["errors"]


def test_bench_attention_and_decode_rows(tmp_path, capsys):
    """The attention families: TFLOP/s against the measured matmul rate, SDPA baselines."""
    path = tmp_path / "bench.json"
    args = ["bench", "--op", "attention_causal,attention_decode", "--device", "cpu", "--shapes", "1x2x64x16",
            "--dtype", "fp32", "--pass", "both", "--no-compile", "--rounds", "2", "--json", str(path)]
    assert main(args) == 0
    doc = json.loads(path.read_text())
    assert doc["machine"]["matmul_tflops"]["fp32"] > 0
    rows = {(r["op"], r["pass"]): r for r in doc["rows"]}
    assert set(rows) == {("attention_causal", "fwd"), ("attention_causal", "fwd+bwd"), ("attention_decode", "fwd")}
    fwd = rows[("attention_causal", "fwd")]
    assert fwd["unit"] == "TFLOP/s" and fwd["work"] == 4 * 2 * 64 * 64 * 16 / 2
    assert fwd["baseline_us"]["sdpa"] > 0 and fwd["ours_us"] > 0 and fwd["peak_fraction"] > 0
    assert rows[("attention_causal", "fwd+bwd")]["work"] == 3.5 * fwd["work"]
    assert rows[("attention_decode", "fwd")]["unit"] == "GB/s"


def test_peak_memory_counts_a_large_temporary():
    """timing.peak_memory sees a 128 MB temporary, even where malloc keeps freed blocks that
    could serve it without the process growing (keep_freed_memory, and 640 MB of 16 MB
    tensors freed into the heap), and does not count memory held before the call."""
    from fastarch.bench import timing

    timing.keep_freed_memory()
    blocks = [torch.ones(4 << 20) for _ in range(40)]  # below malloc's mmap threshold: the heap
    del blocks
    held = torch.ones(32 << 20)  # 128 MB held before and after: not the call's

    def call():
        return torch.ones(32 << 20).sum()  # 128 MB, freed before the call returns

    peak = timing.peak_memory(call, "cpu")
    assert peak is not None and 120e6 <= peak <= 200e6, peak
    assert held.sum() > 0


def test_kept_memory_serves_large_blocks_without_page_faults():
    """keep_freed_memory: a 96 MB output freed and allocated again comes from malloc's heap, its
    pages already there, not mapped anew and page-faulted in (as blocks of 32 MiB and more were,
    glibc's largest mmap threshold: 24576 faults here)."""
    import resource

    from fastarch.bench import timing

    if not timing.keep_freed_memory():
        pytest.fail("glibc's mallopt is not reachable on this Linux machine")
    # 96 MB allocated, written and freed into the heap, twice: in a fresh process the second
    # cycle did not always get the first one's block back (all 24576 pages faulted in anew in
    # 3 of 6 processes, AMD EPYC Zen 5); from the third on, none did: the steady state measured
    for _ in range(2):
        torch.ones(24 << 20).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(24 << 20).sum()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 2000, faults


class _FakeCuda:
    """The few torch.cuda calls _time_cuda makes, on the CPU: events read the clock, a graph
    records the calls made while it captures and replays them."""

    capturing = False

    class Event:
        def __init__(self, enable_timing=False):
            self.t = 0.0

        def record(self):
            import time

            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    class Stream:
        def wait_stream(self, other):
            pass

    class CUDAGraph:
        def __init__(self):
            self.calls, self.replays = [], 0

        def replay(self):
            self.replays += 1

    def __init__(self):
        import contextlib

        fake = self
        self.graphs = []

        @contextlib.contextmanager
        def graph(g):
            fake.capturing = True
            fake.graphs.append(g)
            try:
                yield
            finally:
                fake.capturing = False

        self.graph = graph
        self.stream = lambda s: contextlib.nullcontext()
        self.current_stream = lambda: self.Stream()


def test_cuda_graph_timing_replays_each_batch_and_reports_what_cannot_be_captured(monkeypatch):
    """--cuda-graphs' timing (timing._time_cuda, graphs=True), its logic on the CPU with
    torch.cuda's calls faked: each contender's batch is captured once and replayed once a
    round, the time divided by the batch; one that synchronizes while captured is reported
    with its error and the others are still timed."""
    from fastarch.bench import timing

    fake = _FakeCuda()
    for name in ("Event", "Stream", "CUDAGraph", "graph", "stream", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **k: real_empty(*a, **k))  # the L2 flush
    monkeypatch.setattr(timing, "_cuda_estimate", lambda fn, do_bench: 0.001)  # 30 calls a batch
    captured = []

    def good():
        if fake.capturing:
            captured.append("good")

    def syncs():
        if fake.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")

    times, errors = timing._time_cuda({"good": good, "syncs": syncs}, rounds=3, graphs=True)
    assert set(times) == {"good"} and len(times["good"].rounds) == 3
    assert errors == {"syncs": "not captured as a CUDA graph: RuntimeError: operation not permitted when stream is"
                                " capturing"}
    assert captured == ["good"] * 30 and [g.replays for g in fake.graphs] == [3, 0]
    eager, none = timing._time_cuda({"good": good, "syncs": syncs}, rounds=2)
    assert set(eager) == {"good", "syncs"} and none == {}


def test_cuda_graphs_flag_needs_a_gpu_and_the_ops(capsys):
    with pytest.raises(SystemExit, match="--cuda-graphs applies to --device cuda"):
        main(["bench", "--op", "layer_norm", "--device", "cpu", "--cuda-graphs"])
    with pytest.raises(SystemExit, match="--cuda-graphs applies to the ops"):
        main(["bench", "--model", "unet", "--cuda-graphs"])
