"""group_norm in plain PyTorch: the definition of correct, and the backend of last resort.

Kernel-level interface shared by every group_norm backend (see backends.py; the schema of
fastarch::_group_norm_fwd / _group_norm_bwd in csrc/ops.cpp):
``x``, ``dy`` are 3-D contiguous, (N, C, S) when ``channels_last`` is false and (N, S, C) when
true (S: the product of the spatial dims, >= 1); ``weight``/``bias`` (C,) or None;
``scale``/``shift`` (N, C) or None; all in x's dtype. mean and rstd are (N, G) in fp32 (fp64 for
fp64 x). With G = num_groups groups of C / G consecutive channels:

    xhat = (x - mean_ng) * rstd_ng,  rstd_ng = 1 / sqrt(var_ng + eps)  (biased variance over the
                                     group's C / G channels and all S positions)
    u = xhat * weight_c + bias_c
    z = u * (1 + scale_nc) + shift_nc
    y = silu(z) = z * sigmoid(z) if silu else z,  rounded once to x's dtype.

NaN anywhere in a group gives NaN for all of that group's outputs (and its mean/rstd); so does a
group whose mean square overflows the statistics' dtype (no statistics exist for it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch.ops.norms.reference import stats_dtype


def _channels_first(t: Tensor, channels_last: bool) -> Tensor:
    """(N, S, C) -> an (N, C, S) view; (N, C, S) unchanged."""
    return t.transpose(1, 2) if channels_last else t


def _column(t: Tensor | None, acc: torch.dtype, default: float) -> Tensor | float:
    """(C,) -> (1, C, 1), (N, C) -> (N, C, 1) in the compute dtype; None -> default."""
    if t is None:
        return default
    t = t.to(acc)
    return t[None, :, None] if t.dim() == 1 else t[:, :, None]


def group_norm_forward_ref(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    eps: float,
    silu: bool,
    channels_last: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns y (x's shape, layout and dtype, contiguous), mean (N, G), rstd (N, G)."""
    acc = stats_dtype(x.dtype)
    xf = _channels_first(x.to(acc), channels_last)
    n, c, s = xf.shape
    grouped = xf.reshape(n, num_groups, (c // num_groups) * s)
    # Corrected two-pass: the deviations' own mean is the rounding error of the mean; it is
    # removed from the variance and from every deviation (as in the norms' reference).
    mean = grouped.mean(-1, keepdim=True)
    deviation = grouped - mean
    correction = deviation.mean(-1, keepdim=True)
    var = (deviation.square().mean(-1, keepdim=True) - correction.square()).clamp_min(0)  # keeps NaN
    rstd = torch.rsqrt(var + eps).masked_fill(~torch.isfinite(mean.square() + var), float("nan"))
    xhat = ((deviation - correction) * rstd).reshape(n, c, s)
    u = xhat * _column(weight, acc, 1.0) + _column(bias, acc, 0.0)
    z = u * (1 + _column(scale, acc, 0.0)) + _column(shift, acc, 0.0)
    y = z * torch.sigmoid(z) if silu else z
    y = _channels_first(y.to(x.dtype), channels_last).contiguous()
    return y, (mean + correction).reshape(n, num_groups), rstd.reshape(n, num_groups)


def group_norm_backward_ref(
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
    channels_last: bool,
    need_dweight: bool,
    need_dscale: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``group_norm_forward_ref``: dx (x's shape and layout), dweight (C,), dbias
    (C,), dscale (N, C), dshift (N, C), all in x's dtype, reduced in the statistics' dtype and
    rounded once. dweight/dbias are None unless need_dweight and weight/bias are given;
    dscale/dshift None unless need_dscale and scale/shift are given."""
    acc = rstd.dtype
    xf = _channels_first(x.to(acc), channels_last)
    n, c, s = xf.shape
    group_shape = (n, num_groups, (c // num_groups) * s)
    xhat = ((xf.reshape(group_shape) - mean[..., None]) * rstd[..., None]).reshape(n, c, s)
    u = xhat * _column(weight, acc, 1.0) + _column(bias, acc, 0.0)
    one_plus_scale = 1 + _column(scale, acc, 0.0)
    dz = _channels_first(dy.to(acc), channels_last)
    if silu:
        z = u * one_plus_scale + _column(shift, acc, 0.0)
        sig = torch.sigmoid(z)
        dz = dz * (sig * (1 + z * torch.sigmoid(-z)))  # silu' = s + z s (1 - s); 1 - s without cancellation
    dshift = dz.sum(-1) if need_dscale and shift is not None else None
    dscale = (dz * u).sum(-1) if need_dscale and scale is not None else None
    du = dz * one_plus_scale
    dweight = (du * xhat).sum((0, 2)) if need_dweight and weight is not None else None
    dbias = du.sum((0, 2)) if need_dweight and bias is not None else None
    dxhat = (du * _column(weight, acc, 1.0)).reshape(group_shape)
    xhat_g = xhat.reshape(group_shape)
    dx = rstd[..., None] * (
        dxhat - dxhat.mean(-1, keepdim=True) - xhat_g * (dxhat * xhat_g).mean(-1, keepdim=True)
    )
    dx = _channels_first(dx.reshape(n, c, s).to(x.dtype), channels_last).contiguous()

    def rounded(t: Tensor | None) -> Tensor | None:
        return t.to(x.dtype) if t is not None else None

    return dx, rounded(dweight), rounded(dbias), rounded(dscale), rounded(dshift)
