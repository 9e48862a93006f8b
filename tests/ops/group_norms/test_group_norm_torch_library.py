"""group_norm as torch ops: opcheck (schema, fake tensors, autograd registration, AOT dispatch)
of the public op, its backward op and the C++ kernel ops, and torch.compile(fullgraph=True)
giving exactly the eager results, forward and backward, in both layouts."""

from __future__ import annotations

import pytest
import torch

from fastarch import ops
from group_norm_cases import to_layout  # beside this file


def inputs(channels_last=False, requires_grad=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)

    x = to_layout(torch.randn(2, 8, 5, 3, generator=g, dtype=dtype), channels_last).requires_grad_(requires_grad)
    return x, rand(8), rand(8), rand(2, 8), rand(2, 8)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", ["", "reference"], ids=["auto", "reference"])
@pytest.mark.parametrize("given", ["all", "none", "scale-only"])
def test_opcheck_public_op(given, backend, channels_last):
    x, w, b, sc, sh = inputs(channels_last)
    args = {"all": (w, b, sc, sh), "none": (None, None, None, None), "scale-only": (None, None, sc, None)}[given]
    torch.library.opcheck(torch.ops.fastarch.group_norm.default, (x, 4, *args, 1e-5, given == "all", backend))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck_backward_op(channels_last):
    x, w, b, sc, sh = inputs(channels_last, requires_grad=False)
    _, mean, rstd = torch.ops.fastarch.group_norm(x, 4, w, b, sc, sh, 1e-5, True, "")
    dy = torch.randn(x.shape)
    op = torch.ops.fastarch.group_norm_backward.default
    torch.library.opcheck(op, (dy, x, mean, rstd, 4, w, b, sc, sh, True, True, True, ""))
    torch.library.opcheck(op, (dy, x, mean, rstd, 4, None, None, None, sh, False, False, True, ""))


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_cpp_kernel_ops(channels_last):
    """The C++ kernels' own ops (no autograd: the public op provides it), on 3-D x."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 7, 8, generator=g) if channels_last else torch.randn(2, 8, 7, generator=g)
    w, b, sc, sh = torch.randn(8), torch.randn(8), torch.randn(2, 8), torch.randn(2, 8)
    torch.library.opcheck(torch.ops.fastarch._group_norm_fwd.default, (x, 4, w, b, sc, sh, 1e-5, True, channels_last))
    torch.library.opcheck(torch.ops.fastarch._group_norm_fwd.default, (x, 2, None, None, None, None, 0.0, False, channels_last))
    _, mean, rstd = torch.ops.fastarch._group_norm_fwd(x, 4, w, b, sc, sh, 1e-5, True, channels_last)
    dy = torch.randn(x.shape, generator=g)
    op = torch.ops.fastarch._group_norm_bwd.default
    torch.library.opcheck(op, (dy, x, mean, rstd, 4, w, b, sc, sh, True, channels_last, True, True))
    torch.library.opcheck(op, (dy, x, mean, rstd, 4, None, b, None, sh, False, channels_last, False, True))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_compile_fullgraph_equals_eager(channels_last):
    def f(x, w, b, sc, sh):
        return ops.group_norm(x, 4, w, b, scale=sc, shift=sh, activation="silu")

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    eager_in = inputs(channels_last)
    compiled_in = [t.detach().clone().requires_grad_() for t in eager_in]
    compiled_in[0] = to_layout(compiled_in[0].detach(), channels_last).requires_grad_()
    ye, yc = f(*eager_in), compiled(*compiled_in)
    assert yc.stride() == ye.stride()
    torch.testing.assert_close(yc, ye, rtol=0, atol=0)
    dy = torch.randn(ye.shape)
    for a, b in zip(torch.autograd.grad(ye, eager_in, dy), torch.autograd.grad(yc, compiled_in, dy)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
