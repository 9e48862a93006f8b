"""The quantized linear layer's Triton kernel (kernels/qlinear.py) as a torch op
(``torch.library.triton_op``), so that torch.compile sees into it on GPU."""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import availability

try:
    from fastarch.kernels import qlinear as _kernels
except ImportError:  # triton is not installed: fastarch.availability.triton() says so
    _kernels = None

if _kernels is not None and availability.TRITON_OPS:  # (registered where they can run)

    @torch.library.triton_op("fastarch::_triton_quantized_linear", mutates_args=())
    def _triton_quantized_linear(x: Tensor, blocks: Tensor, quant: str, bias: Tensor | None) -> Tensor:
        return _kernels.quantized_linear_forward(x, blocks, quant, bias)


def forward(x, blocks, quant, bias):
    return torch.ops.fastarch._triton_quantized_linear(x, blocks, quant, bias)
