"""Loads the compiled extension fastarch._C, and remembers why when it cannot.

fastarch works without it (the reference and Triton backends remain); the registry reports
the load error as the reason the cpu and cuda backends are unavailable.
"""

from __future__ import annotations

import os
from typing import Any

import torch  # noqa: F401  (the extension links against torch's libraries)

from fastarch.registry import MachineReason

_C: Any = None
LOAD_ERROR: str | None = None

try:
    from fastarch import _C  # type: ignore[attr-defined,no-redef]  # registers the fastarch:: kernels
except Exception as e:  # ImportError, or an undefined symbol from a torch of another version
    LOAD_ERROR = f"fastarch._C failed to load ({type(e).__name__}: {e})"

# FASTARCH_CPU_ISA=generic | avx512 | auto: which build of the CPU kernels runs (default auto:
# the fastest this CPU and build have), read once at import, e.g. to run the portable kernels
# on an AVX-512 machine. fastarch._C._set_cpu_isa changes it later.
_ISA = os.environ.get("FASTARCH_CPU_ISA", "").strip()
if _C is not None and _ISA:
    try:
        _C._set_cpu_isa(_ISA)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"FASTARCH_CPU_ISA={_ISA!r}: {e}") from None


def build_info() -> dict[str, Any]:
    """What the extension was built with ({} when it is missing)."""
    return dict(_C.build_info()) if _C is not None else {}


def cpu_kernels_missing() -> str | None:
    """None when the C++ CPU kernels are loaded, else why not."""
    return LOAD_ERROR


def cuda_kernels_missing() -> str | None:
    """None when the CUDA kernels are compiled in, else why not."""
    if LOAD_ERROR:
        return LOAD_ERROR
    if not build_info().get("cuda"):
        return MachineReason(
            "fastarch._C was built without CUDA kernels (no CUDA toolkit or CUDA torch at build time, or FASTARCH_CUDA=0)"
        )
    return None
