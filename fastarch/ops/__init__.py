"""fastarch's public functional API. Each op picks its backend through fastarch.registry."""

from fastarch.ops.norms import add_layer_norm, add_rms_norm, layer_norm, rms_norm

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]
