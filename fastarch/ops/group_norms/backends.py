"""group_norm's backends, in priority order, each with what it supports: the one table.

All four share one kernel-level interface (reference.py): forward(x, num_groups, weight, bias,
scale, shift, eps, silu, channels_last) -> (y, mean, rstd) and backward(dy, x, mean, rstd,
num_groups, weight, bias, scale, shift, silu, channels_last, need_dweight, need_dscale) ->
(dx, dweight, dbias, dscale, dshift), absent gradients None, on 3-D contiguous x: (N, C, S), or
(N, S, C) when channels_last.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastarch import availability, registry
from fastarch.ops.group_norms import cpp, triton
from fastarch.ops.group_norms.reference import group_norm_backward_ref, group_norm_forward_ref

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class GroupNormProblem(NamedTuple):
    """What the backends need to know to say whether they can run a group_norm."""

    device: str
    dtype: torch.dtype
    batch: int
    channels: int
    spatial: int
    groups: int
    channels_last: bool

    @classmethod
    def of(cls, x3: Tensor, num_groups: int, channels_last: bool) -> GroupNormProblem:
        n, a, b = x3.shape
        c, s = (b, a) if channels_last else (a, b)
        return cls(x3.device.type, x3.dtype, n, c, s, num_groups, channels_last)

    def __str__(self) -> str:
        layout = "channels-last" if self.channels_last else "channels-first"
        return (
            f"x of {self.batch} samples x {self.channels} channels x {self.spatial} positions ({layout}), "
            f"{self.groups} groups, {self.dtype} on {self.device}"
        )


def _cpu_available() -> str | None:
    return availability.cpu() or cpp.kernels_missing("CPU")


def _cuda_available() -> str | None:
    return availability.cuda() or cpp.kernels_missing("CUDA")


def _triton_available() -> str | None:
    return triton.unavailable() or availability.triton()


def _cpu_supports(p: GroupNormProblem) -> str | None:
    return registry.device_reason(p.device, "cpu") or registry.dtype_reason(p.dtype, KERNEL_DTYPES + (torch.float64,))


def _cuda_supports(p: GroupNormProblem) -> str | None:
    return (
        registry.device_reason(p.device, "cuda")
        or registry.dtype_reason(p.dtype, KERNEL_DTYPES)
        or availability.cuda_device_reason()
    )


def _triton_supports(p: GroupNormProblem) -> str | None:
    return availability.triton_device_reason(p.device) or registry.dtype_reason(p.dtype, KERNEL_DTYPES)


def _reference_supports(p: GroupNormProblem) -> str | None:
    return None


def _adapt(forward_op, backward_op):
    """The kernel ops return empty tensors for absent gradients; the interface returns None."""

    def backward(dy, x, mean, rstd, num_groups, weight, bias, scale, shift, silu, channels_last, need_dweight, need_dscale):
        dx, dweight, dbias, dscale, dshift = backward_op(
            dy, x, mean, rstd, num_groups, weight, bias, scale, shift, silu, channels_last, need_dweight, need_dscale
        )
        return (
            dx,
            dweight if need_dweight and weight is not None else None,
            dbias if need_dweight and bias is not None else None,
            dscale if need_dscale and scale is not None else None,
            dshift if need_dscale and shift is not None else None,
        )

    return forward_op, backward


BACKENDS = [
    registry.Backend("cuda", _cuda_available, _cuda_supports, *_adapt(cpp.forward, cpp.backward)),
    registry.Backend("cpu", _cpu_available, _cpu_supports, *_adapt(cpp.forward, cpp.backward)),
    registry.Backend(
        "triton", _triton_available, _triton_supports, *_adapt(triton.group_norm_forward, triton.group_norm_backward)
    ),
    registry.Backend("reference", availability.reference, _reference_supports, group_norm_forward_ref, group_norm_backward_ref),
]

registry.register("group_norm", BACKENDS)
