"""Where a call reads tensor values on the host: on a GPU each such read waits for the device,
and a CUDA graph's capture refuses it (the capture fails). The CPU cannot capture, but a
dispatch mode sees every read the call would make (as an op: .item(), bool(), int(), tolist(),
nonzero, ...), so a CPU test can show that what a graph captures reads nothing. Under the mode
fastarch's ops take their dispatcher path, the op-by-op path a GPU runs."""

from __future__ import annotations

import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastarch import cuda_graphs

READS = frozenset(("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
                   "aten::equal", "aten::is_nonzero"))


class HostReads(TorchDispatchMode):
    """Records each op that reads values on the host, as the file:line of the Python code
    (outside torch and this file) that asked for it."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in READS:
            frames = [f for f in traceback.extract_stack()[:-1]
                      if f"{os.sep}torch{os.sep}" not in f.filename and f.filename != __file__]
            self.readers.append(f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?")
        return func(*args, **(kwargs or {}))


def host_reads(fn) -> list[str]:
    """Where fn(), called without gradients as fastarch.cuda_graphs.GraphedCall calls what it
    captures (cuda_graphs.recording() true), read values on the host."""
    reads = HostReads()
    with torch.no_grad(), cuda_graphs._recording_calls(), reads:
        fn()
    return reads.readers


# The Tensor methods through which Python reads values on the host (each also reaches
# _local_scalar_dense, but a path that checks for dispatch modes, as fastarch's direct kernel
# calls do, takes another path under HostReads: these patches see the path a GPU runs).
_PYTHON_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


class PythonReads:
    """A context in which each call of those methods is recorded as the file:line that made it
    (outside torch and this file), without a dispatch mode."""

    def __init__(self) -> None:
        self.readers: list[str] = []
        self._saved: dict[str, object] = {}

    def __enter__(self) -> PythonReads:
        for name in _PYTHON_READS:
            real = self._saved[name] = getattr(torch.Tensor, name)

            def spy(*args, _real=real, **kwargs):
                frames = [f for f in traceback.extract_stack()[:-1]
                          if f"{os.sep}torch{os.sep}" not in f.filename and f.filename != __file__]
                self.readers.append(f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?")
                return _real(*args, **kwargs)

            setattr(torch.Tensor, name, spy)
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)
