"""The backends of the norm ops, in priority order, each with what it supports.

All four share one kernel-level interface (see norms_reference.py): forward(x, residual,
weight, bias, eps, rms) and backward(dy, dresidual_out, xin, weight, mean, rstd,
need_dweight, need_dbias) on 2-D (rows, cols) inputs with contiguous columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastarch import availability, registry
from fastarch.ops import norms_triton  # noqa: F401  (defines torch.ops.fastarch._triton_norm_*)
from fastarch.ops.norms_reference import norm_backward_ref, norm_forward_ref

NORM_OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class NormProblem:
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


def _dtype_reason(p: NormProblem, allowed: tuple[torch.dtype, ...]) -> str | None:
    if p.dtype in allowed:
        return None
    return f"dtype {p.dtype} is not supported (supported: {', '.join(str(d) for d in allowed)})"


def _cpu_supports(p: NormProblem) -> str | None:
    if p.device != "cpu":
        return f"input is on {p.device}; this backend runs CPU tensors"
    return _dtype_reason(p, KERNEL_DTYPES + (torch.float64,))


def _cuda_supports(p: NormProblem) -> str | None:
    if p.device != "cuda":
        return f"input is on {p.device}; this backend runs CUDA tensors"
    return _dtype_reason(p, KERNEL_DTYPES)


def _triton_supports(p: NormProblem) -> str | None:
    if p.device == "cpu" and not availability.triton_interpreter():
        return "input is on cpu; Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1)"
    if p.device not in ("cpu", "cuda"):
        return f"input is on {p.device}; this backend runs CUDA tensors"
    return _dtype_reason(p, KERNEL_DTYPES)


def _reference_supports(p: NormProblem) -> str | None:
    return None


def _wrap_forward(op):
    """Adapts a torch op that returns empty tensors for absent results to the interface."""

    def forward(x, residual, weight, bias, eps, rms):
        y, residual_out, mean, rstd = op(x, residual, weight, bias, eps, rms)
        return y, residual_out if residual is not None else None, None if rms else mean, rstd

    return forward


def _wrap_backward(op):
    def backward(dy, dresidual_out, xin, weight, mean, rstd, need_dweight, need_dbias):
        dx, dweight, dbias = op(dy, dresidual_out, xin, weight, mean, rstd, need_dweight, need_dbias)
        return dx, dweight if need_dweight else None, dbias if need_dbias else None

    return backward


def _cpp_op(name: str):
    """torch.ops.fastarch.<name>, looked up at call time (it exists only when _C loaded)."""
    return lambda *args: getattr(torch.ops.fastarch, name)(*args)


_CPP = (_wrap_forward(_cpp_op("_norm_fwd")), _wrap_backward(_cpp_op("_norm_bwd")))
_TRITON = (_wrap_forward(_cpp_op("_triton_norm_fwd")), _wrap_backward(_cpp_op("_triton_norm_bwd")))

_BACKENDS = [
    registry.Backend("cuda", availability.cuda, _cuda_supports, *_CPP),
    registry.Backend("cpu", availability.cpu, _cpu_supports, *_CPP),
    registry.Backend("triton", availability.triton, _triton_supports, *_TRITON),
    registry.Backend("reference", availability.reference, _reference_supports, norm_forward_ref, norm_backward_ref),
]

for _op in NORM_OPS:
    registry.register(_op, _BACKENDS)


# The C++ kernel ops need fake implementations of their own for torch.compile and opcheck.
if availability.cpu() is None:

    @torch.library.register_fake("fastarch::_norm_fwd")
    def _(x, residual, weight, bias, eps, rms):
        rows, cols = x.shape
        stats = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (
            x.new_empty(rows, cols),
            x.new_empty((rows, cols) if residual is not None else (0,)),
            x.new_empty(0 if rms else rows, dtype=stats),
            x.new_empty(rows, dtype=stats),
        )

    @torch.library.register_fake("fastarch::_norm_bwd")
    def _(dy, dresidual_out, xin, weight, mean, rstd, need_dweight, need_dbias):
        cols = xin.shape[1]
        return xin.new_empty(xin.shape), xin.new_empty(cols if need_dweight else 0), xin.new_empty(cols if need_dbias else 0)
