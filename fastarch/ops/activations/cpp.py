"""The activations' C++ kernel ops (fastarch::_bias_gelu_fwd / _bias_gelu_bwd, and
_gated_act_fwd / _gated_act_bwd (and _gated_act_bwd_packed) serving swiglu and geglu; csrc/ops.cpp;
implemented in csrc/cpu/activations for the CPU and csrc/cuda/activations for CUDA) and their
fake implementations. The bias gradient comes back as an empty tensor when not wanted."""

from __future__ import annotations

import torch

from fastarch import availability


def bias_gelu_forward(x, bias, approximate):
    return torch.ops.fastarch._bias_gelu_fwd(x, bias, approximate == "tanh")


def bias_gelu_backward(dy, x, bias, approximate, need_dbias):
    dx, dbias = torch.ops.fastarch._bias_gelu_bwd(dy, x, bias, approximate == "tanh", need_dbias)
    return dx, dbias if need_dbias else None


def gated_forward(gate, up, act):
    return torch.ops.fastarch._gated_act_fwd(gate, up, act)


def gated_backward(dy, gate, up, act):
    return torch.ops.fastarch._gated_act_bwd(dy, gate, up, act)


def gated_backward_packed(dy, proj, act):
    return torch.ops.fastarch._gated_act_bwd_packed(dy, proj, act)


if availability.cpu() is None:  # _C loaded: its ops need fakes for torch.compile and opcheck

    @torch.library.register_fake("fastarch::_bias_gelu_fwd")
    def _(x, bias, tanh):
        return x.new_empty(x.shape)

    @torch.library.register_fake("fastarch::_bias_gelu_bwd")
    def _(dy, x, bias, tanh, need_dbias):
        return x.new_empty(x.shape), x.new_empty(x.shape[1] if need_dbias else 0)

    @torch.library.register_fake("fastarch::_gated_act_fwd")
    def _(gate, up, act):
        return gate.new_empty(gate.shape)

    @torch.library.register_fake("fastarch::_gated_act_bwd")
    def _(dy, gate, up, act):
        return gate.new_empty(gate.shape), gate.new_empty(gate.shape)

    @torch.library.register_fake("fastarch::_gated_act_bwd_packed")
    def _(dy, proj, act):
        return proj.new_empty(proj.shape)
