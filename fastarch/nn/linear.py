"""``Linear``: a drop-in subclass of torch.nn.Linear running fastarch.ops.linear, which streams
the weight once for a few rows of input (a decode step's tokens; about twice PyTorch's GEMV on a
CPU) and runs PyTorch's GEMM for more. Same constructor, parameters and state_dict keys."""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import ops
from fastarch.nn._source import check_source


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """fastarch.ops.linear; torch's under autocast (which casts x and the weight; the op takes
    one dtype)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.nn.functional.linear(x, weight, bias)
    return ops.linear(x, weight, bias)


class Linear(torch.nn.Linear):
    """torch.nn.Linear running fastarch.ops.linear. x: (..., in_features) -> (..., out_features).
    Under autocast it runs torch's (autocast casts x and the weight; the op takes one dtype)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)

    @classmethod
    def from_torch(cls, module: torch.nn.Linear) -> Linear:
        """A fastarch Linear sharing ``module``'s parameters (no copy)."""
        check_source(cls, module, torch.nn.Linear)
        new = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        new.weight, new.bias = module.weight, module.bias
        return new.train(module.training)
