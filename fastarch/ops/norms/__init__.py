"""The norms family: layer_norm, rms_norm and the pre-norm fused residual variants
add_layer_norm / add_rms_norm, over the last dimension.

api.py: the public functions and their torch ops (fake implementations, autograd);
reference.py: the definition of correct (and the last backend); backends.py: the one table of
backends and what each supports; cpp.py, triton.py: the kernel ops they call.
"""

from fastarch.ops.norms.api import add_layer_norm, add_rms_norm, layer_norm, rms_norm

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]
