"""The linear layer's backends, in priority order, each with what it supports: the one table.
All share one kernel-level interface (see reference.py): forward(x, weight, bias) -> y. The
kernels stream W once against a few rows of x: there W's bytes are the cost. Each backend takes
the row counts where it beats PyTorch's own GEMV/GEMM (the reference backend), which runs the
rest; on CPUs where it measured faster, the cpu backend also takes fp32 products of more rows,
for oneDNN's matmul.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastarch import _extension, availability, registry
from fastarch.ops.linear import cpp, triton
from fastarch.ops.linear.reference import linear_ref

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GPU_MAX_ROWS = 16
"""The most rows of x the GPU kernels take (not yet measured on a GPU)."""
CPU_ROWS = {
    "avx512": {torch.float32: (1, 32), torch.bfloat16: (1, 4), torch.float16: (1, 32)},
    "avx512_bf16": {torch.float32: (1, 32), torch.bfloat16: (1, 16), torch.float16: (1, 32)},
    "avx2": {torch.float32: (1, 32), torch.bfloat16: (1, 24), torch.float16: (3, 24)},
    "generic": {torch.float32: (1, 4)},
}
"""The rows of x (first, last) the CPU kernels take, per kernel build and dtype: where they beat
PyTorch's GEMV/GEMM side by side (``python bench/linear_rows.py``; AMD EPYC Zen 4, 2 threads,
SmolLM2-135M's weights: fp32 2.0x at 1 row, 3-4x at 2-4, 1.5x at 32; bf16 2.0x at 1, 1.65x at
4, parity at 8; fp16 parity with PyTorch's own fp16 GEMV at 1 row, 1.4-3.8x at 2-32; the
baseline portable build wins for fp32 at 1-4 rows only, its fp16/bf16 conversions being scalar;
its AVX2 build, level avx2, measured on the same EPYC with PyTorch restricted to AVX2 too: fp32
2.0x at 1 row, 4.4x at 2, 1.2x at 8-48; bf16 1.3-1.9x at 2-512 (PyTorch's bf16 matmul converts
at AVX2: ~20 GFLOP/s) and 1.0-1.23x at 1 row, taken since x is widened in the kernel's build
(x.to(float) had cost ~4 us a call) and fastarch.optimize's Linear calls the kernel directly
(the op's ~15 us of Python had cost SmolLM2's decode a tenth); fp16 parity at 1, 0.75x at 2,
1.1x at 3, 1.6-1.9x at 4-512. On a real AVX2-only CPU (AMD EPYC, Zen 3, 2 threads; ``python
bench/linear_rows.py --widened``, one SmolLM2 layer) PyTorch's 16-bit F.linear runs at ~19-23
GFLOP/s at every row count, the kernel at 62-75 up to 24 rows and 47-55 from 128, and the
product widened to fp32 (WIDENED_DTYPES) at 67 at 24 rows, 78-104 at 32-64 and 150 at 512:
the kernel takes 16-bit rows up to 24, the widened product the rest.
The "avx512" row covers levels avx512 and amx (the same kernels), "avx512_bf16" that level: its
bf16 products past 4 rows run on vdpbf16ps tiles (x as given), against F.linear on an AMD EPYC
Zen 5 (2 threads, side by side in one process) 1.64x at 5 rows, 1.26x at 8, 1.12x at 16, 0.97x
at 32, where the widened tiles had run at 0.76-0.92x. At level amx PyTorch's bf16 products run
on the AMX tiles: its bf16 row stays at 4 until measured there."""


CPU_GEMM_DTYPES = (torch.float32,)
CPU_GEMM = os.environ.get("FASTARCH_CPU_GEMM", "").strip() or "auto"
"""FASTARCH_CPU_GEMM=auto | onednn | torch (read at import; tests set CPU_GEMM and clear the
registry's choices): where fp32 products of more rows than the CPU kernel takes run.
``onednn``: the cpu backend, on oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise`` on the
weight as it is, no packed copy); ``torch``: the reference backend (``F.linear``: MKL's SGEMM
in torch's x86 wheels). ``auto``: oneDNN on AMD CPUs, where it measured 1.05-1.3x F.linear
(Zen 4, 2 threads: SmolLM2's and MiniLM's projections at 37-4096 rows; in bf16 the two are
within 4%, so bf16 stays on F.linear), F.linear on others until measured there."""
WIDENED_DTYPES = (torch.bfloat16, torch.float16)
"""The dtypes whose products past the kernel's rows the cpu backend runs widened to fp32 on
PyTorch's fp32 GEMM (widened_linear), at level avx2 only: on a CPU without AVX-512 PyTorch's own
bf16 and fp16 GEMMs have no vector path (oneDNN's need AVX-512 or AVX-NE-CONVERT), measured on
an AMD EPYC (Zen 3), 2 threads: F.linear bf16 ~19 GFLOP/s, fp16 ~23, a square torch.mm bf16
~1.2, where widening and the fp32 GEMM reach 67 at 24 rows and 150 at 512 (``python
bench/linear_rows.py --widened``)."""
if CPU_GEMM not in ("auto", "onednn", "torch"):
    raise ValueError(f"FASTARCH_CPU_GEMM={CPU_GEMM!r}: expected auto, onednn or torch")


def onednn_gemm() -> bool:
    """Whether the cpu backend runs fp32 products beyond its kernel's rows (CPU_GEMM): not
    where oneDNN was told to round fp32 products to bf16 or tf32 (torch.backends.mkldnn), which
    F.linear does not do."""
    if CPU_GEMM == "torch" or not torch.backends.mkldnn.is_available():
        return False
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if getattr(matmul, "fp32_precision", "none") not in ("none", "ieee"):
        return False
    return CPU_GEMM == "onednn" or availability.cpuinfo("vendor_id") == "AuthenticAMD"


def _cpu_build() -> str:
    """The CPU_ROWS row of the kernels in use (the extension is loaded where this is asked)."""
    C = _extension._C
    if C._cpu_avx512():
        return "avx512_bf16" if C._cpu_level() == "avx512_bf16" else "avx512"
    return "avx2" if C._cpu_portable_avx2() else "generic"


def _kernel_rows(dtype: torch.dtype) -> tuple[int, int]:
    return CPU_ROWS[_cpu_build()].get(dtype, (1, 0))


class LinearProblem(NamedTuple):
    """What the backends need to know to say whether they can run a linear layer."""

    device: str
    dtype: torch.dtype
    rows: int
    in_features: int
    out_features: int
    weight_contiguous: bool
    weight_k_major: bool = False  # the transpose of a contiguous (in_features, out_features) matrix

    @classmethod
    def of(cls, x: Tensor, weight: Tensor) -> LinearProblem:
        return cls(x.device.type, x.dtype, x.shape[0], x.shape[1], weight.shape[0], *weight_layout(weight))

    def __str__(self) -> str:
        layout = "" if self.weight_contiguous else ", weight K-major" if self.weight_k_major else ", weight not contiguous"
        return f"{self.rows} rows of {self.in_features} features to {self.out_features}, {self.dtype} on {self.device}{layout}"


def k_major(weight: Tensor) -> bool:
    """Whether weight (out_features, in_features) is the transpose of a contiguous (in_features,
    out_features) matrix, as transformers' Conv1D (GPT-2) keeps its weight: ``conv1d.weight.t()``."""
    return weight.dim() == 2 and weight.stride(0) == 1 and weight.stride(1) == weight.shape[0]


def weight_layout(weight: Tensor) -> tuple[bool, bool]:
    """LinearProblem's last two fields for ``weight``: (contiguous, K-major and not contiguous)."""
    contiguous = weight.is_contiguous()
    return contiguous, not contiguous and k_major(weight)


K_MAJOR_ROWS = 4
"""The most rows of x the CPU kernel takes against a K-major weight (csrc/cpu/linear: each W row
read once against up to 4 rows of x; past a decode batch PyTorch's GEMM, which takes either
layout, is the faster)."""


def _rows_reason(p: LinearProblem, first: int, last: int, who: str, k_major_ok: bool = False) -> str | None:
    if not p.weight_contiguous:
        if not (k_major_ok and p.weight_k_major):
            return "weight is not contiguous (the kernel streams its rows)"
        last = min(last, K_MAJOR_ROWS)
    if first <= p.rows <= last:
        return None
    return (f"{p.rows} rows of {p.dtype}: {who} takes {first}-{last}{' of a K-major weight' if p.weight_k_major else ''},"
            " where it beats PyTorch's GEMV/GEMM (the reference backend runs the rest)")


def _cpu_supports(p: LinearProblem) -> str | None:
    why = registry.device_reason(p.device, "cpu") or registry.dtype_reason(p.dtype, KERNEL_DTYPES)
    if why:
        return why
    build = _cpu_build()
    if p.dtype not in CPU_ROWS[build]:
        return registry.MachineReason(
            f"{p.dtype} at decode rows needs the AVX-512 or AVX2 kernels (the baseline build's conversions make it"
            " slower than PyTorch's GEMV)"
        )
    first, last = CPU_ROWS[build][p.dtype]
    product = cpu_product(p.rows, p.dtype) if p.in_features > 0 and p.weight_contiguous else "kernel"
    if product == "widened" or product == "onednn" and onednn_gemm():
        return None  # oneDNN's matmul, or the fp32 GEMM widened
    return _rows_reason(p, first, last, f"the {build} CPU kernel", k_major_ok=True)


def cpu_product(rows: int, dtype: torch.dtype) -> str:
    """Where the cpu backend, once chosen, runs the product of ``rows`` rows of x: "kernel" (its
    own), "onednn" (fp32 past the kernel's rows: oneDNN's matmul) or "widened" (16-bit past them
    at level avx2: widened_linear)."""
    if rows <= _kernel_rows(dtype)[1]:
        return "kernel"
    if dtype in CPU_GEMM_DTYPES:
        return "onednn"
    if _widened_here(dtype):
        return "widened"
    return "kernel"  # (not taken: _cpu_supports gives the rows' reason)


def _widened_here(dtype: torch.dtype) -> bool:
    """Whether the loaded extension's CPU products of ``dtype`` are widened to fp32: a 16-bit
    dtype, at level avx2 (WIDENED_DTYPES)."""
    return dtype in WIDENED_DTYPES and _cpu_build() == "avx2"


def widens(t: Tensor) -> bool:
    """Whether PyTorch's products of CPU tensor t's dtype run widened to fp32 here (the linear
    op's backward too, and fastarch.nn.Conv2d): _widened_here, once the extension is loaded."""
    return (t.dtype in WIDENED_DTYPES and t.device.type == "cpu" and availability.cpu() is None
            and _widened_here(t.dtype))


def widened_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 16-bit product on the fp32 GEMM: x, W and b widened to fp32 (exactly), F.linear in fp32,
    the result rounded once to x's dtype, as a 16-bit GEMM that sums in fp32 rounds it (the sums'
    order is the fp32 GEMM's)."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


ONEDNN_MIN_MACS = 1 << 23
"""Below this many multiply-adds (rows x in_features x out_features) an fp32 product past the
kernel's rows runs PyTorch's GEMM even where oneDNN's is chosen: oneDNN's call costs ~13 us more
(its primitive set up on the weight as it is), its GEMM 0-15% less (AMD EPYC Zen 4, 2 threads,
F.linear against ``mkldnn::_linear_pointwise``: 64x32 by 32x128 8 against 21 us, 64x128 by
128x128 16 against 29, 64x256 by 256x256 53 against 60, 33x576 by 576x576 175 against 152, at
1024x256 by 256x256 and up within 2-6%)."""


def _cpu_forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    product = cpu_product(x.shape[0], x.dtype) if x.shape[1] > 0 else "kernel"
    if product == "onednn":
        if x.shape[0] * x.shape[1] * weight.shape[0] < ONEDNN_MIN_MACS:
            return F.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if product == "widened":
        return widened_linear(x, weight, bias)
    return cpp.forward(x, weight, bias)


def _cuda_supports(p: LinearProblem) -> str | None:
    return (
        registry.device_reason(p.device, "cuda")
        or registry.dtype_reason(p.dtype, KERNEL_DTYPES)
        or availability.cuda_device_reason()
        or _rows_reason(p, 1, GPU_MAX_ROWS, "the CUDA kernel")
    )


def _triton_supports(p: LinearProblem) -> str | None:
    return (availability.triton_device_reason(p.device) or registry.dtype_reason(p.dtype, KERNEL_DTYPES)
            or _rows_reason(p, 1, GPU_MAX_ROWS, "the Triton kernel"))


def _reference_supports(p: LinearProblem) -> str | None:
    return None


BACKENDS = [
    registry.Backend("cuda", availability.cuda, _cuda_supports, cpp.forward),
    registry.Backend("cpu", availability.cpu, _cpu_supports, _cpu_forward),
    registry.Backend("triton", availability.triton, _triton_supports, triton.forward),
    registry.Backend("reference", availability.reference, _reference_supports, linear_ref),
]

registry.register("linear", BACKENDS)
