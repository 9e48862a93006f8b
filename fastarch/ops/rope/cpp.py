"""The rotary embedding's C++ kernel op (fastarch::_rotary, csrc/ops.cpp; implemented in
csrc/cpu/rope for the CPU and csrc/cuda/rope for CUDA) and its fake implementation."""

from __future__ import annotations

import torch

from fastarch import availability


def forward(*args):
    return torch.ops.fastarch._rotary(*args)


if availability.cpu() is None:  # _C loaded: its op needs a fake for torch.compile and opcheck

    @torch.library.register_fake("fastarch::_rotary")
    def _(q, k, cos, sin, positions, interleaved, inverse):
        return torch.empty_like(q), torch.empty_like(k)
