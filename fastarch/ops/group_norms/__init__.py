"""The group_norms family: group_norm, GroupNorm with the diffusion UNet's per-sample
scale/shift and SiLU fused in, over (N, C, *spatial) in either memory format.

api.py: the public function and its torch ops (fake implementations, autograd); reference.py:
the definition of correct (and the last backend); backends.py: the one table of backends and
what each supports; cpp.py, triton.py: the kernel ops they call.
"""

from fastarch.ops.group_norms.api import group_norm

__all__ = ["group_norm"]
