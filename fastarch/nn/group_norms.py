"""GroupNorm modules: ``GroupNorm``, a drop-in subclass of torch.nn.GroupNorm, and
``GroupNormSiLU``, the diffusion UNet's norm followed by SiLU (with the per-sample scale/shift
of a time embedding) in one pass. Both run fastarch.ops.group_norm (any backend; see
fastarch.backend), keep x's memory format (channels-last in, channels-last out) and hold
torch.nn.GroupNorm's parameters and state_dict keys."""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import ops
from fastarch.nn._source import check_source


def _sharing(cls, module: torch.nn.GroupNorm):
    """A ``cls`` with ``module``'s configuration, sharing its parameters (no copy)."""
    check_source(cls, module, torch.nn.GroupNorm)
    new = cls(module.num_groups, module.num_channels, eps=module.eps, affine=module.affine, device="meta")
    new.weight, new.bias = module.weight, module.bias
    return new.train(module.training)


class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm running fastarch.ops.group_norm. x: (N, C, *spatial)."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    @classmethod
    def from_torch(cls, module: torch.nn.GroupNorm) -> GroupNorm:
        """A fastarch GroupNorm sharing ``module``'s parameters (no copy)."""
        return _sharing(cls, module)


class GroupNormSiLU(torch.nn.GroupNorm):
    """silu(GroupNorm(x) * (1 + scale) + shift), fused: diffusers' ResnetBlock2D norm and
    nonlinearity (its "scale_shift" time-embedding norm when scale/shift are given).

    A subclass of torch.nn.GroupNorm for its constructor, parameters and state_dict keys (load a
    GroupNorm's weights into it); its output is the norm followed by SiLU.
    """

    def forward(self, x: Tensor, scale: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
        """x: (N, C, *spatial); scale, shift: (N, C) or None, x's dtype. Returns x's shape and
        memory format."""
        return ops.group_norm(
            x, self.num_groups, self.weight, self.bias, self.eps, scale=scale, shift=shift, activation="silu"
        )

    @classmethod
    def from_torch(cls, module: torch.nn.GroupNorm) -> GroupNormSiLU:
        """The fused norm + SiLU sharing ``module``'s (the GroupNorm's) parameters."""
        return _sharing(cls, module)
