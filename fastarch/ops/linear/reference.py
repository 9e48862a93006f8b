"""The linear layer in plain PyTorch: the definition of correct, and the backend of last resort
(PyTorch's GEMM, which runs every product with more rows than the kernels take).

Kernel-level interface (see backends.py): x (rows, in_features) with a contiguous last dim,
weight (out_features, in_features), bias (out_features,) or None, one dtype -> (rows,
out_features): the sums in fp32 (fp64 for fp64 inputs), rounded once to the dtype.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias)
