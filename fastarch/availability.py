"""Whether each backend can run at all on this machine (None) or why not. Shared by every op;
what a backend supports for given inputs is each op's own business (its supports check)."""

from __future__ import annotations

import os

import torch

from fastarch._extension import cpu_kernels_missing, cuda_kernels_missing

try:
    import triton  # noqa: F401
except ImportError as e:
    _TRITON_IMPORT_ERROR: str | None = f"triton is not importable ({e})"
else:
    _TRITON_IMPORT_ERROR = None


def triton_interpreter() -> bool:
    """Triton runs kernels on the CPU with numpy (for tests) when TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def cuda() -> str | None:
    if missing := cuda_kernels_missing():
        return missing
    if not torch.cuda.is_available():
        return "no CUDA device is visible (the CUDA kernels are compiled in)"
    return None


def cpu() -> str | None:
    return cpu_kernels_missing()


def triton() -> str | None:
    if _TRITON_IMPORT_ERROR:
        return _TRITON_IMPORT_ERROR
    if not torch.cuda.is_available() and not triton_interpreter():
        return "no CUDA device is visible (set TRITON_INTERPRET=1 to run Triton kernels on the CPU, slowly)"
    return None


def reference() -> str | None:
    return None
