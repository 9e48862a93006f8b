"""group_norm: GroupNorm over (N, C, *spatial) in either memory format, with the diffusion
UNet's per-sample scale/shift and SiLU fused in.

A torch op in the ``fastarch`` namespace (``torch.ops.fastarch.group_norm``) with a fake
implementation and autograd, so it runs in eager mode and inside ``torch.compile(fullgraph=True)``.
The op asks the registry for a backend (cuda, cpu, triton, reference) and runs it on a 3-D view
of x, (N, C, S) or (N, S, C) for channels-last x, without a layout copy; the gradient is one
more op, ``fastarch::group_norm_backward``, dispatched the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import registry
from fastarch.ops import dispatch
from fastarch.ops.group_norms import layout
from fastarch.ops.group_norms.backends import GroupNormProblem
from fastarch.ops.norms.api import check_eps
from fastarch.ops.rows import contiguous_or_none

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ACTIVATIONS = (None, "silu")


# ----------------------------------------------------------------------------- input checks


def _check_inputs(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    eps: float,
) -> None:
    """Raises a ValueError/TypeError naming the bad argument and what was expected: the op's
    check (dispatch.custom_op), run once per call before torch's own argument parsing."""
    who = "fastarch.group_norm"
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{who}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{who}: x must be (N, C, *spatial), at least 2-D, got shape {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, torch.SymInt)):
        raise TypeError(f"{who}: num_groups must be an int, got {type(num_groups).__name__}")
    n, c = x.shape[0], x.shape[1]
    if num_groups < 1 or c < 1 or c % num_groups != 0:
        raise ValueError(
            f"{who}: num_groups ({num_groups}) must be at least 1 and divide the channel count C = {c} (x's dim 1)"
        )
    if any(size == 0 for size in x.shape[2:]):
        raise ValueError(f"{who}: x must have at least one spatial position, got shape {tuple(x.shape)}")
    for name, t, shape, what in (
        ("weight", weight, (c,), "(C,)"),
        ("bias", bias, (c,), "(C,)"),
        ("scale", scale, (n, c), "(N, C)"),
        ("shift", shift, (n, c), "(N, C)"),
    ):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{who}: {name} must have shape {what} = {tuple(shape)}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{who}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{who}: {name} must be on x's device {x.device}, got {t.device}")
    check_eps("group_norm", eps)


def _check_activation(activation: object) -> bool:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fastarch.group_norm: activation must be None or 'silu', got {activation!r}")
    return activation == "silu"


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)


# ----------------------------------------------------------------------------- the ops


@dispatch.custom_op(
    "fastarch::group_norm",
    check=lambda x, num_groups, weight, bias, scale, shift, eps, silu, backend="": _check_inputs(
        x, num_groups, weight, bias, scale, shift, eps
    ),
)
def _group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    eps: float,
    silu: bool,
    backend: str = "",
) -> tuple[Tensor, Tensor, Tensor]:
    """y (x's shape and memory format), mean (N, G), rstd (N, G)."""
    channels_last = layout.is_channels_last(x)
    x3 = layout.to_3d(x, channels_last)
    impl = registry.choose("group_norm", GroupNormProblem.of(x3, num_groups, channels_last), backend)
    y3, mean, rstd = impl.forward(
        x3, num_groups, contiguous_or_none(weight), contiguous_or_none(bias), contiguous_or_none(scale),
        contiguous_or_none(shift), float(eps), silu, channels_last,
    )
    return layout.from_3d(y3, x, channels_last), mean, rstd


@_group_norm.register_fake
def _(x, num_groups, weight, bias, scale, shift, eps, silu, backend=""):
    channels_last = layout.is_channels_last(x)
    x3 = layout.to_3d(x, channels_last)
    y = layout.from_3d(x3.new_empty(x3.shape), x, channels_last)
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return y, stats, stats.new_empty(stats.shape)


