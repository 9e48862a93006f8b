"""The rotary embedding's Triton kernel (kernels/rope.py) as a torch op
(``torch.library.triton_op``), so that torch.compile sees into it on GPU."""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import availability

try:
    from fastarch.kernels import rope as _kernels
except ImportError:  # triton is not installed: fastarch.availability.triton() says so
    _kernels = None

if _kernels is not None and availability.TRITON_OPS:  # (registered where they can run)

    @torch.library.triton_op("fastarch::_triton_rotary", mutates_args=())
    def _triton_rotary(
        q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None, interleaved: bool, inverse: bool
    ) -> tuple[Tensor, Tensor]:
        return _kernels.rotary_forward(q, k, cos, sin, positions, interleaved, inverse)


def forward(*args):
    return torch.ops.fastarch._triton_rotary(*args)
