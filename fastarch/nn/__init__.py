"""Drop-in modules running fastarch's kernels."""

from fastarch.nn.activations import GEGLU
from fastarch.nn.attention import MultiheadAttention
from fastarch.nn.norms import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm", "MultiheadAttention", "GEGLU"]
