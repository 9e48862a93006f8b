"""The norms' backends, in priority order, each with what it supports: the one table.

All four share one kernel-level interface (see reference.py): forward(x, residual, weight,
bias, eps, rms, weight_offset=0.0) and backward(dy, dresidual_out, xin, weight, mean, rstd,
need_dweight, need_dbias, weight_offset=0.0) on 2-D (rows, cols) inputs with contiguous columns.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastarch import availability, registry
from fastarch.ops.norms import cpp, triton
from fastarch.ops.norms.reference import norm_backward_ref, norm_forward_ref

NORM_OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class NormProblem(NamedTuple):
    """What the backends need to know to say whether they can run a norm."""

    device: str  # "cpu", "cuda", ...
    dtype: torch.dtype
    rows: int
    cols: int

    @classmethod
    def of(cls, x: Tensor) -> NormProblem:
        return cls(x.device.type, x.dtype, x.shape[0], x.shape[1])

    def __str__(self) -> str:
        return f"x of shape ({self.rows}, {self.cols}), {self.dtype} on {self.device}"


def _cpu_supports(p: NormProblem) -> str | None:
    return registry.device_reason(p.device, "cpu") or registry.dtype_reason(p.dtype, KERNEL_DTYPES + (torch.float64,))


def _cuda_supports(p: NormProblem) -> str | None:
    return (
        registry.device_reason(p.device, "cuda")
        or registry.dtype_reason(p.dtype, KERNEL_DTYPES)
        or availability.cuda_device_reason()
    )


def _triton_supports(p: NormProblem) -> str | None:
    return availability.triton_device_reason(p.device) or registry.dtype_reason(p.dtype, KERNEL_DTYPES)


def _reference_supports(p: NormProblem) -> str | None:
    return None


def _adapt(forward_op, backward_op):
    """The kernel ops return empty tensors for absent results; the interface returns None."""

    def forward(x, residual, weight, bias, eps, rms, weight_offset=0.0):
        y, residual_out, mean, rstd = forward_op(x, residual, weight, bias, eps, rms, weight_offset)
        return y, residual_out if residual is not None else None, None if rms else mean, rstd

    def backward(dy, dresidual_out, xin, weight, mean, rstd, need_dweight, need_dbias, weight_offset=0.0):
        dx, dweight, dbias = backward_op(dy, dresidual_out, xin, weight, mean, rstd, need_dweight, need_dbias,
                                         weight_offset)
        return dx, dweight if need_dweight else None, dbias if need_dbias else None

    return forward, backward


BACKENDS = [
    registry.Backend("cuda", availability.cuda, _cuda_supports, *_adapt(cpp.forward, cpp.backward)),
    registry.Backend("cpu", availability.cpu, _cpu_supports, *_adapt(cpp.forward, cpp.backward)),
    registry.Backend("triton", availability.triton, _triton_supports, *_adapt(triton.forward, triton.backward)),
    registry.Backend("reference", availability.reference, _reference_supports, norm_forward_ref, norm_backward_ref),
]

for _op in NORM_OPS:
    registry.register(_op, BACKENDS)
