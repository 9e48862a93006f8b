"""Building blocks shared by the model families."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastarch import ops


class LayerNorm(nn.Module):
    """The parameters of a LayerNorm; the blocks call fastarch's norm ops with them, fused with
    the residual add where there is one."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def add(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """(norm(x + residual), x + residual)."""
        return ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps)
