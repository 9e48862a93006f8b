"""group_norm's Triton kernels (kernels/group_norms.py) as torch ops (``torch.library.triton_op``),
so that torch.compile sees into them on GPU. The kernel-level interface of every backend (see
reference.py); absent gradients come back as empty tensors, as from the C++ kernel ops."""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import availability
from fastarch.registry import MachineReason

try:
    from fastarch.kernels import group_norms as _kernels

    _IMPORT_ERROR = None
except ImportError as e:  # triton is not installed (fastarch.availability.triton() says so)
    _kernels = None
    _IMPORT_ERROR = e

if _kernels is not None and availability.TRITON_OPS:  # (registered where they can run)

    @torch.library.triton_op("fastarch::_triton_group_norm_fwd", mutates_args=())
    def _triton_group_norm_fwd(
        x: Tensor,
        num_groups: int,
        weight: Tensor | None,
        bias: Tensor | None,
        scale: Tensor | None,
        shift: Tensor | None,
        eps: float,
        silu: bool,
        channels_last: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _kernels.group_norm_forward(x, num_groups, weight, bias, scale, shift, eps, silu, channels_last)

    @torch.library.triton_op("fastarch::_triton_group_norm_bwd", mutates_args=())
    def _triton_group_norm_bwd(
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        rstd: Tensor,
        num_groups: int,
        weight: Tensor | None,
        bias: Tensor | None,
        scale: Tensor | None,
        shift: Tensor | None,
        silu: bool,
        channels_last: bool,
        need_dweight: bool,
        need_dscale: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        grads = _kernels.group_norm_backward(
            dy, x, mean, rstd, num_groups, weight, bias, scale, shift, silu, channels_last, need_dweight, need_dscale
        )
        dx, rest = grads[0], grads[1:]
        return (dx, *(g if g is not None else x.new_empty(0) for g in rest))


def unavailable() -> str | None:
    """Why the Triton group_norm cannot run in this installation (None: it can)."""
    return None if _kernels is not None else MachineReason(f"the Triton kernels cannot be imported: {_IMPORT_ERROR}")


def group_norm_forward(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    eps: float,
    silu: bool,
    channels_last: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """x: (N, C, S), or (N, S, C) when channels_last, contiguous. Returns y (x's shape), mean
    and rstd (N, num_groups) fp32."""
    return torch.ops.fastarch._triton_group_norm_fwd(
        x, num_groups, weight, bias, scale, shift, eps, silu, channels_last
    )


def group_norm_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    silu: bool,
    channels_last: bool,
    need_dweight: bool,
    need_dscale: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns dx (x's shape), dweight, dbias (C,), dscale, dshift (N, C), each empty when not
    wanted (see reference.group_norm_backward_ref)."""
    return torch.ops.fastarch._triton_group_norm_bwd(
        dy, x, mean, rstd, num_groups, weight, bias, scale, shift, silu, channels_last, need_dweight, need_dscale
    )
