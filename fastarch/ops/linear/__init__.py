"""The linear layer family: linear (y = x W^T + b, as torch.nn.functional.linear), with
kernels for a few rows of x — a decode step's tokens — where reading W is the whole cost.

api.py: the public function and its torch op (fake implementation, autograd); reference.py: the
definition of correct (and the last backend, PyTorch's GEMM, which runs every larger product);
backends.py: the one table of backends; cpp.py, triton.py: the kernel ops they call.
"""

from fastarch.ops.linear.api import linear

__all__ = ["linear"]
