"""group_norm's two memory layouts as the kernels see them: (N, C, *spatial) as a contiguous
3-D (N, C, S), or channels-last (N, *spatial, C) memory as (N, S, C), without a layout copy."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def is_channels_last(x: Tensor) -> bool:
    """Whether x's memory is (N, *spatial, C): the channel dim has stride 1 and the rest are
    dense (torch.channels_last / channels_last_3d, for any number of spatial dims). A tensor
    contiguous both ways (one channel, or one position) counts as contiguous."""
    if x.dim() < 3 or x.is_contiguous():
        return False
    if x.dim() in _CHANNELS_LAST:  # (torch's own test: the same answer, a fifth of the time)
        return x.is_contiguous(memory_format=_CHANNELS_LAST[x.dim()])
    return x.permute(0, *range(2, x.dim()), 1).is_contiguous()


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def to_3d(t: Tensor, channels_last: bool) -> Tensor:
    """(N, C, *spatial) -> the kernels' contiguous 3-D view: (N, S, C) when channels_last, else
    (N, C, S); copies only a tensor not already in that layout (dy may come in any)."""
    if not channels_last and t.dim() > 2 and t.is_contiguous() and t.numel():  # the common case: one view
        return t.view(t.shape[0], t.shape[1], -1)
    n, c, s = t.shape[0], t.shape[1], math.prod(t.shape[2:])  # (s explicit: N may be 0)
    if channels_last:
        if is_channels_last(t):  # a view of the same memory (~1 us where the permute took ~3)
            return t.as_strided((n, s, c), (s * c, c, 1), t.storage_offset())
        return t.permute(0, *range(2, t.dim()), 1).reshape(n, s, c).contiguous()
    return t.reshape(n, c, s).contiguous()


def from_3d(t3: Tensor, like: Tensor, channels_last: bool) -> Tensor:
    """The inverse of to_3d: like's shape (N, C, *spatial) in the memory layout of t3.
    (view_as: a view to a torch.Size parses it element by element, ~2 us of a small call.)"""
    if channels_last:  # (N, C, *spatial) with channels-last strides over t3's memory
        shape = like.shape
        stride, step = [0] * len(shape), shape[1]
        stride[1] = 1
        for dim in range(len(shape) - 1, 1, -1):
            stride[dim] = step
            step *= shape[dim]
        stride[0] = step
        return t3.as_strided(shape, stride, t3.storage_offset())
    return t3.view_as(like)
