"""Bad input to the norm ops: each a clear error naming the argument and what was expected."""

from __future__ import annotations

import re

import pytest
import torch

import fastarch
from fastarch import ops

OPS = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]


def call(op, x, residual=None, weight=None, bias=None, eps=1e-5, backend=None, weight_offset=0.0):
    if residual is None and op.startswith("add_") and isinstance(x, torch.Tensor):
        residual = torch.zeros_like(x)
    if isinstance(residual, str):  # "none": the residual passed as None
        residual = None
    kw = dict(weight_offset=weight_offset, backend=backend)
    if op == "layer_norm":
        return ops.layer_norm(x, weight, bias, eps, **kw)
    if op == "rms_norm":
        return ops.rms_norm(x, weight, eps, **kw)
    if op == "add_layer_norm":
        return ops.add_layer_norm(x, residual, weight, bias, eps, **kw)
    return ops.add_rms_norm(x, residual, weight, eps, **kw)


x8 = torch.randn(4, 8)
BAD = {  # name -> (kwargs, exception, message pattern)
    "x-not-a-tensor": (dict(x=[[1.0, 2.0]]), TypeError, "x must be a torch.Tensor"),
    "x-0d": (dict(x=torch.tensor(1.0)), ValueError, "x must have at least 1 dimension"),
    "x-empty-hidden": (dict(x=torch.randn(4, 0)), ValueError, "last dimension .* must be at least 1"),
    "x-integer": (dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, "x must be float32, float16, bfloat16 or float64, got torch.int64"),
    "x-bool": (dict(x=torch.ones(4, 8, dtype=torch.bool)), TypeError, "x must be float32"),
    "weight-wrong-size": (dict(x=x8, weight=torch.ones(7)), ValueError, r"weight must have shape \(8,\)"),
    "weight-2d": (dict(x=x8, weight=torch.ones(1, 8)), ValueError, r"weight must have shape \(8,\)"),
    "weight-dtype": (dict(x=x8, weight=torch.ones(8, dtype=torch.float16)), TypeError, "weight must have x's dtype torch.float32"),
    "weight-int": (dict(x=x8, weight=torch.ones(8, dtype=torch.int32)), TypeError, "weight must have x's dtype"),
    "weight-device": (dict(x=x8, weight=torch.ones(8, device="meta")), ValueError, "weight must be on x's device cpu"),
    "weight-not-tensor": (dict(x=x8, weight=[1.0] * 8), TypeError, "weight must be a torch.Tensor"),
    "eps-nan": (dict(x=x8, eps=float("nan")), ValueError, "eps must be finite and >= 0, got nan"),
    "eps-inf": (dict(x=x8, eps=float("inf")), ValueError, "eps must be finite"),
    "eps-negative": (dict(x=x8, eps=-1e-5), ValueError, "eps must be finite and >= 0"),
    "eps-string": (dict(x=x8, eps="1e-5"), TypeError, "eps must be a float, got str"),
    "eps-past-float": (dict(x=x8, eps=10**400), ValueError, "eps must be finite and >= 0"),
    "offset-no-weight": (dict(x=x8, weight_offset=1.0), ValueError, "weight_offset=1.0 needs a weight"),
    "offset-nan": (dict(x=x8, weight=torch.ones(8), weight_offset=float("nan")), ValueError,
                   "weight_offset must be finite, got nan"),
    "offset-inf": (dict(x=x8, weight=torch.ones(8), weight_offset=float("-inf")), ValueError,
                   "weight_offset must be finite"),
    "offset-string": (dict(x=x8, weight=torch.ones(8), weight_offset="1"), TypeError,
                      "weight_offset must be a float, got str"),
    "backend-unknown": (dict(x=x8, backend="cudnn"), ValueError, "backend must be one of cuda, cpu, triton, reference"),
}
RESIDUAL_BAD = {
    "residual-shape": (dict(x=x8, residual=torch.randn(4, 7)), ValueError, r"residual must have shape \(4, 8\)"),
    "residual-dtype": (dict(x=x8, residual=torch.randn(4, 8, dtype=torch.bfloat16)), TypeError, "residual must have x's dtype"),
    "residual-device": (dict(x=x8, residual=torch.randn(4, 8, device="meta")), ValueError, "residual must be on x's device"),
    "residual-none": (dict(x=x8, residual="none"), TypeError, "residual must be a torch.Tensor of x's shape, got None"),
}
BIAS_BAD = {
    "bias-wrong-size": (dict(x=x8, bias=torch.ones(9)), ValueError, r"bias must have shape \(8,\)"),
    "bias-dtype": (dict(x=x8, bias=torch.ones(8, dtype=torch.float64)), TypeError, "bias must have x's dtype"),
}


