"""The activations in plain PyTorch: the definition of correct, and the backend of last resort.

Kernel-level interface (see backends.py): x, gate, up (rows, cols) with contiguous columns,
bias (cols,) or None; approximate "none" (erf) or "tanh". Math in fp32 (fp64 for fp64 inputs);
outputs in the inputs' dtype, rounded once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gelu(h: Tensor, approximate: str) -> Tensor:
    """F.gelu's value, written without its cancellation for negative h: h Phi(h) with
    Phi(h) = erfc(-h / sqrt 2) / 2 (1 + erf(h / sqrt 2) loses every digit below h ~ -3 in
    fp32, ~ -5.5 in fp64), and 0.5 h (1 + tanh u) = h sigmoid(2u). gelu(+inf) = inf,
    gelu(-inf) = NaN (-inf * 0), NaN gives NaN, as F.gelu."""
    if approximate == "tanh":
        return h * torch.sigmoid(2 * math.sqrt(2.0 / math.pi) * h * (1 + 0.044715 * h * h))
    return h * 0.5 * torch.special.erfc(h * (-1 / math.sqrt(2.0)))


def bias_gelu_forward_ref(x: Tensor, bias: Tensor | None, approximate: str) -> Tensor:
    """gelu(x + bias), rounded once to x's dtype."""
    acc = compute_dtype(x.dtype)
    h = x.to(acc) + bias.to(acc) if bias is not None else x.to(acc)
    return gelu(h, approximate).to(x.dtype)


def gelu_derivative(h: Tensor, approximate: str) -> Tensor:
    """d gelu(h) / dh. erf form: Phi(h) + h phi(h); tanh form, with s = sigmoid(2u) =
    0.5 (1 + tanh u), u = sqrt(2/pi) (h + 0.044715 h^3): s + h s (1 - s) 2 sqrt(2/pi)
    (1 + 3 * 0.044715 h^2) (0.5 (1 - tanh^2 u) = 2 s (1 - s)). NaN at +-inf, as torch's."""
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        arg = 2 * k * h * (1 + 0.044715 * h * h)
        s = torch.sigmoid(arg)
        g = h * s * torch.sigmoid(-arg)  # exactly 0 wherever h^2 overflows: kept out of the product
        return s + g * (2 * k) + (g * h) * (h * (6 * 0.044715 * k))
    cdf = 0.5 * torch.special.erfc(h * (-1 / math.sqrt(2.0)))
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


GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
"""The gated activations' f (the kernel ops' ``act``): swiglu's silu, geglu's gelu (erf form)
and its tanh form."""


def _gated_f(g: Tensor, act: str) -> tuple[Tensor, Tensor]:
    """f(g) and f'(g). silu: g s and s (1 + g (1 - s)), s = sigmoid(g), 1 - s as sigmoid(-g)
    (no cancellation); silu(-inf) is NaN (-inf * 0) and silu(+inf) inf, as F.silu. gelu: as
    bias_gelu's."""
    if act == "silu":
        s = torch.sigmoid(g)
        return g * s, s * (1 + g * torch.sigmoid(-g))
    approximate = "tanh" if act == "gelu_tanh" else "none"
    return gelu(g, approximate), gelu_derivative(g, approximate)


def gated_forward_ref(gate: Tensor, up: Tensor, act: str) -> Tensor:
    """f(gate) * up (act: GATED_ACTIVATIONS), rounded once to gate's dtype; NaN gives NaN."""
    acc = compute_dtype(gate.dtype)
    return (_gated_f(gate.to(acc), act)[0] * up.to(acc)).to(gate.dtype)


def gated_backward_packed_ref(dy: Tensor, proj: Tensor, act: str) -> Tensor:
    """gated_backward_ref for proj = [up | gate] (rows, 2N): the gradient of proj, [dup | dgate]."""
    up, gate = proj.chunk(2, dim=-1)
    dgate, dup = gated_backward_ref(dy, gate, up, act)
    return torch.cat([dup, dgate], dim=-1)


def gated_backward_ref(dy: Tensor, gate: Tensor, up: Tensor, act: str) -> tuple[Tensor, Tensor]:
    """dgate = dy up f'(gate) and dup = dy f(gate), each rounded once to gate's dtype."""
    acc = compute_dtype(gate.dtype)
    d = dy.to(acc)
    value, derivative = _gated_f(gate.to(acc), act)
    return (d * up.to(acc) * derivative).to(gate.dtype), (d * value).to(gate.dtype)
