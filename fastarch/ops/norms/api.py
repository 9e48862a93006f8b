"""The norms' public functions: layer_norm, rms_norm, and the pre-norm fused residual variants
add_layer_norm / add_rms_norm. All normalize over the last dimension.

Each is a torch op in the ``fastarch`` namespace (``torch.ops.fastarch.layer_norm``, ...)
with a fake implementation and autograd, so it runs in eager mode and inside
``torch.compile(fullgraph=True)``. The op's implementation asks the registry for a backend
(cuda, cpu, triton, reference) and runs it; the gradient is one more op,
``fastarch::norm_backward``, dispatched the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import registry
from fastarch.ops import dispatch
from fastarch.ops.norms.backends import NormProblem
from fastarch.ops.norms.reference import stats_dtype
from fastarch.ops.rows import as_rows, contiguous_or_none

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------- input checks


def _check_tensor(t: object, name: str, op: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"fastarch.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_inputs(
    op: str, x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float,
    weight_offset: float = 0.0,
) -> None:
    """Raises a ValueError/TypeError naming the bad argument and what was expected: each op's
    check (dispatch.custom_op), run once per call before torch's own argument parsing."""
    _check_tensor(x, "x", op)
    if residual is None and op.startswith("add_"):
        raise TypeError(f"fastarch.{op}: residual must be a torch.Tensor of x's shape, got None")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fastarch.{op}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"fastarch.{op}: x must have at least 1 dimension (..., hidden), got a 0-d tensor")
    n = x.shape[-1]
    if n < 1:
        raise ValueError(f"fastarch.{op}: x's last dimension (the normalized size) must be at least 1, got shape {tuple(x.shape)}")
    others = {"residual": residual, "weight": weight, "bias": bias}
    for name, t in others.items():
        if t is None:
            continue
        _check_tensor(t, name, op)
        expected = tuple(x.shape) if name == "residual" else (n,)
        if tuple(t.shape) != expected:
            what = "x's shape" if name == "residual" else "x's last dimension"
            raise ValueError(f"fastarch.{op}: {name} must have shape {expected} to match {what}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"fastarch.{op}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"fastarch.{op}: {name} must be on x's device {x.device}, got {t.device}")
    check_eps(op, eps)
    _check_weight_offset(op, weight_offset, weight)


def _check_weight_offset(op: str, offset: object, weight: Tensor | None) -> None:
    """weight_offset: a finite float, non-zero only with a weight (it offsets the weight)."""
    if isinstance(offset, bool) or not isinstance(offset, (int, float, torch.SymFloat)):
        raise TypeError(f"fastarch.{op}: weight_offset must be a float, got {type(offset).__name__}")
    if not -1.7976931348623157e308 <= offset <= 1.7976931348623157e308:
        raise ValueError(f"fastarch.{op}: weight_offset must be finite, got {offset}")
    if offset != 0 and weight is None:
        raise ValueError(f"fastarch.{op}: weight_offset={offset} needs a weight (it is added to the weight)")


def check_eps(op: str, eps: object) -> None:
    """eps: a finite float >= 0. (Compared rather than math.isfinite: torch.compile with
    dynamic=True traces Python floats as symbols, which compare but have no isfinite.)"""
    if isinstance(eps, bool) or not isinstance(eps, (int, float, torch.SymFloat)):
        raise TypeError(f"fastarch.{op}: eps must be a float, got {type(eps).__name__}")
    if not 0 <= eps <= 1.7976931348623157e308:  # (an int past the float range is not finite)
        raise ValueError(f"fastarch.{op}: eps must be finite and >= 0, got {eps}")


# ----------------------------------------------------------------------------- dispatch


