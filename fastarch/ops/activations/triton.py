"""The activations' Triton kernels (kernels/activations.py) as torch ops
(``torch.library.triton_op``), so that torch.compile sees into them on GPU. The bias gradient
comes back as an empty tensor when not wanted, as from the C++ kernel ops (cpp.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import availability

try:
    from fastarch.kernels import activations as _kernels
except ImportError:  # triton is not installed: fastarch.availability.triton() says so
    _kernels = None

if _kernels is not None and availability.TRITON_OPS:  # (registered where they can run)

    @torch.library.triton_op("fastarch::_triton_bias_gelu_fwd", mutates_args=())
    def _triton_bias_gelu_fwd(x: Tensor, bias: Tensor | None, tanh: bool) -> Tensor:
        return _kernels.activation_forward(x, None, bias, "gelu_tanh" if tanh else "gelu")

    @torch.library.triton_op("fastarch::_triton_bias_gelu_bwd", mutates_args=())
    def _triton_bias_gelu_bwd(
        dy: Tensor, x: Tensor, bias: Tensor | None, tanh: bool, need_dbias: bool
    ) -> tuple[Tensor, Tensor]:
        dx, _, dbias = _kernels.activation_backward(dy, x, None, bias, "gelu_tanh" if tanh else "gelu", need_dbias)
        return dx, dbias if dbias is not None else x.new_empty(0)

    @torch.library.triton_op("fastarch::_triton_gated_act_fwd", mutates_args=())
    def _triton_gated_act_fwd(gate: Tensor, up: Tensor, act: str) -> Tensor:
        return _kernels.activation_forward(gate, up, None, act)

    @torch.library.triton_op("fastarch::_triton_gated_act_bwd", mutates_args=())
    def _triton_gated_act_bwd(dy: Tensor, gate: Tensor, up: Tensor, act: str) -> tuple[Tensor, Tensor]:
        dgate, dup, _ = _kernels.activation_backward(dy, gate, up, None, act, False)
        return dgate, dup

    @torch.library.triton_op("fastarch::_triton_gated_act_bwd_packed", mutates_args=())
    def _triton_gated_act_bwd_packed(dy: Tensor, proj: Tensor, act: str) -> Tensor:
        up, gate = proj.chunk(2, dim=-1)
        dproj = torch.empty(proj.shape, dtype=proj.dtype, device=proj.device)
        _kernels.activation_backward(dy, gate, up, None, act, False, out=dproj)
        return dproj


def bias_gelu_forward(x, bias, approximate):
    return torch.ops.fastarch._triton_bias_gelu_fwd(x, bias, approximate == "tanh")


def bias_gelu_backward(dy, x, bias, approximate, need_dbias):
    dx, dbias = torch.ops.fastarch._triton_bias_gelu_bwd(dy, x, bias, approximate == "tanh", need_dbias)
    return dx, dbias if need_dbias else None


def gated_forward(gate, up, act):
    return torch.ops.fastarch._triton_gated_act_fwd(gate, up, act)


def gated_backward(dy, gate, up, act):
    return torch.ops.fastarch._triton_gated_act_bwd(dy, gate, up, act)


def gated_backward_packed(dy, proj, act):
    return torch.ops.fastarch._triton_gated_act_bwd_packed(dy, proj, act)
