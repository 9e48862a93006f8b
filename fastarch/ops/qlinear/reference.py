"""GGUF's block formats Q4_0, Q4_1 and Q8_0 and the quantized linear layer in plain PyTorch:
the definition of correct, and the backend of last resort.

A row of W (in_features values) is in_features / 32 blocks of 32 values, each block an fp16
scale d (Q4_1: then an fp16 offset m) and the values: Q4_0 and Q4_1 16 bytes of 4-bit q (byte
j holds value j in its low nibble and value j + 16 in its high one), Q8_0 32 int8 q. A value is
Q4_0 ``(q - 8) * d``, Q4_1 ``q * d + m``, Q8_0 ``q * d``, computed in fp32 as ggml does (the
product d * q is exact in fp32, so these are ggml's values bit for bit).

Kernel-level interface (see backends.py): forward(x, blocks, quant, bias) -> y, x (rows,
in_features) with a contiguous last dim, blocks uint8 (out_features, in_features / 32 * block
bytes), quant a QUANTS key, bias (out_features,) of x's dtype or None; y (rows, out_features)
= x W^T + bias, sums in fp32 (fp64 for fp64 x), rounded once to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK = 32
"""Values per block in every format here."""
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
"""Bytes per block of each format."""


def _f16(blocks: Tensor, start: int) -> Tensor:
    """The fp16 at byte ``start`` of every block (n, nbytes), as float32 (n, 1)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """(n, 16) bytes -> (n, 32) 4-bit values: every low nibble, then every high nibble."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def q4_0_values(b: Tensor) -> Tensor:
    """Q4_0 blocks (n, 18) -> their values (n, 32) fp32: (q - 8) * d."""
    q = _nibbles(b[:, 2:18].contiguous()).to(torch.int8) - 8
    return _f16(b, 0) * q.float()


def q4_1_values(b: Tensor) -> Tensor:
    """Q4_1 blocks (n, 20) -> their values (n, 32) fp32: q * d + m."""
    return _f16(b, 0) * _nibbles(b[:, 4:20].contiguous()).float() + _f16(b, 2)


def q8_0_values(b: Tensor) -> Tensor:
    """Q8_0 blocks (n, 34) -> their values (n, 32) fp32: q * d."""
    return b[:, 2:34].contiguous().view(torch.int8).float() * _f16(b, 0)


_VALUES = {"q4_0": q4_0_values, "q4_1": q4_1_values, "q8_0": q8_0_values}


def dequantize_blocks(blocks: Tensor, quant: str) -> Tensor:
    """W's values (out_features, in_features) fp32 from its blocks (out_features, in_features /
    32 * block bytes) uint8 of format ``quant`` ("q4_0", "q4_1" or "q8_0")."""
    n, nbytes = blocks.shape
    per = BLOCK_BYTES[quant]
    values = _VALUES[quant](blocks.reshape(-1, per))
    return values.reshape(n, nbytes // per * BLOCK)


def quantize_blocks(w: Tensor, quant: str) -> Tensor:
    """The blocks of w (out_features, in_features), in_features a multiple of 32, in format
    ``quant``, rounded to the nearest level as llama.cpp's reference quantizer does (Q4_0 and
    Q8_0: d from the block's largest magnitude; Q4_1: d, m from its range). For tests and for
    weights that did not come quantized; dequantize_blocks gives the values the blocks hold."""
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"quantize_blocks: w must be (out_features, in_features) with in_features a multiple of "
                         f"{BLOCK}, got shape {tuple(w.shape)}")
    if quant not in BLOCK_BYTES:
        raise ValueError(f"quantize_blocks: quant must be one of {sorted(BLOCK_BYTES)}, got {quant!r}")
    v = w.detach().float().reshape(-1, BLOCK)
    if quant == "q4_1":
        lo, hi = v.amin(1, keepdim=True), v.amax(1, keepdim=True)
        d = (hi - lo) / 15
        inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
        q = ((v - lo) * inv + 0.5).floor().clamp(0, 15).to(torch.uint8)
        head = torch.cat([d.half(), lo.half()], 1).view(torch.uint8)
        body = q[:, :16] | (q[:, 16:] << 4)
    else:
        # the signed value of largest magnitude maps to -8 (Q4_0) or +-127 (Q8_0)
        big = v.gather(1, v.abs().argmax(1, keepdim=True))
        d = big / -8 if quant == "q4_0" else big.abs() / 127
        inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
        if quant == "q4_0":
            q = (v * inv + 8.5).floor().clamp(0, 15).to(torch.uint8)
            body = q[:, :16] | (q[:, 16:] << 4)
        else:
            body = (v * inv).round().clamp(-127, 127).to(torch.int8).view(torch.uint8)
        head = d.half().view(torch.uint8)
    return torch.cat([head, body], 1).reshape(w.shape[0], -1).contiguous()


def quantized_linear_ref(x: Tensor, blocks: Tensor, quant: str, bias: Tensor | None) -> Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize_blocks(blocks, quant).to(acc)
    y = F.linear(x.to(acc), w, None if bias is None else bias.to(acc))
    return y.to(x.dtype)