def _forward(
    op: str, x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool,
    weight_offset: float, backend: str,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    x2 = as_rows(x)
    impl = registry.choose(op, NormProblem.of(x2), backend)
    y, residual_out, mean, rstd = impl.forward(
        x2, as_rows(residual) if residual is not None else None, contiguous_or_none(weight), contiguous_or_none(bias),
        float(eps), rms, float(weight_offset),
    )
    if x.dim() == 2:
        return y, residual_out, mean, rstd
    lead = x.shape[:-1]
    return (
        y.view_as(x),  # (faster than a view to x.shape, which is parsed element by element)
        residual_out.view_as(x) if residual_out is not None else None,
        mean.view(lead) if mean is not None else None,
        rstd.view(lead),
    )


def _fake_forward(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    stats = x.new_empty(x.shape[:-1], dtype=stats_dtype(x.dtype))
    return x.new_empty(x.shape), x.new_empty(x.shape), stats


@dispatch.custom_op("fastarch::norm_backward", mutates_args=())
def _norm_backward(
    dy: Tensor,
    dresidual_out: Tensor | None,
    xin: Tensor,
    weight: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    need_dweight: bool,
    need_dbias: bool,
    weight_offset: float = 0.0,
    backend: str = "",
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of every norm op: dx, dweight, dbias (empty when not wanted).
    xin: the normalization's input (..., N); RMSNorm when mean is None; the forward multiplied
    by weight + weight_offset."""
    op = "rms_norm" if mean is None else "layer_norm"
    x2 = as_rows(xin)
    impl = registry.choose(op, NormProblem.of(x2), backend)
    rows = x2.shape[0]
    dx, dweight, dbias = impl.backward(
        as_rows(dy),
        as_rows(dresidual_out) if dresidual_out is not None else None,
        x2,
        contiguous_or_none(weight),
        mean.reshape(rows).contiguous() if mean is not None else None,
        rstd.reshape(rows).contiguous(),
        need_dweight,
        need_dbias,
        float(weight_offset),
    )
    return (
        dx.view(xin.shape),
        dweight if dweight is not None else xin.new_empty(0),
        dbias if dbias is not None else xin.new_empty(0),
    )


@_norm_backward.register_fake
def _(dy, dresidual_out, xin, weight, mean, rstd, need_dweight, need_dbias, weight_offset=0.0, backend=""):
    n = xin.shape[-1]
    return xin.new_empty(xin.shape), xin.new_empty(n if need_dweight else 0), xin.new_empty(n if need_dbias else 0)


def _grads(ctx, dy: Tensor, dresidual_out: Tensor | None, weight_index: int, bias_index: int | None):
    """Runs norm_backward for an op whose saved tensors are (xin, weight, mean, rstd)."""
    xin, weight, mean, rstd = ctx.saved_tensors
    need_dweight = weight is not None and ctx.needs_input_grad[weight_index]
    need_dbias = bias_index is not None and ctx.has_bias and ctx.needs_input_grad[bias_index]
    dx, dweight, dbias = _norm_backward(
        dy, dresidual_out, xin, weight, mean, rstd, need_dweight, need_dbias, ctx.weight_offset, ctx.backend
    )
    return dx, dweight if need_dweight else None, dbias if need_dbias else None


# ----------------------------------------------------------------------------- layer_norm


@dispatch.custom_op(
    "fastarch::layer_norm",
    check=lambda x, weight, bias, eps, weight_offset=0.0, backend="": _check_inputs(
        "layer_norm", x, None, weight, bias, eps, weight_offset
    ),
)
def _layer_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, weight_offset: float = 0.0, backend: str = ""
) -> tuple[Tensor, Tensor, Tensor]:
    y, _, mean, rstd = _forward("layer_norm", x, None, weight, bias, eps, False, weight_offset, backend)
    return y, mean, rstd


@_layer_norm.register_fake
def _(x, weight, bias, eps, weight_offset=0.0, backend=""):
    y, _, stats = _fake_forward(x)
    return y, stats, stats.new_empty(stats.shape)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _, weight_offset, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias, ctx.weight_offset, ctx.backend = bias is not None, weight_offset, backend


def _layer_norm_backward(ctx, dy, dmean, drstd):
    dx, dweight, dbias = _grads(ctx, dy, None, 1, 2)
    return dx, dweight, dbias, None, None, None


_layer_norm.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


def layer_norm(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5, *,
    weight_offset: float = 0.0, backend: str | None = None,
) -> Tensor:
    """LayerNorm over the last dimension: (x - mean) / sqrt(var + eps) * weight + bias.

    x: (..., N) float32/float16/bfloat16 (float64 on cpu and reference); weight, bias: (N,) or
    None; statistics in fp32. weight_offset: multiply by weight + weight_offset instead, the sum
    in fp32 (fp64 for fp64 x): a weight stored as its difference from 1, as Gemma's norms and
    Megatron's "layernorm_1p" store it (weight_offset=1.0); the weight's gradient is the same.
    backend: force "cuda", "cpu", "triton" or "reference" (default: the innermost
    ``fastarch.backend(...)`` block, FASTARCH_BACKEND, else the fastest able).
    Returns y: (..., N), contiguous, x's dtype.
    """
    return _layer_norm(x, weight, bias, eps, weight_offset, registry.requested_backend(backend))[0]


# ----------------------------------------------------------------------------- rms_norm


@dispatch.custom_op(
    "fastarch::rms_norm",
    check=lambda x, weight, eps, weight_offset=0.0, backend="": _check_inputs(
        "rms_norm", x, None, weight, None, eps, weight_offset
    ),
)
def _rms_norm(
    x: Tensor, weight: Tensor | None, eps: float, weight_offset: float = 0.0, backend: str = ""
) -> tuple[Tensor, Tensor]:
    y, _, _, rstd = _forward("rms_norm", x, None, weight, None, eps, True, weight_offset, backend)
    return y, rstd


@_rms_norm.register_fake
def _(x, weight, eps, weight_offset=0.0, backend=""):
    y, _, stats = _fake_forward(x)
    return y, stats


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _, weight_offset, backend = inputs
    ctx.save_for_backward(x, weight, None, output[1])
    ctx.has_bias, ctx.weight_offset, ctx.backend = False, weight_offset, backend


def _rms_norm_backward(ctx, dy, drstd):
    dx, dweight, _ = _grads(ctx, dy, None, 1, None)
    return dx, dweight, None, None, None


_rms_norm.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def _default_rms_eps(x: Tensor, eps: float | None) -> float:
    # torch.nn.functional.rms_norm's default: the machine epsilon of x's dtype
    if eps is None:
        return torch.finfo(x.dtype).eps if isinstance(x, Tensor) and x.is_floating_point() else 0.0
    return eps


def rms_norm(
    x: Tensor, weight: Tensor | None = None, eps: float | None = None, *, weight_offset: float = 0.0,
    backend: str | None = None,
) -> Tensor:
    """RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) * (weight + weight_offset).

    x: (..., N); weight: (N,) or None; eps: default torch.finfo(x.dtype).eps as in
    torch.nn.functional.rms_norm; weight_offset: 1.0 for Gemma's RMSNorm (its x̂ * (1 + weight),
    the sum in fp32 as Gemma computes it; see layer_norm). Returns y: (..., N). backend: as in
    layer_norm.
    """
    eps = _default_rms_eps(x, eps)
    return _rms_norm(x, weight, eps, weight_offset, registry.requested_backend(backend))[0]


# ----------------------------------------------------------------------------- add_layer_norm


@dispatch.custom_op(
    "fastarch::add_layer_norm",
    check=lambda x, residual, weight, bias, eps, weight_offset=0.0, backend="": _check_inputs(
        "add_layer_norm", x, residual, weight, bias, eps, weight_offset
    ),
)
def _add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, weight_offset: float = 0.0,
    backend: str = "",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, residual_out, mean, rstd = _forward("add_layer_norm", x, residual, weight, bias, eps, False, weight_offset,
                                           backend)
    return y, residual_out, mean, rstd


@_add_layer_norm.register_fake
def _(x, residual, weight, bias, eps, weight_offset=0.0, backend=""):
    y, residual_out, stats = _fake_forward(x)
    return y, residual_out, stats, stats.new_empty(stats.shape)


def _add_layer_norm_setup(ctx, inputs, output):
    _, _, weight, bias, _, weight_offset, backend = inputs
    _, residual_out, mean, rstd = output
    ctx.save_for_backward(residual_out, weight, mean, rstd)
    ctx.has_bias, ctx.weight_offset, ctx.backend = bias is not None, weight_offset, backend


def _add_layer_norm_backward(ctx, dy, dresidual_out, dmean, drstd):
    dx, dweight, dbias = _grads(ctx, dy, dresidual_out, 2, 3)
    return dx, dx, dweight, dbias, None, None, None  # residual_out = x + residual: same gradient


_add_layer_norm.register_autograd(_add_layer_norm_backward, setup_context=_add_layer_norm_setup)


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    weight_offset: float = 0.0,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The pre-norm transformer's fused residual: s = x + residual, then LayerNorm of s.

    x, residual: (..., N), same dtype; weight, bias: (N,) or None. Returns (y, s), both
    (..., N); s is rounded to x's dtype before it is normalized, exactly as
    ``layer_norm(x + residual)`` would see it. weight_offset, backend: as in layer_norm.
    """
    y, s, _, _ = _add_layer_norm(x, residual, weight, bias, eps, weight_offset, registry.requested_backend(backend))
    return y, s


# ----------------------------------------------------------------------------- add_rms_norm


@dispatch.custom_op(
    "fastarch::add_rms_norm",
    check=lambda x, residual, weight, eps, weight_offset=0.0, backend="": _check_inputs(
        "add_rms_norm", x, residual, weight, None, eps, weight_offset
    ),
)
def _add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: float, weight_offset: float = 0.0, backend: str = ""
) -> tuple[Tensor, Tensor, Tensor]:
    y, residual_out, _, rstd = _forward("add_rms_norm", x, residual, weight, None, eps, True, weight_offset, backend)
    return y, residual_out, rstd


