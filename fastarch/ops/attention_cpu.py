"""The cpu backend of attention: the C++ kernels of csrc/cpu (fastarch::_attention_fwd,
_attention_bwd and _attention_decode for the CPU dispatch key), what they support, and their
registration with attention_backends.add_backend. Kernel-level interface as in
attention_backends.py."""

from __future__ import annotations

import torch

from fastarch import availability, registry
from fastarch._extension import build_info
from fastarch.ops import attention_backends, attention_kernels
from fastarch.ops.attention_backends import AttentionProblem

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 512  # any head dim from 1 up to this (scratch grows with it; the kernels tile it)


def supports(p: AttentionProblem) -> str | None:
    """None when the CPU kernels run ``p``, else why not. Every feature of the interface is
    implemented (masks, key padding, packed variable lengths, windows, dropout, grouped-query
    heads, values' head dim != keys'); fp64 is left to the reference."""
    if p.device != "cpu":
        return f"input is on {p.device}; this backend runs CPU tensors"
    if p.dtype not in KERNEL_DTYPES:
        return f"dtype {p.dtype} is not supported (supported: {', '.join(str(d) for d in KERNEL_DTYPES)})"
    if max(p.head_dim, p.head_dim_v) > MAX_HEAD_DIM:
        return f"head dim {max(p.head_dim, p.head_dim_v)} is above {MAX_HEAD_DIM}"
    info = build_info()  # (its cpu_isa follows fastarch._C._set_cpu_isa)
    if info.get("cpu_isa") != "avx512":
        return f"the CPU attention kernels need AVX-512 (cpu isa is {info.get('cpu_isa', 'unknown')!r})"
    if p.dtype == torch.bfloat16 and not info.get("cpu_has_avx512_bf16"):
        return "bfloat16 needs AVX512-BF16, which this CPU lacks"
    return None


attention_backends.add_backend(
    registry.Backend("cpu", availability.cpu, supports, attention_kernels.forward, attention_kernels.backward),
    decode=registry.Backend("cpu", availability.cpu, supports, attention_kernels.decode),
)
