"""group_norm's C++ kernel ops (fastarch::_group_norm_fwd / _group_norm_bwd, csrc/ops.cpp;
implemented in csrc/cpu/group_norms for the CPU and csrc/cuda/group_norms for CUDA) and their
fake implementations. Absent gradients come back as empty tensors (backends.py adapts them)."""

from __future__ import annotations

import functools

import torch

from fastarch import availability, registry
from fastarch.ops.norms.reference import stats_dtype


@functools.cache
def kernels_missing(dispatch_key: str) -> str | None:
    """Why this build has no group_norm kernel for ``dispatch_key`` ("CPU", "CUDA"), or None.
    (An extension built before the op existed, or without its CUDA files.)"""
    try:
        has = torch._C._dispatch_has_kernel_for_dispatch_key("fastarch::_group_norm_fwd", dispatch_key)
    except RuntimeError:
        has = False
    return None if has else registry.MachineReason(f"this build of fastarch._C has no {dispatch_key} group_norm kernels")


def forward(*args):
    return torch.ops.fastarch._group_norm_fwd(*args)


def backward(*args):
    return torch.ops.fastarch._group_norm_bwd(*args)


if availability.cpu() is None and hasattr(torch.ops.fastarch, "_group_norm_fwd"):
    # _C loaded with these ops: they need fakes for torch.compile and opcheck

    @torch.library.register_fake("fastarch::_group_norm_fwd")
    def _(x, num_groups, weight, bias, scale, shift, eps, silu, channels_last):
        stats = x.new_empty((x.shape[0], num_groups), dtype=stats_dtype(x.dtype))
        return x.new_empty(x.shape), stats, stats.new_empty(stats.shape)

    @torch.library.register_fake("fastarch::_group_norm_bwd")
    def _(dy, x, mean, rstd, num_groups, weight, bias, scale, shift, silu, channels_last, need_dweight, need_dscale):
        n, c = x.shape[0], x.shape[2 if channels_last else 1]

        def grad(wanted: bool, shape: tuple) -> torch.Tensor:
            return x.new_empty(shape if wanted else (0,))

        return (
            x.new_empty(x.shape),
            grad(need_dweight and weight is not None, (c,)),
            grad(need_dweight and bias is not None, (c,)),
            grad(need_dscale and scale is not None, (n, c)),
            grad(need_dscale and shift is not None, (n, c)),
        )
