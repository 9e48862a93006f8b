"""quantized_linear: y = x W^T + b with W held as GGUF blocks (formats.QUANTS) as one torch
op (``torch.ops.fastarch.quantized_linear``) with a fake implementation and autograd for x and
the bias (W's blocks are constants: a LoRA adapter or a prompt tuned over a quantized model
trains through it). The backward is dy times W's values, dequantized for it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import registry
from fastarch.ops import dispatch
from fastarch.ops.linear.api import check_bias
from fastarch.ops.qlinear.backends import QuantizedLinearProblem
from fastarch.ops.qlinear.formats import BLOCK_BYTES, BLOCK_VALUES, QUANTS, dequantize_blocks, row_bytes
from fastarch.ops.qlinear.reference import check_activations
from fastarch.ops.rows import as_rows

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
OP = "fastarch.quantized_linear"


def _check(x: object, weight: object, quant: object, bias: object, activations: object = "exact") -> None:
    """Raises a ValueError/TypeError naming the bad argument and what was expected."""
    check_activations(OP, activations)
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if quant not in BLOCK_BYTES:
        raise ValueError(f"{OP}: quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{OP}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    block = BLOCK_VALUES[quant]
    if x.dim() < 1 or x.shape[-1] % block:
        raise ValueError(f"{OP}: x must be (..., in_features) with in_features a multiple of {block} ({quant}'s"
                         f" block), got shape {tuple(x.shape)}")
    nbytes = row_bytes(x.shape[-1], quant)
    if weight.dtype != torch.uint8 or weight.dim() != 2 or weight.shape[1] != nbytes:
        raise ValueError(
            f"{OP}: weight must be uint8 (out_features, {nbytes}): per row in_features / {block} {quant} blocks of"
            f" {BLOCK_BYTES[quant]} bytes, got {weight.dtype} of shape {tuple(weight.shape)}"
        )
    if weight.device != x.device:
        raise ValueError(f"{OP}: weight must be on x's device {x.device}, got {weight.device}")
    check_bias(OP, bias, weight.shape[0], x)


@dispatch.custom_op(
    "fastarch::quantized_linear",
    check=lambda x, weight, quant, bias, activations="exact", backend="": _check(x, weight, quant, bias, activations),
)
def _quantized_linear(x: Tensor, weight: Tensor, quant: str, bias: Tensor | None, activations: str = "exact",
                      backend: str = "") -> Tensor:
    rows = as_rows(x)
    blocks = weight.contiguous()
    impl = registry.choose("quantized_linear", QuantizedLinearProblem.of(rows, blocks, quant, activations), backend)
    out = impl.forward(rows, blocks, quant, bias.contiguous() if bias is not None else None, activations)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])


@_quantized_linear.register_fake
def _(x, weight, quant, bias, activations="exact", backend=""):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, quant, bias, activations, backend = inputs
    ctx.save_for_backward(weight)
    ctx.quant, ctx.has_bias = quant, bias is not None


def _grad(ctx, dy):
    (weight,) = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0]:  # dy W in fp32 (fp64 for fp64), rounded once
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        dx = dy.to(acc).matmul(dequantize_blocks(weight, ctx.quant).to(acc)).to(dy.dtype)
    dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return dx, None, None, dbias, None, None


_quantized_linear.register_autograd(_grad, setup_context=_setup)


def quantized_linear(
    x: Tensor, weight: Tensor, quant: str, bias: Tensor | None = None, *, activations: str = "exact",
    backend: str | None = None
) -> Tensor:
    """y = x W^T + b with W given as block-quantized rows, as GGUF files store them: a decode
    step reads 0.53 (IQ4_XS), 0.56 (Q4_0, Q4_K, IQ4_NL), 0.625 (Q4_1), 0.69 (Q5_0, Q5_K), 0.75 (Q5_1), 0.82 (Q6_K) or
    1.06 (Q8_0) bytes per weight where bf16 reads 2.

    x: (..., in_features), in_features a multiple of the format's block (32; 256 for the
    k-quants), float32/float16/bfloat16 (float64 on the reference backend); weight: uint8
    (out_features, in_features / BLOCK_VALUES[quant] * BLOCK_BYTES[quant]), each row its blocks
    in order (``quantize_blocks``, or a GGUF tensor's bytes); quant: one of QUANTS ("q4_0",
    "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"); bias: (out_features,) of x's dtype,
    or None. W's values are exactly ggml's dequantized ones (``dequantize_blocks``); sums in
    fp32, rounded once to x's dtype.
    activations: "exact" (the default) multiplies W's values with x as it is; "int8" with x
    rounded to int8 per 32 values (``reference.quantize_activations``: a relative error of up to
    1/254 of each 32 values' largest), as llama.cpp does: W's codes times x's in integers, ~2x
    fewer instructions per weight where a decode step on 2 CPU cores is bound by them (the CPU
    backend; vpdpbusd on CPUs with AVX512-VNNI). A block of x holding an inf gives NaN.
    Returns (..., out_features). Gradients flow to x and bias (W's blocks are constants; with
    "int8" the gradient is the exact layer's: the rounding passes gradients straight through).
    backend: force "cpu", "triton" or "reference".
    """
    return _quantized_linear(x, weight, quant, bias, activations, registry.requested_backend(backend))
