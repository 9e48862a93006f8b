"""The quantized linear layer's backends, in priority order, each with what it supports: the
one table. All share one kernel-level interface (reference.py): forward(x, blocks, quant, bias).
The CPU, Triton and reference backends read every format of formats.py, the CUDA kernel the
32-value Q4_0, Q4_1 and Q8_0.
The CPU kernel takes every row count (past DIRECT_ROWS it dequantizes W a slice at a time for
an fp32 GEMM: oneDNN's matmul where fastarch.ops.linear's cpu backend runs its fp32 products
there, else PyTorch's); the CUDA and Triton kernels are a few rows' kernels, more rows run the
reference there (on an H200, 2026-12-04: the CUDA kernel 1.08-1.71x F.linear on the dense
weights up to 16 rows; the Triton kernel much slower, see README's GPU status).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastarch import availability, registry
from fastarch.ops.linear import backends as linear_backends
from fastarch.ops.qlinear import triton
from fastarch.ops.qlinear.reference import quantized_linear_ref

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GGML_IDS = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q4_k": 12, "q5_k": 13, "q6_k": 14,
            "iq4_nl": 20, "iq4_xs": 23}
"""The formats' ggml type ids, the C++ kernel's ``quant`` argument."""
GPU_MAX_ROWS = 16
"""The most rows of x the CUDA and Triton kernels take (a decode step's)."""
DIRECT_ROWS = 16
"""The most rows of x the CPU kernel multiplies by the blocks directly (csrc/cpu/qlinear)."""


class QuantizedLinearProblem(NamedTuple):
    """What the backends need to know to say whether they can run a quantized linear layer."""

    device: str
    dtype: torch.dtype
    rows: int
    in_features: int
    out_features: int
    quant: str
    activations: str = "exact"

    @classmethod
    def of(cls, x: Tensor, blocks: Tensor, quant: str, activations: str = "exact") -> QuantizedLinearProblem:
        return cls(x.device.type, x.dtype, x.shape[0], x.shape[1], blocks.shape[0], quant, activations)

    def __str__(self) -> str:
        rounded = ", x rounded to int8" if self.activations == "int8" else ""
        return (f"{self.rows} rows of {self.in_features} features to {self.out_features}, {self.quant} weights,"
                f" {self.dtype} on {self.device}{rounded}")


def _cpu_forward(x: Tensor, blocks: Tensor, quant: str, bias: Tensor | None, activations: str = "exact") -> Tensor:
    return torch.ops.fastarch._quantized_linear(x, blocks, GGML_IDS[quant], bias, x.shape[0] > DIRECT_ROWS
                                                and linear_backends.onednn_gemm(), activations == "int8")


def _cuda_forward(x: Tensor, blocks: Tensor, quant: str, bias: Tensor | None, activations: str = "exact") -> Tensor:
    return torch.ops.fastarch._quantized_linear(x, blocks, GGML_IDS[quant], bias)


def _triton_forward(x: Tensor, blocks: Tensor, quant: str, bias: Tensor | None, activations: str = "exact") -> Tensor:
    return triton.forward(x, blocks, quant, bias)


_INT8_GPU = "x rounded to int8 (activations \"int8\"): the CPU kernel and the reference only"


CUDA_QUANTS = ("q4_0", "q4_1", "q8_0")
"""The formats the CUDA kernel reads (the Triton kernel reads every format)."""


def _cuda_supports(p: QuantizedLinearProblem) -> str | None:
    why = registry.device_reason(p.device, "cuda") or registry.dtype_reason(p.dtype, KERNEL_DTYPES)
    if why is None and p.quant not in CUDA_QUANTS:
        why = f"{p.quant} blocks: the CUDA kernel reads {', '.join(CUDA_QUANTS)}"
    if why is None and p.activations != "exact":
        why = _INT8_GPU
    return why or availability.cuda_device_reason() or _gpu_rows_reason(p, "the CUDA kernel")


def _cpu_supports(p: QuantizedLinearProblem) -> str | None:
    return registry.device_reason(p.device, "cpu") or registry.dtype_reason(p.dtype, KERNEL_DTYPES)


def _triton_supports(p: QuantizedLinearProblem) -> str | None:
    why = availability.triton_device_reason(p.device) or registry.dtype_reason(p.dtype, KERNEL_DTYPES)
    if why is None and p.activations != "exact":
        why = _INT8_GPU
    return why or _gpu_rows_reason(p, "the Triton kernel")


def _gpu_rows_reason(p: QuantizedLinearProblem, who: str) -> str | None:
    if p.rows <= GPU_MAX_ROWS:
        return None
    return (f"{p.rows} rows: {who} takes 1-{GPU_MAX_ROWS}, a decode step's rows (the reference backend's"
            " dequantized GEMM runs the rest)")


def _reference_supports(p: QuantizedLinearProblem) -> str | None:
    return None


BACKENDS = [
    registry.Backend("cuda", availability.cuda, _cuda_supports, _cuda_forward),
    registry.Backend("cpu", availability.cpu, _cpu_supports, _cpu_forward),
    registry.Backend("triton", availability.triton, _triton_supports, _triton_forward),
    registry.Backend("reference", availability.reference, _reference_supports, quantized_linear_ref),
]

registry.register("quantized_linear", BACKENDS)

if availability.cpu() is None:  # _C loaded: its op needs a fake for torch.compile and opcheck

    @torch.library.register_fake("fastarch::_quantized_linear")
    def _(x, blocks, quant, bias, onednn=False, int8=False):
        return x.new_empty((x.shape[0], blocks.shape[0]))
