"""The activations family: bias_gelu (GELU of x + bias, exact erf or tanh form, forward and
backward; the transformer MLP's activation after its first linear layer without the bias),
swiglu (silu(gate) * up, the LLaMA MLP's gated activation) and geglu (gelu(gate) * up, the
diffusion UNet's feed-forward activation): one gated kernel op with the activation as a parameter.

api.py: the public function and its torch ops; reference.py: the definition of correct (and
the last backend); backends.py: the one table of backends.
"""

from fastarch.ops.activations.api import bias_gelu, geglu, geglu_packed, swiglu

__all__ = ["bias_gelu", "geglu", "geglu_packed", "swiglu"]
