"""GEGLU: the gated feed-forward input layer of diffusion UNets' transformer blocks, with the
layout of diffusers' ``diffusers.models.activations.GEGLU`` (one Linear ``proj`` to 2 * dim_out,
whose first half is multiplied by the GELU of its second), running fastarch.ops.geglu."""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import ops
from fastarch.nn.linear import Linear


class GEGLU(torch.nn.Module):
    """x (..., dim_in) -> up * gelu(gate) (..., dim_out), where (up, gate) = proj(x).chunk(2, -1).

    The same parameters and state_dict keys as diffusers' GEGLU (``proj.weight`` (2 * dim_out,
    dim_in), ``proj.bias``), so its checkpoints load unchanged. approximate: "none" (erf form,
    diffusers') or "tanh". Runs fastarch.ops.geglu_packed on the projection: its halves are
    read in place, and its gradient is written whole (no copy either way).
    """

    def __init__(
        self, dim_in: int, dim_out: int, bias: bool = True, approximate: str = "none", device=None, dtype=None
    ) -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GEGLU: approximate must be 'none' (erf) or 'tanh', got {approximate!r}")
        self.proj = Linear(dim_in, dim_out * 2, bias=bias, device=device, dtype=dtype)  # fastarch.nn.Linear
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return ops.geglu_packed(self.proj(x), self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"

    @classmethod
    def from_diffusers(cls, module: torch.nn.Module) -> GEGLU:
        """A fastarch GEGLU sharing the ``proj`` Linear (and so its parameters: no copy) of
        ``module``, a ``diffusers.models.activations.GEGLU`` (its GELU is the erf form)."""
        proj = getattr(module, "proj", None)
        if not isinstance(proj, torch.nn.Linear) or proj.out_features % 2:
            raise TypeError(f"GEGLU.from_diffusers: expected a diffusers GEGLU (a Linear proj to 2 * dim_out), got {type(module).__name__}")
        new = cls(proj.in_features, proj.out_features // 2, bias=proj.bias is not None, device="meta")
        new.proj = proj
        return new.train(module.training)
