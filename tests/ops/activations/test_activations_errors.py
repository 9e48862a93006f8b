"""Bad input to the activation ops: each a clear error naming the argument and what was
expected; and the kernel ops' own checks."""

from __future__ import annotations

import pytest
import torch

from fastarch import ops

x8 = torch.randn(4, 8)
BAD = {  # name -> (kwargs, exception, message pattern)
    "x-not-a-tensor": (dict(x=[[1.0, 2.0]]), TypeError, "x must be a torch.Tensor"),
    "x-0d": (dict(x=torch.tensor(1.0)), ValueError, "x must have a last dimension of at least 1"),
    "x-empty-last": (dict(x=torch.randn(4, 0)), ValueError, "x must have a last dimension of at least 1"),
    "x-integer": (dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, "x must be float32, float16, bfloat16 or float64"),
    "bias-wrong-size": (dict(x=x8, bias=torch.ones(9)), ValueError, r"bias must have shape \(8,\)"),
    "bias-2d": (dict(x=x8, bias=torch.ones(1, 8)), ValueError, r"bias must have shape \(8,\)"),
    "bias-dtype": (dict(x=x8, bias=torch.ones(8, dtype=torch.float64)), TypeError, "bias must have x's dtype"),
    "bias-device": (dict(x=x8, bias=torch.ones(8, device="meta")), ValueError, "bias must be on x's device"),
    "bias-not-tensor": (dict(x=x8, bias=[1.0] * 8), TypeError, "bias must be a torch.Tensor or None"),
    "approximate": (dict(x=x8, approximate="sigmoid"), ValueError, "approximate must be 'none' .* or 'tanh'"),
    "backend-unknown": (dict(x=x8, backend="cudnn"), ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bias_gelu_bad_input(case):
    kwargs, exc, pattern = BAD[case]
    with pytest.raises(exc, match=pattern):
        ops.bias_gelu(**kwargs)


def test_forced_backend_that_cannot_run_lists_the_reason():
    with pytest.raises(Exception, match="triton"):
        ops.bias_gelu(torch.randn(4, 8, dtype=torch.float64), backend="triton")


KERNEL_BAD = {
    "x-1d": (lambda: torch.ops.fastarch._bias_gelu_fwd(torch.randn(8), None, False), "x must be 2-D"),
    "x-strided-columns": (lambda: torch.ops.fastarch._bias_gelu_fwd(torch.randn(8, 4).t(), None, False), "x must have contiguous rows"),
    "x-int": (lambda: torch.ops.fastarch._bias_gelu_fwd(torch.ones(2, 4, dtype=torch.int32), None, False), "x must be float32"),
    "bias-size": (lambda: torch.ops.fastarch._bias_gelu_fwd(x8, torch.ones(7), False), "bias must be a contiguous vector of size 8"),
    "bias-dtype": (lambda: torch.ops.fastarch._bias_gelu_fwd(x8, torch.ones(8, dtype=torch.float16), False), "bias must have dtype"),
    "dy-shape": (lambda: torch.ops.fastarch._bias_gelu_bwd(torch.randn(4, 7), x8, None, False, False), "dy must have x's shape"),
    "dy-dtype": (lambda: torch.ops.fastarch._bias_gelu_bwd(x8.double(), x8, None, False, False), "dy must have dtype"),
    "dbias-without-bias": (lambda: torch.ops.fastarch._bias_gelu_bwd(x8, x8, None, False, True), "need_dbias without a bias"),
}


@pytest.mark.parametrize("case", list(KERNEL_BAD))
def test_cpu_kernel_ops_check_their_arguments(case):
    call, pattern = KERNEL_BAD[case]
    with pytest.raises(RuntimeError, match=pattern):
        call()


SWIGLU_BAD = {
    "gate-not-a-tensor": (dict(gate=[1.0], up=x8), TypeError, "gate must be a torch.Tensor"),
    "up-not-a-tensor": (dict(gate=x8, up=None), TypeError, "up must be a torch.Tensor"),
    "gate-integer": (dict(gate=torch.ones(4, 8, dtype=torch.int32), up=x8), TypeError, "gate must be float32"),
    "gate-0d": (dict(gate=torch.tensor(1.0), up=torch.tensor(1.0)), ValueError, "gate must have a last dimension"),
    "up-shape": (dict(gate=x8, up=torch.randn(4, 7)), ValueError, r"up must have gate's shape \(4, 8\)"),
    "up-broadcastable": (dict(gate=x8, up=torch.randn(8)), ValueError, "up must have gate's shape"),
    "up-dtype": (dict(gate=x8, up=x8.half()), TypeError, "up must have gate's dtype"),
    "up-device": (dict(gate=x8, up=torch.randn(4, 8, device="meta")), ValueError, "up must be on gate's device"),
    "backend-unknown": (dict(gate=x8, up=x8, backend="cudnn"), ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("case", list(SWIGLU_BAD))
def test_swiglu_bad_input(case):
    kwargs, exc, pattern = SWIGLU_BAD[case]
    with pytest.raises(exc, match=pattern):
        ops.swiglu(**kwargs)


GEGLU_BAD = {
    "gate-not-a-tensor": (dict(gate=[1.0], up=x8), TypeError, "fastarch.geglu: gate must be a torch.Tensor"),
    "up-not-a-tensor": (dict(gate=x8, up=None), TypeError, "fastarch.geglu: up must be a torch.Tensor"),
    "gate-integer": (dict(gate=torch.ones(4, 8, dtype=torch.int32), up=x8), TypeError, "gate must be float32"),
    "gate-0d": (dict(gate=torch.tensor(1.0), up=torch.tensor(1.0)), ValueError, "gate must have a last dimension"),
    "up-shape": (dict(gate=x8, up=torch.randn(4, 7)), ValueError, r"up must have gate's shape \(4, 8\)"),
    "up-whole-projection": (dict(gate=x8, up=torch.randn(4, 16)), ValueError, "up must have gate's shape"),
    "up-dtype": (dict(gate=x8, up=x8.bfloat16()), TypeError, "up must have gate's dtype"),
    "up-device": (dict(gate=x8, up=torch.randn(4, 8, device="meta")), ValueError, "up must be on gate's device"),
    "approximate": (dict(gate=x8, up=x8, approximate="sigmoid"), ValueError, "approximate must be 'none' .* or 'tanh'"),
    "approximate-none-object": (dict(gate=x8, up=x8, approximate=None), ValueError, "approximate must be"),
    "backend-unknown": (dict(gate=x8, up=x8, backend="cudnn"), ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("case", list(GEGLU_BAD))
def test_geglu_bad_input(case):
    kwargs, exc, pattern = GEGLU_BAD[case]
    with pytest.raises(exc, match=pattern):
        ops.geglu(**kwargs)


def test_geglu_forced_backend_that_cannot_run_lists_the_reason():
    with pytest.raises(Exception, match="triton"):
        ops.geglu(x8.double(), x8.double(), backend="triton")


GATED_KERNEL_BAD = {
    "gate-1d": (lambda: torch.ops.fastarch._gated_act_fwd(torch.randn(8), torch.randn(8), "silu"), "gate must be 2-D"),
    "up-shape": (lambda: torch.ops.fastarch._gated_act_fwd(x8, torch.randn(4, 7), "gelu"), "up must have gate's shape"),
    "up-dtype": (lambda: torch.ops.fastarch._gated_act_fwd(x8, x8.double(), "silu"), "up must have dtype"),
    "up-strided-columns": (
        lambda: torch.ops.fastarch._gated_act_fwd(torch.randn(8, 4), torch.randn(4, 8).t(), "gelu_tanh"),
        "up must have contiguous rows",
    ),
    "dy-shape": (lambda: torch.ops.fastarch._gated_act_bwd(torch.randn(4, 7), x8, x8, "silu"), "dy must have gate's shape"),
    "act": (lambda: torch.ops.fastarch._gated_act_fwd(x8, x8, "relu"), "act must be 'silu', 'gelu' or 'gelu_tanh'"),
    "act-backward": (lambda: torch.ops.fastarch._gated_act_bwd(x8, x8, x8, "tanh"), "act must be"),
}


@pytest.mark.parametrize("case", list(GATED_KERNEL_BAD))
def test_cpu_gated_kernel_ops_check_their_arguments(case):
    call, pattern = GATED_KERNEL_BAD[case]
    with pytest.raises(RuntimeError, match=pattern):
        call()


GEGLU_PACKED_BAD = {
    "proj-not-a-tensor": (dict(proj=[1.0, 2.0]), TypeError, "fastarch.geglu_packed: proj must be a torch.Tensor"),
    "proj-integer": (dict(proj=torch.ones(4, 8, dtype=torch.int64)), TypeError, "proj must be float32"),
    "proj-odd": (dict(proj=torch.randn(4, 7)), ValueError, r"proj must have an even last dimension .* got shape \(4, 7\)"),
    "proj-0d": (dict(proj=torch.tensor(1.0)), ValueError, "proj must have an even last dimension"),
    "approximate": (dict(proj=x8, approximate="erf"), ValueError, "approximate must be 'none' .* or 'tanh'"),
    "backend-unknown": (dict(proj=x8, backend="cudnn"), ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("case", list(GEGLU_PACKED_BAD))
def test_geglu_packed_bad_input(case):
    kwargs, exc, pattern = GEGLU_PACKED_BAD[case]
    with pytest.raises(exc, match=pattern):
        ops.geglu_packed(**kwargs)


PACKED_KERNEL_BAD = {
    "proj-odd": (lambda: torch.ops.fastarch._gated_act_bwd_packed(torch.randn(4, 3), torch.randn(4, 7), "gelu"),
                 "proj must have an even number of columns"),
    "proj-1d": (lambda: torch.ops.fastarch._gated_act_bwd_packed(torch.randn(4), torch.randn(8), "gelu"), "proj must be 2-D"),
    "dy-shape": (lambda: torch.ops.fastarch._gated_act_bwd_packed(x8, x8, "gelu"), r"dy must have a half of proj's shape \[4, 4\]"),
    "act": (lambda: torch.ops.fastarch._gated_act_bwd_packed(torch.randn(4, 4), x8, "swish"), "act must be"),
}


@pytest.mark.parametrize("case", list(PACKED_KERNEL_BAD))
def test_cpu_packed_kernel_op_checks_its_arguments(case):
    call, pattern = PACKED_KERNEL_BAD[case]
    with pytest.raises(RuntimeError, match=pattern):
        call()
