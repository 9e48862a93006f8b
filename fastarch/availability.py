"""Whether each backend can run at all on this machine (None) or why not, and the checks that
depend on the machine rather than on the op: the CUDA architectures compiled into fastarch._C
against the GPU's, and where Triton runs. What a backend supports for given inputs is each
op family's own business (its backends.py)."""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
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
            key, colon, value = line.partition(":")
            if colon and key.strip() == field:  # whole keys: "model" is not "model name"
                return value.strip()
    except OSError:
        pass
    return ""


def cpu_name() -> str:
    """The CPU's model name with its family and model numbers and, where known, its generation:
    under a hypervisor the name is often just "AMD EPYC", the same for Zen 3, 4 and 5."""
    name = cpuinfo("model name") or platform.processor() or platform.machine()
    family, model = cpuinfo("cpu family"), cpuinfo("model")
    if not (family.isdigit() and model.isdigit()):
        return name
    generation = cpu_generation(cpuinfo("vendor_id"), int(family), int(model))
    return f"{name} (family {family} model {model}{': ' + generation if generation else ''})"


# Intel's family-6 server models (Xeon Scalable generations).
_INTEL_SERVER_MODELS = {0x55: "Skylake/Cascade Lake", 0x6A: "Ice Lake", 0x8F: "Sapphire Rapids",
                        0xCF: "Emerald Rapids", 0xAD: "Granite Rapids"}


def cpu_generation(vendor: str, family: int, model: int) -> str:
    """The microarchitecture of an x86 CPU by its vendor, family and model ("" where unknown)."""
    if vendor == "AuthenticAMD":
        if family == 0x17:
            return "Zen 2" if model >= 0x30 else "Zen/Zen+"
        if family == 0x19:  # Zen 4: Genoa 0x10-0x1f, Raphael/Phoenix 0x60-0x7f, Bergamo/Siena 0xa0-0xaf
            return "Zen 4" if 0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF else "Zen 3"
        if family == 0x1A:
            return "Zen 5"
    if vendor == "GenuineIntel" and family == 6:
        return _INTEL_SERVER_MODELS.get(model, "")
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


# Whether the Triton kernels are registered as torch ops (torch.library.triton_op) in this
# process, decided when fastarch is imported: where they can run, with a CUDA device or in
# Triton's interpreter. Registering them costs ~1 s of the import (triton_op scans each op's
# function for its kernels with torch._inductor's utilities, importing torch._dynamo), which a
# CPU-only process without the interpreter never uses. FASTARCH_TRITON_OPS=1 registers them
# anyway (bench/triton_compile.py compiles them for a GPU on a machine without one).
TRITON_OPS = _TRITON_IMPORT_ERROR is None and (
    triton_interpreter() or os.environ.get("FASTARCH_TRITON_OPS") == "1" or torch.cuda.is_available()
)


def triton() -> str | None:
    if _TRITON_IMPORT_ERROR:
        return _TRITON_IMPORT_ERROR
    if not torch.cuda.is_available() and not triton_interpreter():
        return MachineReason("no CUDA device is visible (set TRITON_INTERPRET=1 to run Triton kernels on the CPU, slowly)")
    if not TRITON_OPS:
        return MachineReason("TRITON_INTERPRET=1 was set after fastarch was imported, which registers the Triton kernels"
                             " only where they can run: set it before")
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
