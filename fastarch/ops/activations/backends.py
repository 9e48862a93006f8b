"""The activations' backends, in priority order, each with what it supports: the one table.

Interface (reference.py), on 2-D (rows, cols) inputs with contiguous columns: bias_gelu's
forward(x, bias, approximate) -> y and backward(dy, x, bias, approximate, need_dbias) -> (dx,
dbias or None); the gated activations' (swiglu and geglu: one table) forward(gate, up, act) ->
y and backward(dy, gate, up, act) -> (dgate, dup), act one of reference.GATED_ACTIVATIONS, gate
and up rows possibly strided; geglu_packed's forward(proj, act) and backward(dy, proj, act) ->
dproj on proj = [up | gate] (rows, 2N). Every op shares the supports checks (an elementwise problem of one
dtype).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastarch import availability, registry
from fastarch.ops.activations import cpp, triton
from fastarch.ops.activations.reference import (
    bias_gelu_backward_ref,
    bias_gelu_forward_ref,
    gated_backward_packed_ref,
    gated_backward_ref,
    gated_forward_ref,
)

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ActivationProblem(NamedTuple):
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

GATED_BACKENDS = [
    registry.Backend("cuda", availability.cuda, _cuda_supports, cpp.gated_forward, cpp.gated_backward),
    registry.Backend("cpu", availability.cpu, _cpu_supports, cpp.gated_forward, cpp.gated_backward),
    registry.Backend("triton", availability.triton, _triton_supports, triton.gated_forward, triton.gated_backward),
    registry.Backend("reference", availability.reference, _reference_supports, gated_forward_ref, gated_backward_ref),
]


def _packed(forward):
    """A gated forward taking proj = [up | gate] (rows, 2N) (diffusers' GEGLU layout): its
    halves, read in place (rows strided by 2N)."""

    def run(proj: Tensor, act: str) -> Tensor:
        up, gate = proj.chunk(2, dim=-1)
        return forward(gate, up, act)

    return run


# forward(proj, act) -> y and backward(dy, proj, act) -> dproj, written whole by the kernels
# (the gradients of two chunks would cost autograd a concatenation).
PACKED_BACKENDS = [
    registry.Backend("cuda", availability.cuda, _cuda_supports, _packed(cpp.gated_forward), cpp.gated_backward_packed),
    registry.Backend("cpu", availability.cpu, _cpu_supports, _packed(cpp.gated_forward), cpp.gated_backward_packed),
    registry.Backend("triton", availability.triton, _triton_supports, _packed(triton.gated_forward),
                     triton.gated_backward_packed),
    registry.Backend("reference", availability.reference, _reference_supports, _packed(gated_forward_ref),
                     gated_backward_packed_ref),
]

registry.register("bias_gelu", BACKENDS)
registry.register("swiglu", GATED_BACKENDS)
registry.register("geglu", GATED_BACKENDS)
registry.register("geglu_packed", PACKED_BACKENDS)
