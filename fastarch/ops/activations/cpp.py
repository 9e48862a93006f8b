"""The activations' C++ kernel ops (fastarch::_bias_gelu_fwd / _bias_gelu_bwd, _swiglu_fwd /
_swiglu_bwd, csrc/ops.cpp;
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


def swiglu_forward(gate, up):
    return torch.ops.fastarch._swiglu_fwd(gate, up)


def swiglu_backward(dy, gate, up):
    return torch.ops.fastarch._swiglu_bwd(dy, gate, up)


if availability.cpu() is None:  # _C loaded: its ops need fakes for torch.compile and opcheck

    @torch.library.register_fake("fastarch::_bias_gelu_fwd")
    def _(x, bias, tanh):
        return x.new_empty(x.shape)

    @torch.library.register_fake("fastarch::_bias_gelu_bwd")
    def _(dy, x, bias, tanh, need_dbias):
        return x.new_empty(x.shape), x.new_empty(x.shape[1] if need_dbias else 0)

    @torch.library.register_fake("fastarch::_swiglu_fwd")
    def _(gate, up):
        return gate.new_empty(gate.shape)

    @torch.library.register_fake("fastarch::_swiglu_bwd")
    def _(dy, gate, up):
        return gate.new_empty(gate.shape), gate.new_empty(gate.shape)
