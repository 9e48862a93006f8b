"""fastarch.ops.group_norm in plain torch, with the agreed signature, until the kernel op merges
(the lead then swaps the import in dcgan.py for ``from fastarch.ops import group_norm``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5, *,
    scale: Tensor | None = None, shift: Tensor | None = None, activation: str | None = None, backend: str | None = None,
) -> Tensor:
    """GroupNorm over (N, C, *spatial), then y = u * (1 + scale) + shift with scale, shift (N, C),
    then SiLU when activation == "silu"."""
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if x.dim() < 2 or x.shape[1] % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the channel count C ({x.shape[1] if x.dim() > 1 else None})")
    y = F.group_norm(x, num_groups, weight, bias, eps)
    expand = (slice(None), slice(None)) + (None,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1 + scale[expand])
    if shift is not None:
        y = y + shift[expand]
    return F.silu(y) if activation == "silu" else y
