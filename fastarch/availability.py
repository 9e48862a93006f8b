"""Whether each backend can run at all on this machine (None) or why not, and the checks that
depend on the machine rather than on the op: the CUDA architectures compiled into fastarch._C
against the GPU's, and where Triton runs. What a backend supports for given inputs is each
op family's own business (its backends.py)."""

from __future__ import annotations

import functools
import os

import torch

from fastarch._extension import build_info, cpu_kernels_missing, cuda_kernels_missing
from fastarch.registry import MachineReason

try:
    import triton  # noqa: F401
except ImportError as e:
    _TRITON_IMPORT_ERROR: str | None = MachineReason(f"triton is not importable ({e})")
else:
    _TRITON_IMPORT_ERROR = None


def triton_interpreter() -> bool:
    """Triton runs kernels on the CPU with numpy (for tests) when TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def cuda() -> str | None:
    if missing := cuda_kernels_missing():
        return missing
    if not torch.cuda.is_available():
        return MachineReason("no CUDA device is visible (the CUDA kernels are compiled in)")
    return None


def cpu() -> str | None:
    return cpu_kernels_missing()


def triton() -> str | None:
    if _TRITON_IMPORT_ERROR:
        return _TRITON_IMPORT_ERROR
    if not torch.cuda.is_available() and not triton_interpreter():
        return MachineReason("no CUDA device is visible (set TRITON_INTERPRET=1 to run Triton kernels on the CPU, slowly)")
    return None


def reference() -> str | None:
    return None


def triton_device_reason(device: str) -> str | None:
    """Why the Triton kernels cannot take a tensor on ``device`` (None: they can): CUDA
    tensors, and CPU tensors only in Triton's interpreter."""
    if device == "cpu" and not triton_interpreter():
        return MachineReason("input is on cpu; Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1)")
    if device not in ("cpu", "cuda"):
        return f"input is on {device}; this backend runs CUDA tensors"
    return None


def _parse_archs(archs: str) -> list[tuple[int, int, str]]:
    """'8.0;9.0+PTX' -> [(8, 0, 'sass'), (9, 0, 'sass'), (9, 0, 'ptx')]; '9.0a' is SASS that
    runs on 9.0 only ('exact')."""
    parsed = []
    for entry in archs.replace(",", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        version = entry.removesuffix("+PTX")
        exact = version[-1].isalpha()
        try:
            major, minor = version.rstrip("abcdefghijklmnopqrstuvwxyz").split(".")
            parsed_version = int(major), int(minor)
        except ValueError:
            raise ValueError(f"CUDA arch list {archs!r}: {entry!r} is not MAJOR.MINOR[a][+PTX]") from None
        major, minor = parsed_version
        parsed.append((major, minor, "exact" if exact else "sass"))
        if ptx:
            parsed.append((major, minor, "ptx"))
    return parsed


def runs_on(archs: str, capability: tuple[int, int]) -> bool:
    """Whether code compiled for ``archs`` (TORCH_CUDA_ARCH_LIST syntax) runs on a GPU of
    ``capability``: a cubin runs on its own major version at an equal or higher minor one
    (an 'a' cubin on its exact version only); PTX is compiled by the driver for any GPU of an
    equal or higher capability."""
    major, minor = capability
    for a_major, a_minor, kind in _parse_archs(archs):
        if kind == "ptx" and (major, minor) >= (a_major, a_minor):
            return True
        if kind == "sass" and major == a_major and minor >= a_minor:
            return True
        if kind == "exact" and (major, minor) == (a_major, a_minor):
            return True
    return False


@functools.cache
def _cuda_arch_reason(index: int) -> str | None:
    archs = build_info().get("cuda_archs", "")
    capability = torch.cuda.get_device_capability(index)
    if not archs or runs_on(archs, capability):
        return None
    name = torch.cuda.get_device_name(index)
    return MachineReason(
        f"fastarch._C's CUDA kernels are compiled for {archs}, which cannot run on {name} (compute capability"
        f" {capability[0]}.{capability[1]}); rebuild with TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]}"
    )


def cuda_device_reason() -> str | None:
    """Why the compiled CUDA kernels cannot run on the current GPU (None: they can)."""
    if not torch.cuda.is_available():
        return None  # availability.cuda() already says so
    return _cuda_arch_reason(torch.cuda.current_device())
