"""bias_gelu: GELU of x + bias over the last dimension, as one torch op
(``torch.ops.fastarch.bias_gelu``) with a fake implementation and autograd through
``fastarch::bias_gelu_backward``; both ask the registry for a backend (backends.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import registry
from fastarch.ops.activations.backends import ActivationProblem
from fastarch.ops.rows import as_rows

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
APPROXIMATIONS = ("none", "tanh")


def _check(x: object, bias: object, approximate: object) -> None:
    op = "bias_gelu"
    if not isinstance(x, Tensor):
        raise TypeError(f"fastarch.{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fastarch.{op}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"fastarch.{op}: x must have a last dimension of at least 1, got shape {tuple(x.shape)}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"fastarch.{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (x.shape[-1],):
            raise ValueError(f"fastarch.{op}: bias must have shape ({x.shape[-1]},) to match x's last dimension, got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"fastarch.{op}: bias must have x's dtype {x.dtype}, got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"fastarch.{op}: bias must be on x's device {x.device}, got {bias.device}")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"fastarch.{op}: approximate must be 'none' (erf) or 'tanh', got {approximate!r}")


@torch.library.custom_op("fastarch::bias_gelu", mutates_args=())
def _bias_gelu(x: Tensor, bias: Tensor | None, approximate: str, backend: str = "") -> Tensor:
    _check(x, bias, approximate)
    rows = as_rows(x)
    impl = registry.choose("bias_gelu", ActivationProblem.of(rows), backend)
    return impl.forward(rows, bias.contiguous() if bias is not None else None, approximate).view(x.shape)


@_bias_gelu.register_fake
def _(x, bias, approximate, backend=""):
    _check(x, bias, approximate)
    return x.new_empty(x.shape)


@torch.library.custom_op("fastarch::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward(
    dy: Tensor, x: Tensor, bias: Tensor | None, approximate: str, need_dbias: bool, backend: str = ""
) -> tuple[Tensor, Tensor]:
    """dx (x's shape) and dbias ((N,), or empty when not wanted)."""
    rows = as_rows(x)
    impl = registry.choose("bias_gelu", ActivationProblem.of(rows), backend)
    dx, dbias = impl.backward(as_rows(dy), rows, bias.contiguous() if bias is not None else None, approximate, need_dbias)
    return dx.view(x.shape), dbias if dbias is not None else x.new_empty(0)


@_bias_gelu_backward.register_fake
def _(dy, x, bias, approximate, need_dbias, backend=""):
    return x.new_empty(x.shape), x.new_empty(x.shape[-1] if need_dbias else 0)


def _setup(ctx, inputs, output):
    x, bias, approximate, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate, ctx.backend = approximate, backend


def _grad(ctx, dy):
    x, bias = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[1]
    dx, dbias = _bias_gelu_backward(dy, x, bias, ctx.approximate, need_dbias, ctx.backend)
    return dx, dbias if need_dbias else None, None, None


_bias_gelu.register_autograd(_grad, setup_context=_setup)


def bias_gelu(x: Tensor, bias: Tensor | None = None, approximate: str = "none", *, backend: str | None = None) -> Tensor:
    """GELU(x + bias): the MLP activation of BERT-family (approximate="none", the erf form) and
    GPT-2-family (approximate="tanh") transformers, fused with the first linear layer's bias.

    x: (..., N) float32/float16/bfloat16 (float64 on the reference backend); bias: (N,) or None.
    Computed in fp32 and rounded once to x's dtype. Returns y: (..., N), contiguous. Gradients
    flow to x and bias. backend: force "cuda", "cpu", "triton" or "reference".
    """
    _check(x, bias, approximate)
    return _bias_gelu(x, bias, approximate, registry.requested_backend(backend))
