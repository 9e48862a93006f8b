"""The activations in plain PyTorch: the definition of correct, and the backend of last resort.

Kernel-level interface (see backends.py): x (rows, cols) with contiguous columns, bias (cols,)
or None; approximate "none" (erf) or "tanh". Math in fp32 (fp64 for fp64 inputs); outputs in
x's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def bias_gelu_forward_ref(x: Tensor, bias: Tensor | None, approximate: str) -> Tensor:
    """gelu(x + bias), rounded once to x's dtype."""
    acc = compute_dtype(x.dtype)
    h = x.to(acc) + bias.to(acc) if bias is not None else x.to(acc)
    return F.gelu(h, approximate=approximate).to(x.dtype)


def gelu_derivative(h: Tensor, approximate: str) -> Tensor:
    """d gelu(h) / dh. erf form: Phi(h) + h phi(h); tanh form, with u = sqrt(2/pi) (h + 0.044715
    h^3): 0.5 (1 + tanh u) + 0.5 h (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 h^2)."""
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        t = torch.tanh(k * (h + 0.044715 * h**3))
        return 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * k * (1 + 3 * 0.044715 * h * h)
    cdf = 0.5 * (1 + torch.erf(h * (1 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * h * h) * (1 / math.sqrt(2 * math.pi))
    return cdf + h * pdf


def bias_gelu_backward_ref(
    dy: Tensor, x: Tensor, bias: Tensor | None, approximate: str, need_dbias: bool
) -> tuple[Tensor, Tensor | None]:
    """dx = dy * gelu'(x + bias) in x's dtype, and dbias = the column sums of that product in
    fp32, rounded once (None when not wanted)."""
    acc = compute_dtype(x.dtype)
    h = x.to(acc) + bias.to(acc) if bias is not None else x.to(acc)
    grad = dy.to(acc) * gelu_derivative(h, approximate)
    dbias = grad.sum(0).to(x.dtype) if need_dbias else None
    return grad.to(x.dtype), dbias
