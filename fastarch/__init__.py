"""fastarch: Triton and C++/CUDA kernels for transformers and diffusion models, with fast CPU
fallbacks, registered as torch ops.

    import fastarch
    y = fastarch.ops.layer_norm(x, weight, bias)     # fastest backend that can run x
    with fastarch.backend("triton"): ...             # force one
    fastarch.info()                                   # what is available, and why not
"""

from fastarch import _extension  # noqa: F401  (loads fastarch._C first: it defines the kernel ops)
from fastarch import models, nn, ops
from fastarch.system_info import info
from fastarch.registry import NoBackendError, backend
from fastarch.optimize import optimize, restore
from fastarch.override import sdpa_override

__version__ = "0.1.0"
__all__ = ["ops", "nn", "models", "backend", "info", "NoBackendError", "optimize", "restore", "sdpa_override", "__version__"]
