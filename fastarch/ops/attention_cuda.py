"""The cuda backend of attention: the CUDA kernels of csrc/cuda (fastarch::_attention_fwd /
_bwd / _decode for the CUDA dispatch key, through attention_kernels.py), what they support,
and their registration with attention_backends.add_backend. Kernel-level interface as in
attention_backends.py."""

from __future__ import annotations

import functools

import torch

from fastarch import availability, registry
from fastarch.ops import attention_backends, attention_kernels
from fastarch.ops.attention_backends import AttentionProblem

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# The kernels are compiled for head dims 32, 64, 128 and 256; a head dim that is a multiple of
# 8 runs on the next one up (16-byte rows: tensor-core fragments and cp.async copies).
HEAD_DIM_MULTIPLE = 8
MAX_HEAD_DIM = 256
# mma.sync with bf16, ldmatrix and cp.async need compute capability 8.0.
MIN_CAPABILITY = (8, 0)
# Shared memory per block of the largest kernel for head dims above 128 (the backward:
# K, V, Q, dO, P and dS tiles); GPUs of capability 8.6 / 8.9 allow 99 KB.
LARGE_HEAD_DIM_SMEM = 105 * 1024


def available() -> str | None:
    if why := availability.cuda():
        return why
    if not attention_kernels.has_kernel("_attention_fwd", "CUDA"):
        return "fastarch._C has no CUDA attention kernels (built from an older source tree: rebuild it)"
    return None


@functools.cache
def _device_reason(index: int, large_head_dim: bool) -> str | None:
    props = torch.cuda.get_device_properties(index)
    if (props.major, props.minor) < MIN_CAPABILITY:
        return (
            f"the CUDA kernels need compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer,"
            f" {props.name} has {props.major}.{props.minor}"
        )
    smem = getattr(props, "shared_memory_per_block_optin", None)
    if large_head_dim and smem is not None and smem < LARGE_HEAD_DIM_SMEM:
        return (
            f"head dims above 128 need {LARGE_HEAD_DIM_SMEM // 1024} KB of shared memory per block,"
            f" {props.name} allows {smem // 1024} KB"
        )
    return None


def supports(p: AttentionProblem) -> str | None:
    """None when the CUDA kernels run ``p``, else why not. They take fp16/bf16, head dims that
    are multiples of 8 up to 256 (values' head dim equal to the keys'), and every feature of
    the interface: masks, key padding, variable lengths, windows, dropout, grouped-query heads."""
    if p.device != "cuda":
        return f"input is on {p.device}; this backend runs CUDA tensors"
    if p.dtype not in KERNEL_DTYPES:
        return f"dtype {p.dtype} is not supported (supported: {', '.join(str(d) for d in KERNEL_DTYPES)})"
    if p.head_dim_v != p.head_dim:
        return f"values' head dim {p.head_dim_v} differs from the keys' {p.head_dim} (the kernels take one head dim)"
    if p.head_dim % HEAD_DIM_MULTIPLE != 0 or p.head_dim > MAX_HEAD_DIM:
        return f"head dim {p.head_dim} is not a multiple of {HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM}"
    if torch.cuda.is_available():
        return _device_reason(torch.cuda.current_device(), p.head_dim > 128)
    return None


def supports_decode(p: AttentionProblem) -> str | None:
    return supports(p)


attention_backends.add_backend(
    registry.Backend("cuda", available, supports, attention_kernels.forward, attention_kernels.backward),
    decode=registry.Backend("cuda", available, supports_decode, attention_kernels.decode),
)
