"""The norms' C++ kernel ops (fastarch::_norm_fwd / _norm_bwd, csrc/ops.cpp; implemented in
csrc/cpu/norms for the CPU and csrc/cuda/norms for CUDA) and their fake implementations.
Absent optional results come back as empty tensors (backends.py adapts them)."""

from __future__ import annotations

import torch

from fastarch import availability
from fastarch.ops.norms.reference import stats_dtype


def forward(*args):
    return torch.ops.fastarch._norm_fwd(*args)


def backward(*args):
    return torch.ops.fastarch._norm_bwd(*args)


if availability.cpu() is None:  # _C loaded: its ops need fakes for torch.compile and opcheck

    @torch.library.register_fake("fastarch::_norm_fwd")
    def _(x, residual, weight, bias, eps, rms, weight_offset=0.0):
        rows, cols = x.shape
        stats = stats_dtype(x.dtype)
        return (
            x.new_empty(rows, cols),
            x.new_empty((rows, cols) if residual is not None else (0,)),
            x.new_empty(0 if rms else rows, dtype=stats),
            x.new_empty(rows, dtype=stats),
        )

    @torch.library.register_fake("fastarch::_norm_bwd")
    def _(dy, dresidual_out, xin, weight, mean, rstd, need_dweight, need_dbias, weight_offset=0.0):
        cols = xin.shape[1]
        return xin.new_empty(xin.shape), xin.new_empty(cols if need_dweight else 0), xin.new_empty(cols if need_dbias else 0)
