"""Drop-in modules running fastarch's kernels."""

from fastarch.nn.activations import GEGLU
from fastarch.nn.attention import MultiheadAttention
from fastarch.nn.conv import Conv2d
from fastarch.nn.group_norms import GroupNorm, GroupNormSiLU
from fastarch.nn.linear import Linear, QuantizedLinear, QuantizedLinearStack, set_activations
from fastarch.nn.norms import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm", "GroupNorm", "GroupNormSiLU", "MultiheadAttention", "GEGLU", "Conv2d", "Linear", "QuantizedLinear",
           "QuantizedLinearStack", "set_activations"]