def _cases():
    for op in OPS:
        table = dict(BAD)
        if op.startswith("add_"):
            table.update(RESIDUAL_BAD)
        if "layer" in op:
            table.update(BIAS_BAD)
        for name, case in table.items():
            yield pytest.param(op, *case, id=f"{op}-{name}")


@pytest.mark.parametrize("op,kwargs,error,pattern", list(_cases()))
def test_bad_input_is_a_clear_error(op, kwargs, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        call(op, **kwargs)
    if "backend" not in kwargs:
        assert str(info.value).startswith(f"fastarch.{op}: ")


@pytest.mark.parametrize("op", OPS)
def test_forced_backend_that_cannot_run_lists_every_reason(op):
    x = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(fastarch.NoBackendError) as info:
        call(op, x, backend="triton")  # triton has no fp64
    text = str(info.value)
    assert f"fastarch.{op}: backend 'triton' cannot run x of shape (4, 8), torch.float64 on cpu" in text
    for name in ("cuda", "cpu", "triton", "reference"):
        assert re.search(rf"^  {name}: ", text, re.M), text
    assert "dtype torch.float64 is not supported" in text


def test_forced_cuda_backend_on_cpu_tensor():
    with pytest.raises(fastarch.NoBackendError, match="backend 'cuda' cannot run"):
        ops.layer_norm(torch.randn(2, 8), backend="cuda")


def test_empty_rows_are_fine():
    y = ops.layer_norm(torch.randn(0, 8), torch.ones(8), torch.zeros(8))
    assert y.shape == (0, 8)


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda: torch.ops.fastarch._norm_fwd(torch.randn(3, 4), torch.randn(3, 5), None, None, 1e-5, False),
         r"residual must have x's shape \[3, 4\]"),
        (lambda: torch.ops.fastarch._norm_fwd(torch.randn(2, 3, 4), None, None, None, 1e-5, False), "x must be 2-D"),
        (lambda: torch.ops.fastarch._norm_fwd(torch.randn(3, 4), None, None, None, 1e-5, True, 1.0),
         "weight_offset=1 needs a weight"),
        (lambda: torch.ops.fastarch._norm_fwd(torch.randn(3, 4), None, torch.ones(5), None, 1e-5, False),
         "weight must be a contiguous vector of size 4"),
        (lambda: torch.ops.fastarch._norm_fwd(torch.ones(3, 4, dtype=torch.int32), None, None, None, 1e-5, False),
         "x must be float32, float64, float16 or bfloat16"),
        (lambda: torch.ops.fastarch._norm_bwd(torch.randn(3, 4), None, torch.randn(3, 4), None, None, torch.ones(2), False, False),
         "rstd must be a contiguous Float vector of size 3"),
    ],
    ids=["residual-shape", "x-3d", "offset-no-weight", "weight-size", "x-int", "rstd-size"],
)
def test_kernel_ops_check_their_arguments(call, pattern):
    """The C++ kernel ops, called directly, check their arguments too."""
    with pytest.raises(RuntimeError, match=pattern):
        call()
