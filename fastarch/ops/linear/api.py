"""linear: y = x W^T + b (torch.nn.functional.linear's semantics) as one torch op
(``torch.ops.fastarch.linear``) with a fake implementation and autograd. It asks the registry
for a backend (backends.py): the kernels for a few rows of x, PyTorch's GEMM beyond. The
backward is two matrix products and a column sum, which PyTorch's GEMMs run (a decode step,
the kernels' use, has no backward).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import registry
from fastarch.ops import dispatch
from fastarch.ops.linear.backends import LinearProblem, widens
from fastarch.ops.rows import as_rows

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
OP = "fastarch.linear"


def _check(x: object, weight: object, bias: object) -> None:
    """Raises a ValueError/TypeError naming the bad argument and what was expected."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{OP}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have at least one dimension (..., in_features), got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{OP}: weight must be (out_features, in_features) with in_features = x's last dim {x.shape[-1]}, got"
            f" shape {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype:
        raise TypeError(f"{OP}: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{OP}: weight must be on x's device {x.device}, got {weight.device}")
    check_bias(OP, bias, weight.shape[0], x)


def check_bias(op: str, bias: object, out_features: int, x: Tensor) -> None:
    """A linear layer's bias: None, or (out_features,) of x's dtype on x's device; else an error
    naming ``op`` (fastarch.quantized_linear's check too)."""
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"{op}: bias must have shape ({out_features},) (out_features), got {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"{op}: bias must have x's dtype {x.dtype}, got {bias.dtype}")
    if bias.device != x.device:
        raise ValueError(f"{op}: bias must be on x's device {x.device}, got {bias.device}")


@dispatch.custom_op("fastarch::linear", check=lambda x, weight, bias, backend="": _check(x, weight, bias))
def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str = "") -> Tensor:
    rows = as_rows(x)
    impl = registry.choose("linear", LinearProblem.of(rows, weight), backend)
    out = impl.forward(rows, weight, bias.contiguous() if bias is not None else None)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])


@_linear.register_fake
def _(x, weight, bias, backend=""):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b; where PyTorch's 16-bit products have no vector path (backends.widens), widened to
    fp32 and rounded once."""
    return a.float().matmul(b.float()).to(a.dtype) if widens(a) else a.matmul(b)


def _grad(ctx, dy):
    x, weight = ctx.saved_tensors
    dx = _matmul(dy, weight) if ctx.needs_input_grad[0] else None
    dy_rows = dy.reshape(-1, dy.shape[-1])
    dweight = _matmul(dy_rows.t(), x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
    dbias = dy_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dweight, dbias, None


_linear.register_autograd(_grad, setup_context=_setup)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """y = x W^T + b, as torch.nn.functional.linear, fastest where x has few rows (a decode
    step's tokens): the kernels stream W once at the speed memory delivers it, where PyTorch's
    GEMV reaches about half that on a CPU. More rows run PyTorch's GEMM (the reference backend;
    on the CPU, fp32 on oneDNN's matmul where that measured faster, and on CPUs without AVX-512
    16-bit products widened to fp32, PyTorch's 16-bit GEMM having no vector path there).

    x: (..., in_features); weight: (out_features, in_features), contiguous or K-major (the
    transpose of a contiguous (in_features, out_features) matrix, as ``conv1d.weight.t()`` of
    transformers' Conv1D: the CPU kernel reads it as it is for 1-4 rows); bias: (out_features,) or None;
    one dtype: float32/float16/bfloat16 (float64 on the reference backend). Sums in fp32
    (fp64 for fp64), rounded once. Returns (..., out_features). Gradients flow to all three.
    backend: force "cuda", "cpu", "triton" or "reference".
    """
    return _linear(x, weight, bias, registry.requested_backend(backend))  # the op checks its arguments
