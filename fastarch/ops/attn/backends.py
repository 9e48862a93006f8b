"""The attention ops' backends, in priority order, each with what it supports: the one table.

Ops: "attention" (forward and backward), "attention_decode", "append_kv". Interface (the
semantics are reference.py's; args is an AttentionArgs):

    forward(q, k, v, args) -> (out, lse)
    backward(dout, q, k, v, out, lse, args) -> (dq, dk, dv)
    decode(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left) -> (out, lse)
    append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens) -> None

q/k/v are 4-D (B, H, S, D) views with contiguous last dims (packed variable-length input is
the view (1, H, total, D)); attn_mask, if any, has q's dtype and broadcasts to (B, H, Sq, Sk).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from fastarch import availability, registry
from fastarch._extension import build_info
from fastarch.ops.attn import cpp, triton
from fastarch.ops.attn.args import AttentionProblem
from fastarch.ops.attn.reference import (
    append_kv_ref,
    attention_backward_ref,
    attention_decode_ref,
    attention_forward_ref,
)


def no_work(q: Tensor, k: Tensor) -> bool:
    """No query, or no key: the result is known (zeros, lse -inf) without a backend."""
    return q.numel() == 0 or k.shape[2] == 0


# ----------------------------------------------------------------------------- cpu

CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_MAX_HEAD_DIM = 512  # any head dim from 1 up to this (scratch grows with it; the kernels tile it)


def cpu_supports(p: AttentionProblem) -> str | None:
    """The C++ CPU kernels implement every feature of the interface (masks, key padding,
    packed variable lengths, windows, dropout, grouped-query heads, values' head dim != keys'),
    on any CPU: the AVX-512 kernels where the CPU has them (bf16 with AVX512-BF16), the
    portable ones elsewhere; fp64 is left to the reference."""
    if why := registry.device_reason(p.device, "cpu") or registry.dtype_reason(p.dtype, CPU_DTYPES):
        return why
    if max(p.head_dim, p.head_dim_v) > CPU_MAX_HEAD_DIM:
        return f"head dim {max(p.head_dim, p.head_dim_v)} is above {CPU_MAX_HEAD_DIM}"
    return None


# ----------------------------------------------------------------------------- cuda

CUDA_DTYPES = (torch.float16, torch.bfloat16)
# The kernels are compiled for the head dims of setup.py's CUDA_ATTENTION_HEAD_DIMS (build_info
# lists them); a head dim that is a multiple of 8 runs on the next one up (16-byte rows:
# tensor-core fragments and cp.async copies).
CUDA_HEAD_DIM_MULTIPLE = 8
# mma.sync with bf16, ldmatrix and cp.async need compute capability 8.0.
CUDA_MIN_CAPABILITY = (8, 0)
# Shared memory per block of the largest kernel for head dims above 128 (the backward: K, V,
# Q, dO, P and dS tiles); GPUs of capability 8.6 / 8.9 allow 99 KB.
CUDA_LARGE_HEAD_DIM_SMEM = 105 * 1024


def cuda_available() -> str | None:
    if why := availability.cuda():
        return why
    if not cpp.has_kernel("_attention_fwd", "CUDA"):
        return registry.MachineReason("fastarch._C has no CUDA attention kernels (built from an older source tree: rebuild it)")
    return None


@functools.cache
def _cuda_device_reason(index: int, large_head_dim: bool) -> str | None:
    props = torch.cuda.get_device_properties(index)
    if (props.major, props.minor) < CUDA_MIN_CAPABILITY:
        need = ".".join(map(str, CUDA_MIN_CAPABILITY))
        return registry.MachineReason(
            f"the CUDA kernels need compute capability {need} or newer, {props.name} has {props.major}.{props.minor}"
        )
    smem = getattr(props, "shared_memory_per_block_optin", None)
    if large_head_dim and smem is not None and smem < CUDA_LARGE_HEAD_DIM_SMEM:
        return registry.MachineReason(
            f"head dims above 128 need {CUDA_LARGE_HEAD_DIM_SMEM // 1024} KB of shared memory per block,"
            f" {props.name} allows {smem // 1024} KB"
        )
    return None


@functools.cache
def _cuda_largest_head_dim() -> int:
    return max(build_info().get("cuda_attention_head_dims") or [256])


def cuda_supports(p: AttentionProblem) -> str | None:
    """fp16/bf16, head dims that are multiples of 8 up to 256 (values' head dim equal to the
    keys'), and every feature of the interface, on GPUs the build was compiled for."""
    if why := registry.device_reason(p.device, "cuda") or registry.dtype_reason(p.dtype, CUDA_DTYPES):
        return why
    if p.head_dim_v != p.head_dim:
        return f"values' head dim {p.head_dim_v} differs from the keys' {p.head_dim} (the kernels take one head dim)"
    largest = _cuda_largest_head_dim()
    if p.head_dim % CUDA_HEAD_DIM_MULTIPLE != 0 or p.head_dim > largest:
        return f"head dim {p.head_dim} is not a multiple of {CUDA_HEAD_DIM_MULTIPLE} up to {largest}"
    if torch.cuda.is_available():
        return availability.cuda_device_reason() or _cuda_device_reason(torch.cuda.current_device(), p.head_dim > 128)
    return None


# ----------------------------------------------------------------------------- triton

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Head dims are padded to a power of two (at least 16) inside the kernels; above 256 the tiles
# no longer fit a GPU's registers and shared memory.
TRITON_MAX_HEAD_DIM = 256


def triton_supports(p: AttentionProblem) -> str | None:
    """Every feature of the interface, head dims up to 256 of any size, values' head dim !=
    keys'; fp32 runs exact fp32 dots (input_precision="ieee": correct, not on tensor cores)."""
    if why := availability.triton_device_reason(p.device) or registry.dtype_reason(p.dtype, TRITON_DTYPES):
        return why
    if max(p.head_dim, p.head_dim_v) > TRITON_MAX_HEAD_DIM:
        return f"head dim {max(p.head_dim, p.head_dim_v)} is above {TRITON_MAX_HEAD_DIM}"
    return None


# ----------------------------------------------------------------------------- reference


def reference_supports(p: AttentionProblem) -> str | None:
    return None


# ----------------------------------------------------------------------------- the tables

# Priority: cpu first (it never takes a CUDA tensor; a CPU tensor reaches Triton only in its
# slow interpreter), then Triton before our CUDA C++ kernels. Measured on an H200
# (bench/results/gpu-h200-attention-2026-11-26.json, -decode-): Triton's forward ran 1.15-1.50x
# SDPA's flash kernel where the CUDA (mma.sync) one ran 0.78-0.89x, its forward+backward
# 0.55-1.24x against 0.47-0.55x, its decode 2-3.5x faster than the CUDA one.
ATTENTION = [
    registry.Backend("cpu", availability.cpu, cpu_supports, cpp.forward, cpp.backward),
    registry.Backend("triton", availability.triton, triton_supports, triton.forward, triton.backward),
    registry.Backend("cuda", cuda_available, cuda_supports, cpp.forward, cpp.backward),
    registry.Backend("reference", availability.reference, reference_supports, attention_forward_ref,
                     attention_backward_ref),
]
DECODE = [
    registry.Backend("cpu", availability.cpu, cpu_supports, cpp.decode),
    registry.Backend("triton", availability.triton, triton_supports, triton.decode),
    registry.Backend("cuda", cuda_available, cuda_supports, cpp.decode),
    registry.Backend("reference", availability.reference, reference_supports, attention_decode_ref),
]
# append_kv is a copy: every backend takes every dtype and head dim of its device.


def cpu_copy_supports(p: AttentionProblem) -> str | None:
    return registry.device_reason(p.device, "cpu")


def cuda_copy_supports(p: AttentionProblem) -> str | None:
    return registry.device_reason(p.device, "cuda") or availability.cuda_device_reason()


def triton_copy_supports(p: AttentionProblem) -> str | None:
    return availability.triton_device_reason(p.device)


APPEND_KV = [
    registry.Backend("cpu", availability.cpu, cpu_copy_supports, cpp.append_kv),
    registry.Backend("triton", availability.triton, triton_copy_supports, triton.append_kv),
    registry.Backend("cuda", cuda_available, cuda_copy_supports, cpp.append_kv),
    registry.Backend("reference", availability.reference, reference_supports, append_kv_ref),
]

registry.register("attention", ATTENTION)
registry.register("attention_decode", DECODE)
registry.register("append_kv", APPEND_KV)
