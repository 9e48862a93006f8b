"""The norms' Triton kernels (kernels/norms.py) as torch ops (``torch.library.triton_op``), so
that torch.compile sees into them on GPU. Absent optional results come back as empty tensors,
as from the C++ kernel ops (cpp.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import availability

try:
    from fastarch.kernels import norms as _kernels
except ImportError:  # triton is not installed: fastarch.availability.triton() says so
    _kernels = None

if _kernels is not None and availability.TRITON_OPS:  # (registered where they can run)

    @torch.library.triton_op("fastarch::_triton_norm_fwd", mutates_args=())
    def _triton_norm_fwd(
        x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool,
        weight_offset: float = 0.0,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        y, residual_out, mean, rstd = _kernels.norm_forward(x, residual, weight, bias, eps, rms, weight_offset)
        empty = rstd.new_empty(0)
        return y, residual_out if residual_out is not None else x.new_empty(0), mean if mean is not None else empty, rstd

    @torch.library.triton_op("fastarch::_triton_norm_bwd", mutates_args=())
    def _triton_norm_bwd(
        dy: Tensor,
        dresidual_out: Tensor | None,
        xin: Tensor,
        weight: Tensor | None,
        mean: Tensor | None,
        rstd: Tensor,
        need_dweight: bool,
        need_dbias: bool,
        weight_offset: float = 0.0,
    ) -> tuple[Tensor, Tensor, Tensor]:
        dx, dweight, dbias = _kernels.norm_backward(dy, dresidual_out, xin, weight, mean, rstd, need_dweight, need_dbias,
                                                    weight_offset)
        return dx, dweight if dweight is not None else xin.new_empty(0), dbias if dbias is not None else xin.new_empty(0)


def forward(*args):
    return torch.ops.fastarch._triton_norm_fwd(*args)


def backward(*args):
    return torch.ops.fastarch._triton_norm_bwd(*args)