@_add_rms_norm.register_fake
def _(x, residual, weight, eps, weight_offset=0.0, backend=""):
    return _fake_forward(x)


def _add_rms_norm_setup(ctx, inputs, output):
    _, _, weight, _, weight_offset, backend = inputs
    _, residual_out, rstd = output
    ctx.save_for_backward(residual_out, weight, None, rstd)
    ctx.has_bias, ctx.weight_offset, ctx.backend = False, weight_offset, backend


def _add_rms_norm_backward(ctx, dy, dresidual_out, drstd):
    dx, dweight, _ = _grads(ctx, dy, dresidual_out, 2, None)
    return dx, dx, dweight, None, None, None


_add_rms_norm.register_autograd(_add_rms_norm_backward, setup_context=_add_rms_norm_setup)


def add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor | None = None, eps: float | None = None, *, weight_offset: float = 0.0,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """s = x + residual, then RMSNorm of s (the LLaMA-family pre-norm). Returns (y, s).

    x, residual: (..., N); weight: (N,) or None; eps, weight_offset as in rms_norm. backend: as
    in layer_norm.
    """
    eps = _default_rms_eps(x, eps)
    y, s, _ = _add_rms_norm(x, residual, weight, eps, weight_offset, registry.requested_backend(backend))
    return y, s
