"""Row views shared by the op families that work on the last dimension (norms, activations),
and the last-dim-contiguous copy that attention and rotary hand their kernels."""

from __future__ import annotations

import torch
from torch import Tensor


def as_rows(t: Tensor) -> Tensor:
    """t as a 2-D (rows, cols) tensor with contiguous columns; a view when strides allow."""
    n = t.shape[-1]
    if t.dim() == 2 and (n == 1 or t.stride(1) == 1):
        return t
    # the common case: one view, nothing to check after it (an empty t may be contiguous with
    # any strides, an expanded gradient's 0 among them: last_dim_contiguous copies it below)
    if n and t.numel() and t.is_contiguous():
        return t.view(-1, n)
    try:
        rows = t.view(-1, n)
    except RuntimeError:  # leading dims not collapsible
        rows = t.reshape(-1, n)
    return rows if n == 1 else last_dim_contiguous(rows)


def last_dim_contiguous(t: Tensor) -> Tensor:
    """t, or a copy of it with a contiguous last dim (differentiable), an empty t too: an empty
    gradient comes expanded, strides 0, which .contiguous() keeps (it counts as contiguous)."""
    if t.stride(-1) == 1:
        return t
    return t.contiguous() if t.numel() else t.clone(memory_format=torch.contiguous_format)


def contiguous_or_none(t: Tensor | None) -> Tensor | None:
    """t contiguous (itself when it already is), or None: an optional parameter as the kernels take it."""
    return t if t is None else t.contiguous()
