"""fastarch's public functional API, one package per op family (norms, attn, activations, rope, group_norms,
linear, qlinear).
Each op picks its backend through fastarch.registry."""

from fastarch.ops.activations import bias_gelu, geglu, geglu_packed, swiglu
from fastarch.ops.attn import append_kv, attention, attention_decode, scaled_dot_product_attention
from fastarch.ops.group_norms import group_norm
from fastarch.ops.linear import linear
from fastarch.ops.norms import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from fastarch.ops.qlinear import quantized_linear
from fastarch.ops.rope import rotary, rotary_tables

__all__ = [
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "attention",
    "scaled_dot_product_attention",
    "attention_decode",
    "append_kv",
    "bias_gelu",
    "geglu",
    "geglu_packed",
    "rotary",
    "rotary_tables",
    "swiglu",
    "group_norm",
    "linear",
    "quantized_linear",
]
