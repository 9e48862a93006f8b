"""Stand-ins, in plain torch, for two ops other helpers are writing as fastarch kernels
(issue 12): ``fastarch.ops.group_norm`` and ``fastarch.ops.geglu``. The signatures and the math
are the agreed ones (/work/wt/notes/group_norm_spec.md); when the kernels merge, the UNet's
import of this module becomes ``from fastarch import ops`` and this file goes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5, *,
    scale: Tensor | None = None, shift: Tensor | None = None, activation: str | None = None,
) -> Tensor:
    """y = act((xhat * weight + bias) * (1 + scale) + shift). x: (N, C, *spatial); weight,
    bias: (C,); scale, shift: (N, C); activation None or "silu"."""
    if activation not in (None, "silu"):
        raise ValueError(f"group_norm: activation must be None or 'silu', got {activation!r}")
    y = F.group_norm(x, num_groups, weight, bias, eps)
    extra = (1,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1 + scale.reshape(*scale.shape, *extra))
    if shift is not None:
        y = y + shift.reshape(*shift.shape, *extra)
    return F.silu(y) if activation == "silu" else y


def geglu(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    """gelu(gate) * up, elementwise (gate and up of one shape)."""
    return F.gelu(gate, approximate=approximate) * up
