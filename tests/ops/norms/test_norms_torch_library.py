"""The norm ops as torch ops: opcheck (schema, fake tensors, autograd registration, AOT
dispatch) and torch.compile(fullgraph=True) giving exactly the eager results."""

from __future__ import annotations

import pytest
import torch

import fastarch
from fastarch import ops

HAS_CUDA = torch.cuda.is_available()


def inputs(rows=6, n=40, dtype=torch.float32, device="cpu", requires_grad=True):
    g = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(requires_grad)

    return rand(rows, n), rand(rows, n), rand(n), rand(n)


def public_op_cases(device="cpu"):
    x, r, w, b = inputs(device=device)
    return {
        "layer_norm": (torch.ops.fastarch.layer_norm.default, (x, w, b, 1e-5, 0.0, "")),
        "layer_norm-no-affine": (torch.ops.fastarch.layer_norm.default, (x, None, None, 1e-5, 0.0, "")),
        "layer_norm-offset": (torch.ops.fastarch.layer_norm.default, (x, w, b, 1e-5, 1.0, "")),
        "rms_norm": (torch.ops.fastarch.rms_norm.default, (x, w, 1e-6, 0.0, "")),
        "rms_norm-offset": (torch.ops.fastarch.rms_norm.default, (x, w, 1e-6, 1.0, "")),
        "add_layer_norm": (torch.ops.fastarch.add_layer_norm.default, (x, r, w, b, 1e-5, 0.0, "")),
        "add_rms_norm": (torch.ops.fastarch.add_rms_norm.default, (x, r, w, 1e-6, 0.0, "")),
        "add_rms_norm-offset": (torch.ops.fastarch.add_rms_norm.default, (x, r, w, 1e-6, 1.0, "")),
    }


@pytest.mark.parametrize("backend", ["", "reference"], ids=["auto", "reference"])
@pytest.mark.parametrize("case", list(public_op_cases()))
def test_opcheck_public_ops(case, backend):
    op, args = public_op_cases()[case]
    torch.library.opcheck(op, args[:-1] + (backend,))


def test_opcheck_norm_backward():
    x, r, w, b = inputs(requires_grad=False)
    mean, rstd = x.mean(-1), torch.rsqrt(x.var(-1, unbiased=False) + 1e-5)
    torch.library.opcheck(torch.ops.fastarch.norm_backward.default, (r, None, x, w, mean, rstd, True, True, 0.0, ""))
    torch.library.opcheck(torch.ops.fastarch.norm_backward.default, (r, None, x, w, mean, rstd, True, True, 1.0, ""))
    torch.library.opcheck(torch.ops.fastarch.norm_backward.default, (r, x, x, None, None, rstd, False, False, 0.0, ""))


def test_opcheck_cpp_kernel_ops():
    """The C++ kernels' own ops (no autograd: the public ops provide it)."""
    x, r, w, b = inputs(requires_grad=False)
    torch.library.opcheck(torch.ops.fastarch._norm_fwd.default, (x, r, w, b, 1e-5, False))
    torch.library.opcheck(torch.ops.fastarch._norm_fwd.default, (x, None, None, None, 1e-5, True))
    torch.library.opcheck(torch.ops.fastarch._norm_fwd.default, (x, r, w, None, 1e-5, True, 1.0))
    _, _, mean, rstd = torch.ops.fastarch._norm_fwd(x, None, w, b, 1e-5, False)
    torch.library.opcheck(torch.ops.fastarch._norm_bwd.default, (r, None, x, w, mean, rstd, True, True))
    torch.library.opcheck(torch.ops.fastarch._norm_bwd.default, (r, None, x, w, mean, rstd, True, True, 1.0))


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(public_op_cases("cpu")))
def test_opcheck_on_cuda(case):
    op, args = public_op_cases("cuda")[case]
    for backend in ("cuda", "triton"):
        torch.library.opcheck(op, args[:-1] + (backend,))


@pytest.mark.gpu
def test_opcheck_triton_kernel_ops():
    """Triton's interpreter reads data pointers, so its triton_ops are checked on GPU only."""
    x, r, w, b = inputs(device="cuda", requires_grad=False)
    torch.library.opcheck(torch.ops.fastarch._triton_norm_fwd.default, (x, r, w, b, 1e-5, False))
    torch.library.opcheck(torch.ops.fastarch._triton_norm_fwd.default, (x, r, w, None, 1e-5, True, 1.0))


def _call(op, x, r, w, b):
    if op == "layer_norm":
        return (ops.layer_norm(x, w, b),)
    if op == "rms_norm":
        return (ops.rms_norm(x, w, 1e-6),)
    if op == "add_layer_norm":
        return ops.add_layer_norm(x, r, w, b)
    return ops.add_rms_norm(x, r, w, 1e-6)


def _forward(op, x, r, w, b):
    outs = _call(op, x, r, w, b)
    return outs, sum((o * (k + 1.5)).sum() for k, o in enumerate(outs))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"])
def test_compile_fullgraph_matches_eager(op):
    """No graph breaks (fullgraph=True); the compiled forward and its AOT-compiled backward
    run the same kernels, so the results are bitwise equal to eager."""
    torch._dynamo.reset()
    x, r, w, b = inputs()
    r = r if op.startswith("add_") else None
    b = b if op == "add_layer_norm" or op == "layer_norm" else None
    wanted = [t for t in (x, r, w, b) if t is not None]
    eager_out, eager_loss = _forward(op, x, r, w, b)
    comp_out, comp_loss = torch.compile(_forward, fullgraph=True, dynamic=False)(op, x, r, w, b)
    eager_grads = torch.autograd.grad(eager_loss, wanted)
    comp_grads = torch.autograd.grad(comp_loss, wanted)
    for a, c in zip(eager_out + eager_grads, comp_out + comp_grads):
        torch.testing.assert_close(c, a, rtol=0, atol=0)


def test_compile_respects_forced_backend():
    """A backend forced outside the compiled function is part of the traced call."""
    torch._dynamo.reset()
    x, _, w, b = inputs(requires_grad=False)
    f = torch.compile(lambda x: ops.layer_norm(x, w, b), fullgraph=True)
    with fastarch.backend("reference"):
        ref = f(x)
    torch.testing.assert_close(ref, ops.layer_norm(x, w, b, backend="reference"), rtol=0, atol=0)


def test_compile_dynamic_shapes():
    torch._dynamo.reset()
    f = torch.compile(lambda x, w: ops.rms_norm(x, w, 1e-6), fullgraph=True, dynamic=True)
    w = torch.randn(64)
    for rows in (3, 17, 40):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(f(x, w), ops.rms_norm(x, w, 1e-6), rtol=0, atol=0)
