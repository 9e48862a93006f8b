"""The rotary embedding's backends, in priority order, each with what it supports: the one
table. All four share one kernel-level interface (see reference.py): forward(q, k, cos, sin,
positions, interleaved, inverse) -> (q_out, k_out); the backward is the same call with
inverse=True on the output gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastarch import availability, registry
from fastarch.ops.rope import cpp, triton
from fastarch.ops.rope.reference import rotary_ref

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class RotaryProblem(NamedTuple):
    """What the backends need to know to say whether they can run a rotary embedding."""

    device: str
    dtype: torch.dtype
    head_dim: int
    rot_dim: int

    @classmethod
    def of(cls, q: Tensor, cos: Tensor) -> RotaryProblem:
        return cls(q.device.type, q.dtype, q.shape[-1], 2 * cos.shape[-1])

    def __str__(self) -> str:
        return f"q and k of head dim {self.head_dim} (rotary dim {self.rot_dim}), {self.dtype} on {self.device}"


def _cpu_supports(p: RotaryProblem) -> str | None:
    return registry.device_reason(p.device, "cpu") or registry.dtype_reason(p.dtype, KERNEL_DTYPES + (torch.float64,))


def _cuda_supports(p: RotaryProblem) -> str | None:
    return (
        registry.device_reason(p.device, "cuda")
        or registry.dtype_reason(p.dtype, KERNEL_DTYPES)
        or availability.cuda_device_reason()
    )


def _triton_supports(p: RotaryProblem) -> str | None:
    return availability.triton_device_reason(p.device) or registry.dtype_reason(p.dtype, KERNEL_DTYPES)


def _reference_supports(p: RotaryProblem) -> str | None:
    return None


BACKENDS = [
    registry.Backend("cuda", availability.cuda, _cuda_supports, cpp.forward),
    registry.Backend("cpu", availability.cpu, _cpu_supports, cpp.forward),
    registry.Backend("triton", availability.triton, _triton_supports, triton.forward),
    registry.Backend("reference", availability.reference, _reference_supports, rotary_ref),
]

registry.register("rotary", BACKENDS)
