"""What every op's test table shares: a row per backend of the op, and what a decline means.

A backend may decline a row for a reason of this machine (no GPU, no AVX-512, a build without
some kernels: a registry.MachineReason): the row is skipped with that reason. Any other
decline fails the row: a table lists, per backend, only cases the backend claims to run (the
declines by design are tested on their own, as errors)."""

from __future__ import annotations

import os

import pytest
import torch

from fastarch import registry
from fastarch._extension import _C

HAS_CUDA = torch.cuda.is_available()
# The CPU kernels' build the process runs (FASTARCH_CPU_ISA, read by fastarch at import): what
# a test that switches builds restores afterwards.
DEFAULT_ISA = os.environ.get("FASTARCH_CPU_ISA", "").strip() or "auto"


def set_cpu_isa(level: str) -> None:
    """Forces the CPU kernels' level (csrc/cpu/isa.h: "auto", "generic", "avx2", ...) for a test;
    a level this CPU or build cannot run (avx2 on a CPU without AVX2, or in a build without
    those kernels) skips the test with the reason."""
    try:
        _C._set_cpu_isa(level)
    except ValueError as e:
        pytest.skip(f"the CPU kernels' level {level} cannot run here: {e}")


def rows(op: str) -> list:
    """pytest params (backend, device): every backend registered for ``op`` on the device it
    runs (cuda rows marked gpu; Triton on the GPU when there is one, else in its interpreter)."""
    params = []
    for b in registry.backends_of(op):
        if b.name == "cuda":
            params.append(pytest.param("cuda", "cuda", marks=pytest.mark.gpu, id="cuda"))
        elif b.name == "triton":
            params.append(pytest.param("triton", "cuda" if HAS_CUDA else "cpu", id="triton"))
        else:
            params.append(pytest.param(b.name, "cpu", id=b.name))
    return params


def require(op: str, backend: str, problem) -> None:
    """Returns when ``backend`` runs ``problem``; skips for a reason of this machine; fails
    for any other reason."""
    entry = next(b for b in registry.backends_of(op) if b.name == backend)
    why = registry.why_not(entry, problem)
    if why is None:
        return
    if isinstance(why, registry.MachineReason):
        pytest.skip(f"{backend} cannot run here: {why}")
    pytest.fail(f"{backend} declines a case of its own test table: {why}")


def interpreted(backend: str, device: str) -> bool:
    """Triton in its CPU interpreter (no GPU): the GPU kernels' own source, run a program at a
    time in Python, a second or more for a row that takes a millisecond on a GPU."""
    return backend == "triton" and device == "cpu"


def interpreter_keeps(backend: str, device: str, *indices: int, n: int = 3) -> bool:
    """Whether a table row runs: always, except in the interpreter, which runs the rows whose
    axis indices sum to 0 mod n, a Latin-square third (for n = 3) of the table in which every
    pair of values of any two axes still meets, as long as each other axis has n values or
    more (the axis of n values, e.g. the three dtypes, against each combination of the rest).
    On a GPU the same table runs whole."""
    return not interpreted(backend, device) or sum(int(i) for i in indices) % n == 0
