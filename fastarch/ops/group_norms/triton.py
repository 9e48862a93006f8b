"""group_norm's Triton kernels as torch ops: not written yet. This placeholder keeps the
interface the backend table calls (the h/gn-gpu branch replaces the file with triton_op wrappers
of kernels/group_norms.py): ``unavailable()`` says why the row cannot run (None once built),
``group_norm_forward`` / ``group_norm_backward`` take the kernel-level arguments of reference.py
and return empty tensors for absent gradients, as the C++ kernel ops."""

from __future__ import annotations

from torch import Tensor

from fastarch.registry import MachineReason

_NOT_BUILT = MachineReason("triton group_norm not built yet")


def unavailable() -> str | None:
    return _NOT_BUILT


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
    raise NotImplementedError(_NOT_BUILT)


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
    raise NotImplementedError(_NOT_BUILT)
