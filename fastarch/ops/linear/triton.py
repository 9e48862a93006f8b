"""The linear layer's Triton kernel (kernels/linear.py) as a torch op
(``torch.library.triton_op``), so that torch.compile sees into it on GPU."""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import availability

try:
    from fastarch.kernels import linear as _kernels
except ImportError:  # triton is not installed: fastarch.availability.triton() says so
    _kernels = None

if _kernels is not None and availability.TRITON_OPS:  # (registered where they can run)

    @torch.library.triton_op("fastarch::_triton_linear", mutates_args=())
    def _triton_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _kernels.linear_forward(x, weight, bias)


def forward(x, weight, bias):
    return torch.ops.fastarch._triton_linear(x, weight, bias)
