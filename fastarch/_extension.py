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

# FASTARCH_CPU_ISA=auto | generic | avx2 | avx512 | avx512_bf16 | amx: the instruction-set level of the
# CPU kernels (csrc/cpu/isa.h; default auto: the highest this CPU and build run), read once at
# import, e.g. to run the portable kernels, or the AVX-512 ones without AVX512-BF16, on a newer
# CPU. A level the CPU cannot run is an error here, not a silent fallback.
# FASTARCH_CPU_BRGEMM=auto | on | off: the attention forward's and backward's products through
# oneDNN's brgemm (bf16's AMX path): auto for bf16 at level amx only, on for every dtype on any
# AVX512-BF16 CPU (to test or compare it), off never.
# FASTARCH_CPU_INT8=auto | exact | avx2 | avx_vnni | avx512_vnni: how quantized_linear multiplies x
# rounded to int8 (activations "int8"; csrc/cpu/isa.h, Int8Products): the fastest this CPU and
# level run up to the one named (auto: all), e.g. to compare vpmaddubsw with vpdpbusd on one CPU.
# fastarch._C._set_cpu_isa, _set_cpu_brgemm and _set_cpu_int8 change them later.
_SETTINGS = (("FASTARCH_CPU_ISA", "_set_cpu_isa"), ("FASTARCH_CPU_BRGEMM", "_set_cpu_brgemm"),
             ("FASTARCH_CPU_INT8", "_set_cpu_int8"))
if _C is not None:
    for _name, _set in _SETTINGS:
        _value = os.environ.get(_name, "").strip()
        if _value:
            try:
                getattr(_C, _set)(_value)
            except (ValueError, RuntimeError) as e:
                raise ValueError(f"{_name}={_value!r}: {e}") from None


def build_info() -> dict[str, Any]:
    """What the extension was built with ({} when it is missing)."""
    return dict(_C.build_info()) if _C is not None else {}


def cpu_path(op: str = "", dtype: torch.dtype | None = None) -> str:
    """The CPU kernels' path as the bench and info name it: ``cpu/<level>`` (cpu/amx,
    cpu/avx512_bf16, cpu/avx512, cpu/avx2, cpu/generic), then where the attention forward and
    backward of dtype (bf16 when None) leave their level's default (brgemm for bf16 at level amx,
    our AVX-512 register tiles otherwise): ``+brgemm`` when they run through brgemm
    (FASTARCH_CPU_BRGEMM=on), ``+tiles`` when bf16 runs on the register tiles at level amx
    (FASTARCH_CPU_BRGEMM=off)."""
    info = build_info()
    level = info.get("cpu_isa", "?")
    label = f"cpu/{level}"
    if not op.startswith("attention") or op == "attention_decode":
        return label
    bf16 = dtype in (None, torch.bfloat16)
    running = info.get("cpu_attention_brgemm") if bf16 else info.get("cpu_attention_brgemm_fp32")
    default = bf16 and level == "amx"
    if running and not default:
        label += "+brgemm"
    elif default and not running:
        label += "+tiles"
    return label


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
