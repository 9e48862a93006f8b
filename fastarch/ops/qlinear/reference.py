"""The quantized linear layer in plain PyTorch: the definition of correct, and the backend of
last resort. The block formats (W's values, bit for bit ggml's) are in formats.py.

Kernel-level interface (see backends.py): forward(x, blocks, quant, bias, activations) -> y, x
(rows, in_features) with a contiguous last dim, blocks uint8 (out_features, bytes per row:
in_features / BLOCK_VALUES[quant] blocks of BLOCK_BYTES[quant]), quant a QUANTS key, bias
(out_features,) of x's dtype or None, activations "exact" or "int8"; y (rows, out_features) =
x W^T + bias (x replaced by quantize_activations(x) for "int8"), sums in fp32 (fp64 for fp64
x), rounded once to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastarch.ops.qlinear.formats import dequantize_blocks


ACTIVATIONS = ("exact", "int8")
"""What quantized_linear multiplies W's values with: x as it is, or x rounded to int8 per 32
values (quantize_activations)."""


def check_activations(who: str, activations: object) -> None:
    """A ValueError naming ``who`` unless activations is one of ACTIVATIONS."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"{who}: activations must be 'exact' or 'int8', got {activations!r}")


def quantize_activations(x: Tensor) -> Tensor:
    """x (..., in_features; a multiple of 32) rounded as activations "int8" round it, as fp32:
    each 32 consecutive values become d q with d = max |x| / 127 and q = round(x * (127 / max
    |x|)) (ties to even, |q| <= 127; each division one correctly rounded fp32 division, as the
    kernels'), all computed in fp32 (fp64 x is first rounded to fp32);
    a block of zeros stays zero, and a block holding an inf or a NaN becomes NaN. The products
    then multiply W's codes by the int8 q exactly in integers (what llama.cpp's quantized dot
    products do, with the same rounding of x for the 32-value formats; its k-quants round x per
    256 values)."""
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    finite = torch.isfinite(blocks).all(-1, keepdim=True)
    nonzero = finite & (amax > 0)
    # 127 / max|x| as one fp32 division (a scalar's ``127.0 / t`` is reciprocal(t) * 127: two roundings)
    inv = torch.where(nonzero, torch.full_like(amax, 127.0).div(torch.where(nonzero, amax, 1.0)), 0.0)
    q = torch.round(blocks * inv).clamp(-127, 127)
    d = torch.where(finite, amax / 127.0, torch.nan)
    return (torch.where(finite, q, 0.0) * d).reshape(x.shape)


def quantized_linear_ref(x: Tensor, blocks: Tensor, quant: str, bias: Tensor | None,
                         activations: str = "exact") -> Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize_blocks(blocks, quant).to(acc)
    xs = quantize_activations(x) if activations == "int8" else x
    y = F.linear(xs.to(acc), w, None if bias is None else bias.to(acc))
    return y.to(x.dtype)
