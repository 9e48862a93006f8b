"""The linear layer's backends, in priority order, each with what it supports: the one table.
All share one kernel-level interface (see reference.py): forward(x, weight, bias) -> y. The
kernels stream W once against a few rows of x: there W's bytes are the cost. Each backend takes
the row counts where it beats PyTorch's own GEMV/GEMM (the reference backend), which runs the
rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastarch import _extension, availability, registry
from fastarch.ops.linear import cpp, triton
from fastarch.ops.linear.reference import linear_ref

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GPU_MAX_ROWS = 16
"""The most rows of x the GPU kernels take (not yet measured on a GPU)."""
CPU_ROWS = {
    "avx512": {torch.float32: (1, 32), torch.bfloat16: (1, 4), torch.float16: (1, 32)},
    "generic": {torch.float32: (1, 4)},
}
"""The rows of x (first, last) the CPU kernels take, per kernel build and dtype: where they beat
PyTorch's GEMV/GEMM side by side (``python bench/linear_rows.py``; AMD EPYC Zen 4, 2 threads,
SmolLM2-135M's weights: fp32 2.0x at 1 row, 3-4x at 2-4, 1.5x at 32; bf16 2.0x at 1, 1.65x at
4, parity at 8; fp16 parity with PyTorch's own fp16 GEMV at 1 row, 1.4-3.8x at 2-32; the
portable build wins for fp32 at 1-4 rows only, its fp16/bf16 conversions being scalar). The
"avx512" row covers every level from avx512 up (the same kernels)."""


@dataclass(frozen=True)
class LinearProblem:
    """What the backends need to know to say whether they can run a linear layer."""

    device: str
    dtype: torch.dtype
    rows: int
    in_features: int
    out_features: int
    weight_contiguous: bool

    @classmethod
    def of(cls, x: Tensor, weight: Tensor) -> LinearProblem:
        return cls(x.device.type, x.dtype, x.shape[0], x.shape[1], weight.shape[0], weight.is_contiguous())

    def __str__(self) -> str:
        return (f"{self.rows} rows of {self.in_features} features to {self.out_features}, {self.dtype} on "
                f"{self.device}{'' if self.weight_contiguous else ', weight not contiguous'}")


def _rows_reason(p: LinearProblem, first: int, last: int, who: str) -> str | None:
    if not p.weight_contiguous:
        return "weight is not contiguous (the kernel streams its rows)"
    if first <= p.rows <= last:
        return None
    return (f"{p.rows} rows of {p.dtype}: {who} takes {first}-{last}, where it beats PyTorch's GEMV/GEMM"
            " (the reference backend runs the rest)")


def _cpu_supports(p: LinearProblem) -> str | None:
    why = registry.device_reason(p.device, "cpu") or registry.dtype_reason(p.dtype, KERNEL_DTYPES)
    if why:
        return why
    build = "generic" if _extension.build_info().get("cpu_isa", "generic") == "generic" else "avx512"
    if p.dtype not in CPU_ROWS[build]:
        return registry.MachineReason(
            f"{p.dtype} at decode rows needs the AVX-512 kernels (the portable build's conversions make it slower"
            " than PyTorch's GEMV)"
        )
    first, last = CPU_ROWS[build][p.dtype]
    return _rows_reason(p, first, last, f"the {build} CPU kernel")


def _cuda_supports(p: LinearProblem) -> str | None:
    return (
        registry.device_reason(p.device, "cuda")
        or registry.dtype_reason(p.dtype, KERNEL_DTYPES)
        or availability.cuda_device_reason()
        or _rows_reason(p, 1, GPU_MAX_ROWS, "the CUDA kernel")
    )


def _triton_supports(p: LinearProblem) -> str | None:
    return (availability.triton_device_reason(p.device) or registry.dtype_reason(p.dtype, KERNEL_DTYPES)
            or _rows_reason(p, 1, GPU_MAX_ROWS, "the Triton kernel"))


def _reference_supports(p: LinearProblem) -> str | None:
    return None


BACKENDS = [
    registry.Backend("cuda", availability.cuda, _cuda_supports, cpp.forward),
    registry.Backend("cpu", availability.cpu, _cpu_supports, cpp.forward),
    registry.Backend("triton", availability.triton, _triton_supports, triton.forward),
    registry.Backend("reference", availability.reference, _reference_supports, linear_ref),
]

registry.register("linear", BACKENDS)
