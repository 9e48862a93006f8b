"""The activations' backends, in priority order, each with what it supports: the one table.

Interface (reference.py), on 2-D (rows, cols) inputs with contiguous columns: bias_gelu's
forward(x, bias, approximate) -> y and backward(dy, x, bias, approximate, need_dbias) -> (dx,
dbias or None); swiglu's forward(gate, up) -> y and backward(dy, gate, up) -> (dgate, dup).
Both ops share the backends' supports checks (an elementwise problem of one dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastarch import availability, registry
from fastarch.ops.activations import cpp, triton
from fastarch.ops.activations.reference import (
    bias_gelu_backward_ref,
    bias_gelu_forward_ref,
    swiglu_backward_ref,
    swiglu_forward_ref,
)

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ActivationProblem:
    """What the backends need to know to say whether they can run an activation."""

    device: str
    dtype: torch.dtype
    rows: int
    cols: int

    @classmethod
    def of(cls, x: Tensor) -> ActivationProblem:
        return cls(x.device.type, x.dtype, x.shape[0], x.shape[1])

    def __str__(self) -> str:
        return f"x of shape ({self.rows}, {self.cols}), {self.dtype} on {self.device}"


def _cpu_supports(p: ActivationProblem) -> str | None:
    return registry.device_reason(p.device, "cpu") or registry.dtype_reason(p.dtype, KERNEL_DTYPES + (torch.float64,))


def _cuda_supports(p: ActivationProblem) -> str | None:
    return (
        registry.device_reason(p.device, "cuda")
        or registry.dtype_reason(p.dtype, KERNEL_DTYPES)
        or availability.cuda_device_reason()
    )


def _triton_supports(p: ActivationProblem) -> str | None:
    return availability.triton_device_reason(p.device) or registry.dtype_reason(p.dtype, KERNEL_DTYPES)


def _reference_supports(p: ActivationProblem) -> str | None:
    return None


BACKENDS = [
    registry.Backend("cuda", availability.cuda, _cuda_supports, cpp.bias_gelu_forward, cpp.bias_gelu_backward),
    registry.Backend("cpu", availability.cpu, _cpu_supports, cpp.bias_gelu_forward, cpp.bias_gelu_backward),
    registry.Backend("triton", availability.triton, _triton_supports, triton.bias_gelu_forward,
                     triton.bias_gelu_backward),
    registry.Backend("reference", availability.reference, _reference_supports, bias_gelu_forward_ref,
                     bias_gelu_backward_ref),
]

SWIGLU_BACKENDS = [
    registry.Backend("cuda", availability.cuda, _cuda_supports, cpp.swiglu_forward, cpp.swiglu_backward),
    registry.Backend("cpu", availability.cpu, _cpu_supports, cpp.swiglu_forward, cpp.swiglu_backward),
    registry.Backend("triton", availability.triton, _triton_supports, triton.swiglu_forward, triton.swiglu_backward),
    registry.Backend("reference", availability.reference, _reference_supports, swiglu_forward_ref, swiglu_backward_ref),
]

registry.register("bias_gelu", BACKENDS)
registry.register("swiglu", SWIGLU_BACKENDS)
