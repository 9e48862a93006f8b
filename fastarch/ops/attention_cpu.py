"""The cpu backend of attention: the C++ kernels of csrc/cpu (fastarch::_attention_fwd,
_attention_bwd and _attention_decode for the CPU dispatch key), what they support, and their
registration with attention_backends.add_backend. Kernel-level interface as in
attention_backends.py."""

from __future__ import annotations

import torch

from fastarch import availability, registry
from fastarch.ops import attention_backends, attention_kernels
from fastarch.ops.attention_backends import AttentionProblem

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 512  # any head dim from 1 up to this (scratch grows with it; the kernels tile it)


def supports(p: AttentionProblem) -> str | None:
    """None when the CPU kernels run ``p``, else why not. Every feature of the interface is
    implemented (masks, key padding, packed variable lengths, windows, dropout, grouped-query
    heads, values' head dim != keys'), on any CPU: the AVX-512 kernels where the CPU has them
    (bf16 with AVX512-BF16), the portable ones elsewhere; fp64 is left to the reference."""
    if p.device != "cpu":
        return f"input is on {p.device}; this backend runs CPU tensors"
    if p.dtype not in KERNEL_DTYPES:
        return f"dtype {p.dtype} is not supported (supported: {', '.join(str(d) for d in KERNEL_DTYPES)})"
    if max(p.head_dim, p.head_dim_v) > MAX_HEAD_DIM:
        return f"head dim {max(p.head_dim, p.head_dim_v)} is above {MAX_HEAD_DIM}"
    return None


attention_backends.add_backend(
    registry.Backend("cpu", availability.cpu, supports, attention_kernels.forward, attention_kernels.backward),
    decode=registry.Backend("cpu", availability.cpu, supports, attention_kernels.decode),
)
