"""Where a call reads tensor values on the host: on a GPU each such read waits for the device,
and a CUDA graph's capture refuses it (the capture fails). The CPU cannot capture, but a
dispatch mode sees every read the call would make (as an op: .item(), bool(), int(), tolist(),
nonzero, ...), so a CPU test can show that what a graph captures reads nothing. Under the mode
fastarch's ops take their dispatcher path, the op-by-op path a GPU runs."""

from __future__ import annotations

import linecache
import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastarch import cuda_graphs

# ops that read values on the host, or size their output by them (on a GPU: a synchronization)
READS = frozenset(("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
                   "aten::unique_consecutive", "aten::unique_dim", "aten::equal", "aten::is_nonzero",
                   "aten::bincount", "aten::repeat_interleave", "aten::histc"))


def _reader(depth: int = 4) -> str:
    """The Python code that asked for a read: "file:line < caller's file:line < ...", the
    innermost first, outside torch and this file."""
    frames = [f for f in traceback.extract_stack()[:-2]
              if f"{os.sep}torch{os.sep}" not in f.filename and f.filename != __file__]
    return " < ".join(f"{f.filename}:{f.lineno}" for f in reversed(frames[-depth:])) or "?"


class HostReads(TorchDispatchMode):
    """Records each op that reads values on the host, as the file:line of the Python code
    (outside torch and this file) that asked for it."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in READS:
            self.readers.append(_reader())
        return func(*args, **(kwargs or {}))


def host_reads(fn) -> list[str]:
    """Where fn(), called without gradients as fastarch.cuda_graphs.GraphedCall calls what it
    captures (cuda_graphs.recording() true), read values on the host: under the dispatch mode,
    and with the Tensor methods that read without an op (tolist, numpy, ...) patched."""
    reads = HostReads()
    with torch.no_grad(), cuda_graphs._recording_calls(), PythonReads() as python, reads:
        fn()
    return reads.readers + python.readers


# The Tensor methods through which Python reads values on the host (each also reaches
# _local_scalar_dense, but a path that checks for dispatch modes, as fastarch's direct kernel
# calls do, takes another path under HostReads: these patches see the path a GPU runs).
_PYTHON_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")
_TORCH_READS = ("equal", "allclose", "is_nonzero")  # functions of torch that answer on the host


class PythonReads:
    """A context in which each call of those methods and functions is recorded (_reader),
    without a dispatch mode."""

    def __init__(self) -> None:
        self.readers: list[str] = []
        self._saved: dict[str, object] = {}

    def __enter__(self) -> PythonReads:
        for owner, names in ((torch.Tensor, _PYTHON_READS), (torch, _TORCH_READS)):
            for name in names:
                real = self._saved[owner, name] = getattr(owner, name)

                def spy(*args, _real=real, **kwargs):
                    self.readers.append(_reader())
                    return _real(*args, **kwargs)

                setattr(owner, name, spy)
        return self

    def __exit__(self, *exc) -> None:
        for (owner, name), real in self._saved.items():
            setattr(owner, name, real)


def on_a_gpu(readers: list[str]) -> list[str]:
    """The readers a GPU would meet: without those under a CPU-device test (``device.type ==
    "cpu"`` on the line of a frame of theirs or the line before), which the CPU run of a test
    takes."""
    kept = []
    for reader in readers:
        near = ""
        for frame in reader.split(" < "):
            path, line = frame.rsplit(":", 1)
            near += linecache.getline(path, int(line)) + linecache.getline(path, int(line) - 1)
        if 'device.type == "cpu"' not in near:
            kept.append(reader)
    return kept
