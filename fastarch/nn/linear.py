"""``Linear``: a drop-in subclass of torch.nn.Linear running fastarch.ops.linear, which streams
the weight once for a few rows of input (a decode step's tokens; about twice PyTorch's GEMV on a
CPU) and runs PyTorch's GEMM for more. Same constructor, parameters and state_dict keys."""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import ops
from fastarch.nn._source import check_source


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """fastarch.ops.linear; torch's under autocast (which casts x and the weight; the op takes
    one dtype)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.nn.functional.linear(x, weight, bias)
    return ops.linear(x, weight, bias)


class Linear(torch.nn.Linear):
    """torch.nn.Linear running fastarch.ops.linear. x: (..., in_features) -> (..., out_features).
    Under autocast it runs torch's (autocast casts x and the weight; the op takes one dtype)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)

    @classmethod
    def from_torch(cls, module: torch.nn.Linear) -> Linear:
        """A fastarch Linear sharing ``module``'s parameters (no copy)."""
        check_source(cls, module, torch.nn.Linear)
        new = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        new.weight, new.bias = module.weight, module.bias
        return new.train(module.training)


class QuantizedLinear(torch.nn.Module):
    """A linear layer whose weight is held as GGUF blocks (a fastarch.ops.qlinear.QUANTS format)
    and run by fastarch.ops.quantized_linear: a decode step reads 0.56-1.06 bytes per weight
    where bf16 reads 2. The blocks are a buffer ``weight`` (uint8 (out_features, bytes per
    row)); the bias, if any, a parameter of the compute dtype. x: (..., in_features) ->
    (..., out_features), x's dtype. Gradients flow to x and the bias, not to the blocks."""

    changes = 0
    """Counts every change of any layer's ``activations`` (decode plans that read them ask again)."""

    def __init__(self, in_features: int, out_features: int, quant: str, bias: bool = True, *,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 activations: str = "exact") -> None:
        super().__init__()
        from fastarch.ops.qlinear.formats import BLOCK_VALUES, QUANTS, row_bytes

        if quant not in BLOCK_VALUES:
            raise ValueError(f"QuantizedLinear: quant must be one of {', '.join(QUANTS)}, got {quant!r}")
        if in_features % BLOCK_VALUES[quant]:
            raise ValueError(f"QuantizedLinear: in_features must be a multiple of {BLOCK_VALUES[quant]} ({quant}'s"
                             f" block), got {in_features}")
        self.in_features, self.out_features, self.quant = in_features, out_features, quant
        self.activations = activations
        nbytes = row_bytes(in_features, quant)
        self.register_buffer("weight", torch.zeros(out_features, nbytes, dtype=torch.uint8, device=device))
        bias_param = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.register_parameter("bias", bias_param)  # (None too, as nn.Linear: a "bias" entry either way)

    @property
    def activations(self) -> str:
        """What the products multiply W's values with: "exact" (x as it is) or "int8" (x rounded
        to int8 per 32 values, llama.cpp's arithmetic: fastarch.ops.quantized_linear)."""
        return self._activations

    @activations.setter
    def activations(self, value: str) -> None:
        from fastarch.ops.qlinear.reference import check_activations

        check_activations("QuantizedLinear", value)
        self._activations = value
        QuantizedLinear.changes += 1

    def forward(self, x: Tensor) -> Tensor:
        return ops.quantized_linear(x, self.weight, self.quant, self.bias, activations=self._activations)

    @classmethod
    def from_blocks(cls, blocks: Tensor, quant: str, in_features: int, bias: Tensor | None = None, *,
                    activations: str = "exact") -> QuantizedLinear:
        """The layer holding ``blocks`` (no copy) and ``bias`` (a parameter sharing its data)."""
        new = cls(in_features, blocks.shape[0], quant, bias=False, device="meta", activations=activations)
        if tuple(blocks.shape) != tuple(new.weight.shape) or blocks.dtype != torch.uint8:
            raise ValueError(f"QuantizedLinear.from_blocks: blocks must be uint8 {tuple(new.weight.shape)} for"
                             f" {in_features} in_features of {quant}, got {blocks.dtype} {tuple(blocks.shape)}")
        new.weight = blocks
        new.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
        return new

    @classmethod
    def from_linear(cls, module: torch.nn.Linear, quant: str, *, activations: str = "exact") -> QuantizedLinear:
        """``module``'s weight quantized to ``quant`` (fastarch.ops.qlinear.quantize_blocks: the
        nearest levels, as llama.cpp's reference quantizer); its bias kept as it is (shared)."""
        from fastarch.ops.qlinear.formats import quantize_blocks

        new = cls.from_blocks(quantize_blocks(module.weight, quant), quant, module.in_features,
                              activations=activations)
        new.bias = module.bias
        return new

    def extra_repr(self) -> str:
        rounded = ", activations=int8" if self._activations == "int8" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, quant={self.quant},"
                f" bias={self.bias is not None}{rounded}")


class QuantizedLinearStack(torch.nn.Module):
    """Linear layers of one input stacked along their outputs, each a QuantizedLinear in its own
    block format: y = cat([part(x) for part in parts], -1). What a stacked projection (LLaMA's
    q/k/v) becomes when a GGUF file stores its parts in formats that one quantized_linear call
    cannot read together (llama-quantize's Q4_K_M: q and k in Q4_K, v in Q6_K in some layers).
    ``parts``: the QuantizedLinear layers, in output order, all of one in_features."""

    def __init__(self, parts: list[QuantizedLinear]) -> None:
        super().__init__()
        if not parts or any(type(p) is not QuantizedLinear or p.in_features != parts[0].in_features for p in parts):
            raise ValueError("QuantizedLinearStack: parts must be QuantizedLinear layers of one in_features")
        self.parts = torch.nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([ops.quantized_linear(x, p.weight, p.quant, p.bias, activations=p._activations)
                          for p in self.parts], -1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def set_activations(module: torch.nn.Module, activations: str) -> int:
    """Sets ``activations`` ("exact" or "int8") of every QuantizedLinear in module (a model of
    from_pretrained(quantized=True), say); returns how many. "int8" multiplies W's values with x
    rounded to int8 per 32 values, as llama.cpp does (fastarch.ops.quantized_linear)."""
    from fastarch.ops.qlinear.reference import check_activations

    check_activations("set_activations", activations)
    layers = [m for m in module.modules() if type(m) is QuantizedLinear]
    for layer in layers:
        layer.activations = activations
    return len(layers)
