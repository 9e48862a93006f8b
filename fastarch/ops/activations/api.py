"""bias_gelu: GELU of x + bias over the last dimension, as one torch op
(``torch.ops.fastarch.bias_gelu``) with a fake implementation and autograd through
``fastarch::bias_gelu_backward``; swiglu: silu(gate) * up, likewise (``fastarch::swiglu``,
``fastarch::swiglu_backward``); geglu: gelu(gate) * up (``fastarch::geglu``,
``fastarch::geglu_backward``), on the same kernel ops as swiglu; geglu_packed: geglu of the two
halves of one projection, whose backward writes that projection's gradient whole. Each asks the registry for a
backend (backends.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import registry
from fastarch.ops import dispatch
from fastarch.ops.activations.backends import ActivationProblem
from fastarch.ops.rows import as_rows

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
APPROXIMATIONS = ("none", "tanh")


def _like(rows: Tensor, x: Tensor) -> Tensor:
    """A kernel's (rows, cols) result in x's shape (a view; none needed for 2-D x: a view costs
    microseconds, a visible part of a small call)."""
    return rows if x.dim() == 2 else rows.view_as(x)


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


@dispatch.custom_op("fastarch::bias_gelu", check=lambda x, bias, approximate, backend="": _check(x, bias, approximate))
def _bias_gelu(x: Tensor, bias: Tensor | None, approximate: str, backend: str = "") -> Tensor:
    rows = as_rows(x)
    impl = registry.choose("bias_gelu", ActivationProblem.of(rows), backend)
    return _like(impl.forward(rows, bias.contiguous() if bias is not None else None, approximate), x)


@_bias_gelu.register_fake
def _(x, bias, approximate, backend=""):
    return x.new_empty(x.shape)


@dispatch.custom_op("fastarch::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward(
    dy: Tensor, x: Tensor, bias: Tensor | None, approximate: str, need_dbias: bool, backend: str = ""
) -> tuple[Tensor, Tensor]:
    """dx (x's shape) and dbias ((N,), or empty when not wanted)."""
    rows = as_rows(x)
    impl = registry.choose("bias_gelu", ActivationProblem.of(rows), backend)
    dx, dbias = impl.backward(as_rows(dy), rows, bias.contiguous() if bias is not None else None, approximate, need_dbias)
    return _like(dx, x), dbias if dbias is not None else x.new_empty(0)


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
    return _bias_gelu(x, bias, approximate, registry.requested_backend(backend))


def _check_gated(op: str, gate: object, up: object) -> None:
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fastarch.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if gate.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fastarch.{op}: gate must be float32, float16, bfloat16 or float64, got {gate.dtype}")
    if gate.dim() < 1 or gate.shape[-1] < 1:
        raise ValueError(f"fastarch.{op}: gate must have a last dimension of at least 1, got shape {tuple(gate.shape)}")
    if up.shape != gate.shape:
        raise ValueError(f"fastarch.{op}: up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"fastarch.{op}: up must have gate's dtype {gate.dtype}, got {up.dtype}")
    if up.device != gate.device:
        raise ValueError(f"fastarch.{op}: up must be on gate's device {gate.device}, got {up.device}")


def _check_geglu(gate: object, up: object, approximate: object) -> None:
    _check_gated("geglu", gate, up)
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"fastarch.geglu: approximate must be 'none' (erf) or 'tanh', got {approximate!r}")


def _geglu_act(approximate: str) -> str:
    return "gelu_tanh" if approximate == "tanh" else "gelu"


# The gated ops' bodies (swiglu and geglu differ only in f, the kernel ops' act). gate and up
# keep their row strides: the halves of one (..., 2N) projection are read in place.
def _gated_forward(op: str, gate: Tensor, up: Tensor, act: str, backend: str) -> Tensor:
    rows = as_rows(gate)
    impl = registry.choose(op, ActivationProblem.of(rows), backend)
    return _like(impl.forward(rows, as_rows(up), act), gate)


def _gated_backward(op: str, dy: Tensor, gate: Tensor, up: Tensor, act: str, backend: str) -> tuple[Tensor, Tensor]:
    rows = as_rows(gate)
    impl = registry.choose(op, ActivationProblem.of(rows), backend)
    dgate, dup = impl.backward(as_rows(dy), rows, as_rows(up), act)
    return _like(dgate, gate), _like(dup, gate)


@dispatch.custom_op("fastarch::swiglu", check=lambda gate, up, backend="": _check_gated("swiglu", gate, up))
def _swiglu(gate: Tensor, up: Tensor, backend: str = "") -> Tensor:
    return _gated_forward("swiglu", gate, up, "silu", backend)


@_swiglu.register_fake
def _(gate, up, backend=""):
    return gate.new_empty(gate.shape)


@dispatch.custom_op("fastarch::swiglu_backward", mutates_args=())
def _swiglu_backward(dy: Tensor, gate: Tensor, up: Tensor, backend: str = "") -> tuple[Tensor, Tensor]:
    """dgate and dup, each of gate's shape."""
    return _gated_backward("swiglu", dy, gate, up, "silu", backend)


@_swiglu_backward.register_fake
def _(dy, gate, up, backend=""):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _swiglu_setup(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _swiglu_grad(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = _swiglu_backward(dy, gate, up, ctx.backend)
    return dgate, dup, None


_swiglu.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


def swiglu(gate: Tensor, up: Tensor, *, backend: str | None = None) -> Tensor:
    """silu(gate) * up: the gated MLP activation of LLaMA-family transformers (the two halves
    of the gate/up projection), fused into one pass.

    gate, up: (..., N) of one shape, float32/float16/bfloat16 (float64 on the cpu and reference
    backends). Computed in fp32 and rounded once to the inputs' dtype. Returns (..., N),
    contiguous. Gradients flow to gate and up. backend: force "cuda", "cpu", "triton" or
    "reference".
    """
    return _swiglu(gate, up, registry.requested_backend(backend))


@dispatch.custom_op("fastarch::geglu", check=lambda gate, up, approximate, backend="": _check_geglu(gate, up, approximate))
def _geglu(gate: Tensor, up: Tensor, approximate: str, backend: str = "") -> Tensor:
    return _gated_forward("geglu", gate, up, _geglu_act(approximate), backend)


@_geglu.register_fake
def _(gate, up, approximate, backend=""):
    return gate.new_empty(gate.shape)


@dispatch.custom_op("fastarch::geglu_backward", mutates_args=())
def _geglu_backward(dy: Tensor, gate: Tensor, up: Tensor, approximate: str, backend: str = "") -> tuple[Tensor, Tensor]:
    """dgate and dup, each of gate's shape."""
    return _gated_backward("geglu", dy, gate, up, _geglu_act(approximate), backend)


@_geglu_backward.register_fake
def _(dy, gate, up, approximate, backend=""):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _geglu_setup(ctx, inputs, output):
    gate, up, approximate, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.approximate, ctx.backend = approximate, backend


def _geglu_grad(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = _geglu_backward(dy, gate, up, ctx.approximate, ctx.backend)
    return dgate, dup, None, None


_geglu.register_autograd(_geglu_grad, setup_context=_geglu_setup)


def geglu(gate: Tensor, up: Tensor, approximate: str = "none", *, backend: str | None = None) -> Tensor:
    """gelu(gate) * up: the gated feed-forward activation of diffusion UNets' transformer
    blocks (diffusers' GEGLU: ``hidden, gate = proj(x).chunk(2, -1); hidden * gelu(gate)``,
    so ``up`` is the first half), fused into one pass. approximate: "none" (erf form, diffusers')
    or "tanh".

    gate, up: (..., N) of one shape, float32/float16/bfloat16 (float64 on the cpu and reference
    backends); the two halves of one (..., 2N) projection (``chunk(2, -1)`` views, rows strided
    by 2N) are read in place, without a copy. Computed in fp32 and rounded once to the inputs'
    dtype. Returns (..., N), contiguous. Gradients flow to gate and up. backend: force "cuda",
    "cpu", "triton" or "reference".
    """
    return _geglu(gate, up, approximate, registry.requested_backend(backend))


def _check_geglu_packed(proj: object, approximate: object) -> None:
    op = "geglu_packed"
    if not isinstance(proj, Tensor):
        raise TypeError(f"fastarch.{op}: proj must be a torch.Tensor, got {type(proj).__name__}")
    if proj.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fastarch.{op}: proj must be float32, float16, bfloat16 or float64, got {proj.dtype}")
    if proj.dim() < 1 or proj.shape[-1] < 2 or proj.shape[-1] % 2:
        raise ValueError(f"fastarch.{op}: proj must have an even last dimension of at least 2 (up, then gate), got shape {tuple(proj.shape)}")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"fastarch.{op}: approximate must be 'none' (erf) or 'tanh', got {approximate!r}")


def _half_shape(proj: Tensor) -> tuple[int, ...]:
    return (*proj.shape[:-1], proj.shape[-1] // 2)


@dispatch.custom_op(
    "fastarch::geglu_packed", check=lambda proj, approximate, backend="": _check_geglu_packed(proj, approximate)
)
def _geglu_packed(proj: Tensor, approximate: str, backend: str = "") -> Tensor:
    rows = as_rows(proj)
    impl = registry.choose("geglu_packed", ActivationProblem.of(rows), backend)
    return impl.forward(rows, _geglu_act(approximate)).view(_half_shape(proj))


@_geglu_packed.register_fake
def _(proj, approximate, backend=""):
    return proj.new_empty(_half_shape(proj))


@dispatch.custom_op("fastarch::geglu_packed_backward", mutates_args=())
def _geglu_packed_backward(dy: Tensor, proj: Tensor, approximate: str, backend: str = "") -> Tensor:
    """dproj, of proj's shape: [dup | dgate]."""
    rows = as_rows(proj)
    impl = registry.choose("geglu_packed", ActivationProblem.of(rows), backend)
    return impl.backward(as_rows(dy), rows, _geglu_act(approximate)).view(proj.shape)


@_geglu_packed_backward.register_fake
def _(dy, proj, approximate, backend=""):
    return proj.new_empty(proj.shape)


def _geglu_packed_setup(ctx, inputs, output):
    proj, approximate, backend = inputs
    ctx.save_for_backward(proj)
    ctx.approximate, ctx.backend = approximate, backend


def _geglu_packed_grad(ctx, dy):
    (proj,) = ctx.saved_tensors
    return _geglu_packed_backward(dy, proj, ctx.approximate, ctx.backend), None, None


_geglu_packed.register_autograd(_geglu_packed_grad, setup_context=_geglu_packed_setup)


def geglu_packed(proj: Tensor, approximate: str = "none", *, backend: str | None = None) -> Tensor:
    """geglu on the whole projection of diffusers' GEGLU: ``up, gate = proj.chunk(2, -1)``,
    then gelu(gate) * up, as one op. The same kernels and results as ``geglu(gate, up)`` on the
    chunks; the backward writes the gradient of proj whole (the gradients of two chunks cost
    autograd a concatenation, a read and a write of all of it). fastarch.nn.GEGLU runs this.

    proj: (..., 2N) float32/float16/bfloat16 (float64 on the cpu and reference backends), up
    first, then gate. Returns (..., N), contiguous. approximate, backend: as geglu's.
    """
    return _geglu_packed(proj, approximate, registry.requested_backend(backend))