@dispatch.custom_op("fastarch::group_norm_backward", mutates_args=())
def _group_norm_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    silu: bool,
    need_dweight: bool,
    need_dscale: bool,
    backend: str = "",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dx (x's shape and memory format), dweight, dbias (C,), dscale, dshift (N, C); a gradient
    not wanted (need_dweight / need_dscale false, or its tensor absent) is an empty tensor."""
    channels_last = layout.is_channels_last(x)
    x3 = layout.to_3d(x, channels_last)
    dy3 = layout.to_3d(dy, channels_last)  # (in whatever layout the next op produced: copied to x's if not)
    impl = registry.choose("group_norm", GroupNormProblem.of(x3, num_groups, channels_last), backend)
    dx3, dweight, dbias, dscale, dshift = impl.backward(
        dy3, x3, mean.contiguous(), rstd.contiguous(), num_groups, contiguous_or_none(weight), contiguous_or_none(bias),
        contiguous_or_none(scale), contiguous_or_none(shift), silu, channels_last, need_dweight, need_dscale,
    )
    return (
        layout.from_3d(dx3, x, channels_last),
        _or_empty(dweight, x),
        _or_empty(dbias, x),
        _or_empty(dscale, x),
        _or_empty(dshift, x),
    )


@_group_norm_backward.register_fake
def _(dy, x, mean, rstd, num_groups, weight, bias, scale, shift, silu, need_dweight, need_dscale, backend=""):
    channels_last = layout.is_channels_last(x)
    n, c = x.shape[0], x.shape[1]
    x3 = layout.to_3d(x, channels_last)
    dx = layout.from_3d(x3.new_empty(x3.shape), x, channels_last)

    def grad(wanted: bool, shape: tuple) -> Tensor:
        return x.new_empty(shape if wanted else (0,))

    return (
        dx,
        grad(need_dweight and weight is not None, (c,)),
        grad(need_dweight and bias is not None, (c,)),
        grad(need_dscale and scale is not None, (n, c)),
        grad(need_dscale and shift is not None, (n, c)),
    )


def _setup(ctx, inputs, output):
    x, num_groups, weight, bias, scale, shift, _, silu, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups, ctx.silu, ctx.backend = num_groups, silu, backend


def _backward(ctx, dy, dmean, drstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_dweight = (weight is not None and needs[2]) or (bias is not None and needs[3])
    need_dscale = (scale is not None and needs[4]) or (shift is not None and needs[5])
    dx, dweight, dbias, dscale, dshift = _group_norm_backward(
        dy, x, mean, rstd, ctx.num_groups, weight, bias, scale, shift, ctx.silu, need_dweight, need_dscale,
        ctx.backend,
    )
    return (
        dx if needs[0] else None,
        None,
        dweight if weight is not None and needs[2] else None,
        dbias if bias is not None and needs[3] else None,
        dscale if scale is not None and needs[4] else None,
        dshift if shift is not None and needs[5] else None,
        None,
        None,
        None,
    )


_group_norm.register_autograd(_backward, setup_context=_setup)


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    activation: str | None = None,
    backend: str | None = None,
) -> Tensor:
    """GroupNorm, then the per-sample scale/shift and an activation, in one pass:

        y = act(((x - mean_g) / sqrt(var_g + eps) * weight + bias) * (1 + scale) + shift)

    (diffusers' ResnetBlock2D "scale_shift" norm and its SiLU; with scale, shift and activation
    absent, torch.nn.functional.group_norm).

    x: (N, C, *spatial) float32/float16/bfloat16 (float64 on cpu and reference), contiguous or
    channels-last (channel dim of stride 1, the rest dense: torch.channels_last,
    channels_last_3d, or the same for any number of spatial dims); other layouts are copied.
    num_groups: divides C; mean and biased variance over each group's C / num_groups channels
    and all positions, in fp32 (fp64 for fp64). weight, bias: (C,) or None; scale, shift:
    (N, C) or None (either alone); all in x's dtype and on x's device. activation: None or
    "silu". backend: force "cuda", "cpu", "triton" or "reference" (default: the innermost
    ``fastarch.backend(...)`` block, FASTARCH_BACKEND, else the fastest able).
    Returns y: x's shape, dtype and memory format.
    """
    silu = _check_activation(activation)
    return _group_norm(x, num_groups, weight, bias, scale, shift, eps, silu, registry.requested_backend(backend))[0]
