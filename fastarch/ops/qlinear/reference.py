"""The quantized linear layer in plain PyTorch: the definition of correct, and the backend of
last resort. The block formats (W's values, bit for bit ggml's) are in formats.py.

Kernel-level interface (see backends.py): forward(x, blocks, quant, bias) -> y, x (rows,
in_features) with a contiguous last dim, blocks uint8 (out_features, bytes per row: in_features
/ BLOCK_VALUES[quant] blocks of BLOCK_BYTES[quant]), quant a QUANTS key, bias (out_features,) of
x's dtype or None; y (rows, out_features) = x W^T + bias, sums in fp32 (fp64 for fp64 x),
rounded once to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastarch.ops.qlinear.formats import dequantize_blocks


def quantized_linear_ref(x: Tensor, blocks: Tensor, quant: str, bias: Tensor | None) -> Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize_blocks(blocks, quant).to(acc)
    y = F.linear(x.to(acc), w, None if bias is None else bias.to(acc))
    return y.to(x.dtype)
