"""Whether each backend can run at all on this machine (None) or why not, and the checks that
depend on the machine rather than on the op: the CUDA architectures compiled into fastarch._C
against the GPU's, and where Triton runs. What a backend supports for given inputs is each
op family's own business (its backends.py)."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import torch

from fastarch._extension import build_info, cpu_kernels_missing, cuda_kernels_missing
from fastarch.registry import MachineReason

try:
    import triton  # noqa: F401
except ImportError as e:
    _TRITON_IMPORT_ERROR: str | None = MachineReason(f"triton is not importable ({e})")
else:
    _TRITON_IMPORT_ERROR = None
    if importlib.util.find_spec("fastarch.kernels") is None:  # a source tree built in place, not installed
        _TRITON_IMPORT_ERROR = MachineReason(
            "fastarch.kernels (the Triton kernels, kernels/ in the source tree) is not installed: pip install -e ."
        )


@functools.cache
def cpuinfo(field: str) -> str:
    """The first value of ``field`` in /proc/cpuinfo ("model name", "vendor_id"), "" where
    there is none (another OS, another architecture's fields)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


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


def _parse_targets(targets: str) -> list[tuple[str, int, int, bool]] | None:
    """'sm_80;sm_90a;compute_90' -> [('sm', 8, 0, False), ('sm', 9, 0, True), ('compute', 9, 0,
    False)] (the last item: an arch-specific 'a' target); None when it does not parse."""
    parsed = []
    for target in targets.replace(" ", ";").split(";"):
        if not target:
            continue
        kind, _, number = target.partition("_")
        specific = number.endswith(("a", "f"))
        digits = number.rstrip("af")
        if kind not in ("sm", "compute") or len(digits) < 2 or not digits.isdigit():
            return None
        parsed.append((kind, int(digits[:-1]), int(digits[-1]), specific))
    return parsed


def runs_on(targets: str, capability: tuple[int, int]) -> bool | None:
    """Whether code compiled for ``targets`` (build_info's "sm_80;sm_90;compute_90") runs on a
    GPU of ``capability`` (None: the targets do not parse). A cubin (sm_XY) runs on its own
    major version at an equal or higher minor one; PTX (compute_XY) is compiled by the driver
    for any GPU of an equal or higher capability; an arch-specific target (sm_90a, compute_90a)
    runs on its exact version only."""
    parsed = _parse_targets(targets)
    if parsed is None:
        return None
    for kind, major, minor, specific in parsed:
        if specific:
            if capability == (major, minor):
                return True
        elif kind == "compute" and capability >= (major, minor):
            return True
        elif kind == "sm" and capability[0] == major and capability[1] >= minor:
            return True
    return False


@functools.cache
def _cuda_arch_reason(index: int) -> str | None:
    archs = build_info().get("cuda_archs", "")
    capability = torch.cuda.get_device_capability(index)
    if not archs or runs_on(archs, capability) is not False:  # (unknown: the launch will say)
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
