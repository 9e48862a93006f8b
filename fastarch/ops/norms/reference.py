"""The norms in plain PyTorch: the definition of correct, and the backend of last resort.

Kernel-level interface shared by every norm backend (see backends.py):
``x``, ``residual``, ``dy`` and ``dresidual_out`` are 2-D (rows, cols) with contiguous
columns; ``weight``/``bias`` are (cols,); statistics are fp32 (fp64 for fp64 inputs).
``weight_offset``: the weight the rows are multiplied by is weight + weight_offset, added in
the statistics dtype (Gemma's ``1 + weight.float()``); the weight's gradient is unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are kept in fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scale(weight: Tensor, acc: torch.dtype, offset: float) -> Tensor:
    """weight + offset in the statistics dtype."""
    w = weight.to(acc)
    return w if offset == 0.0 else w + offset


def norm_forward_ref(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool,
    weight_offset: float = 0.0,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """LayerNorm (or RMSNorm when ``rms``) of ``x`` (+ ``residual``) over the last dim.

    x, residual: (rows, cols). Returns y (rows, cols); residual_out = x + residual rounded to
    x's dtype, or None; mean (rows,) or None for RMS; rstd (rows,).
    """
    acc = stats_dtype(x.dtype)
    residual_out = None
    if residual is not None:
        residual_out = (x.to(acc) + residual.to(acc)).to(x.dtype)
        x = residual_out
    xf = x.to(acc)
    if rms:
        mean = None
        rstd = torch.rsqrt(xf.square().mean(-1) + eps)  # 0 when the mean square overflows: y = x * 0, as PyTorch's
        xhat = xf * rstd[:, None]
    else:
        # Corrected two-pass: the deviations' own mean is the rounding error of the mean; it is
        # removed from the variance and from every deviation (what the kernels do).
        mean = xf.mean(-1, keepdim=True)
        deviation = xf - mean
        correction = deviation.mean(-1, keepdim=True)
        var = (deviation.square().mean(-1, keepdim=True) - correction.square()).clamp_min(0)  # keeps NaN
        # A row whose mean square mean^2 + var overflows the statistics' dtype has no
        # statistics: NaN, as PyTorch's LayerNorm gives (a var of inf would give rstd = 0 and
        # y = bias, silently wrong).
        rstd = torch.rsqrt(var + eps).masked_fill(~torch.isfinite(mean.square() + var), float("nan"))
        xhat = (deviation - correction) * rstd
        mean, rstd = (mean + correction).squeeze(-1), rstd.squeeze(-1)
    if weight is not None:
        xhat = xhat * _scale(weight, acc, weight_offset)
    if bias is not None:
        xhat = xhat + bias.to(acc)
    return xhat.to(x.dtype), residual_out, mean, rstd


def norm_backward_ref(
    dy: Tensor,
    dresidual_out: Tensor | None,
    xin: Tensor,
    weight: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    need_dweight: bool,
    need_dbias: bool,
    weight_offset: float = 0.0,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients of ``norm_forward_ref``: dx (rows, cols), dweight (cols,), dbias (cols,).

    xin is the normalization's input (x, or residual_out for the fused add variants); RMS norm
    when ``mean`` is None. dresidual_out, the gradient arriving at residual_out, is added to dx.
    """
    acc = rstd.dtype
    xf = xin.to(acc)
    xhat = (xf if mean is None else xf - mean[:, None]) * rstd[:, None]
    dyf = dy.to(acc)
    g = dyf * _scale(weight, acc, weight_offset) if weight is not None else dyf
    # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); RMS norm has no mean(g) term.
    dx = g - xhat * (g * xhat).mean(-1, keepdim=True)
    if mean is not None:
        dx = dx - g.mean(-1, keepdim=True)
    dx = dx * rstd[:, None]
    if dresidual_out is not None:
        dx = dx + dresidual_out.to(acc)
    dweight = (dyf * xhat).sum(0).to(xin.dtype) if need_dweight else None
    dbias = dyf.sum(0).to(xin.dtype) if need_dbias else None
    return dx.to(xin.dtype), dweight, dbias
