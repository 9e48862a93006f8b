"""The activation ops as torch ops: opcheck (schema, fake tensors, autograd registration, AOT
dispatch) and torch.compile(fullgraph=True) giving exactly the eager results."""

from __future__ import annotations

import pytest
import torch

from fastarch import ops

HAS_CUDA = torch.cuda.is_available()


def inputs(requires_grad=True, device="cpu"):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 40, generator=g).to(device).requires_grad_(requires_grad)
    bias = torch.randn(40, generator=g).to(device).requires_grad_(requires_grad)
    return x, bias


@pytest.mark.parametrize("backend", ["", "reference"], ids=["auto", "reference"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_opcheck_bias_gelu(with_bias, approximate, backend):
    x, bias = inputs()
    torch.library.opcheck(torch.ops.fastarch.bias_gelu.default, (x, bias if with_bias else None, approximate, backend))


def test_opcheck_bias_gelu_backward():
    x, bias = inputs(requires_grad=False)
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.fastarch.bias_gelu_backward.default, (dy, x, bias, "none", True, ""))
    torch.library.opcheck(torch.ops.fastarch.bias_gelu_backward.default, (dy, x, None, "tanh", False, ""))


def test_opcheck_cpp_kernel_ops():
    x, bias = inputs(requires_grad=False)
    torch.library.opcheck(torch.ops.fastarch._bias_gelu_fwd.default, (x, bias, False))
    torch.library.opcheck(torch.ops.fastarch._bias_gelu_fwd.default, (x, None, True))
    torch.library.opcheck(torch.ops.fastarch._bias_gelu_bwd.default, (torch.randn_like(x), x, bias, False, True))


@pytest.mark.gpu
def test_opcheck_on_cuda():
    x, bias = inputs(device="cuda")
    for backend in ("cuda", "triton"):
        torch.library.opcheck(torch.ops.fastarch.bias_gelu.default, (x, bias, "tanh", backend))
    x, bias = inputs(requires_grad=False, device="cuda")
    torch.library.opcheck(torch.ops.fastarch._triton_bias_gelu_fwd.default, (x, bias, False))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_compile_fullgraph_matches_eager(approximate):
    """No graph breaks; the compiled forward and its AOT-compiled backward run the same
    kernels, so the results are bitwise equal to eager."""
    torch._dynamo.reset()
    x, bias = inputs()

    def f(x, bias):
        y = ops.bias_gelu(x, bias, approximate)
        return y, (y * 1.5).sum()

    eager_y, eager_loss = f(x, bias)
    comp_y, comp_loss = torch.compile(f, fullgraph=True, dynamic=False)(x, bias)
    grads = [torch.autograd.grad(loss, (x, bias)) for loss in (eager_loss, comp_loss)]
    torch.testing.assert_close(comp_y, eager_y, rtol=0, atol=0)
    for a, c in zip(*grads):
        torch.testing.assert_close(c, a, rtol=0, atol=0)


def test_compile_dynamic_shapes():
    torch._dynamo.reset()
    bias = torch.randn(64)
    f = torch.compile(lambda x: ops.bias_gelu(x, bias, "tanh"), fullgraph=True, dynamic=True)
    for rows in (3, 17, 40):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(f(x), ops.bias_gelu(x, bias, "tanh"), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["", "reference"], ids=["auto", "reference"])
def test_opcheck_swiglu(backend):
    gate, up = inputs()[0], inputs()[0].detach().flip(0).requires_grad_()
    torch.library.opcheck(torch.ops.fastarch.swiglu.default, (gate, up, backend))
    dy = torch.randn_like(gate)
    torch.library.opcheck(torch.ops.fastarch.swiglu_backward.default, (dy, gate.detach(), up.detach(), backend))


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_opcheck_gated_cpp_kernel_ops(act):
    gate, up = torch.randn(6, 40), torch.randn(6, 40)
    torch.library.opcheck(torch.ops.fastarch._gated_act_fwd.default, (gate, up, act))
    torch.library.opcheck(torch.ops.fastarch._gated_act_bwd.default, (torch.randn_like(gate), gate, up, act))
    up, gate = torch.randn(6, 80).chunk(2, dim=-1)  # strided rows
    torch.library.opcheck(torch.ops.fastarch._gated_act_fwd.default, (gate, up, act))


@pytest.mark.gpu
def test_opcheck_swiglu_on_cuda():
    gate, up = torch.randn(6, 40, device="cuda", requires_grad=True), torch.randn(6, 40, device="cuda", requires_grad=True)
    for backend in ("cuda", "triton"):
        torch.library.opcheck(torch.ops.fastarch.swiglu.default, (gate, up, backend))


def test_compile_swiglu_fullgraph_matches_eager():
    torch._dynamo.reset()
    gate, up = torch.randn(6, 40, requires_grad=True), torch.randn(6, 40, requires_grad=True)

    def f(gate, up):
        y = ops.swiglu(gate, up)
        return y, (y * 1.5).sum()

    eager_y, eager_loss = f(gate, up)
    comp_y, comp_loss = torch.compile(f, fullgraph=True, dynamic=False)(gate, up)
    grads = [torch.autograd.grad(loss, (gate, up)) for loss in (eager_loss, comp_loss)]
    torch.testing.assert_close(comp_y, eager_y, rtol=0, atol=0)
    for a, c in zip(*grads):
        torch.testing.assert_close(c, a, rtol=0, atol=0)


def geglu_inputs(requires_grad=True, device="cpu"):
    """gate and up as diffusers makes them: the halves of one (..., 2N) projection."""
    proj = torch.randn(2, 3, 80, generator=torch.Generator().manual_seed(7)).to(device)
    up, gate = (t.detach().requires_grad_(requires_grad) for t in proj.chunk(2, dim=-1))
    return gate, up


@pytest.mark.parametrize("backend", ["", "reference"], ids=["auto", "reference"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_opcheck_geglu(approximate, backend):
    gate, up = geglu_inputs()
    torch.library.opcheck(torch.ops.fastarch.geglu.default, (gate, up, approximate, backend))
    dy = torch.randn_like(gate)
    args = (dy, gate.detach(), up.detach(), approximate, backend)
    torch.library.opcheck(torch.ops.fastarch.geglu_backward.default, args)


@pytest.mark.gpu
def test_opcheck_geglu_on_cuda():
    gate, up = geglu_inputs(device="cuda")
    for backend in ("cuda", "triton"):
        torch.library.opcheck(torch.ops.fastarch.geglu.default, (gate, up, "none", backend))
    gate, up = geglu_inputs(requires_grad=False, device="cuda")
    torch.library.opcheck(torch.ops.fastarch._triton_gated_act_fwd.default, (gate.reshape(6, 40), up.reshape(6, 40), "gelu"))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_compile_geglu_fullgraph_matches_eager(approximate):
    """diffusers' GEGLU body (chunk of one projection, then the gated activation) compiles
    without graph breaks, and gives exactly the eager results and gradients."""
    torch._dynamo.reset()
    proj = torch.randn(2, 3, 80, requires_grad=True)

    def f(proj):
        up, gate = proj.chunk(2, dim=-1)
        y = ops.geglu(gate, up, approximate)
        return y, (y * 1.5).sum()

    eager_y, eager_loss = f(proj)
    comp_y, comp_loss = torch.compile(f, fullgraph=True, dynamic=False)(proj)
    torch.testing.assert_close(comp_y, eager_y, rtol=0, atol=0)
    grads = [torch.autograd.grad(loss, proj) for loss in (eager_loss, comp_loss)]
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["", "reference"], ids=["auto", "reference"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_opcheck_geglu_packed(approximate, backend):
    proj = torch.randn(2, 3, 80, requires_grad=True)
    torch.library.opcheck(torch.ops.fastarch.geglu_packed.default, (proj, approximate, backend))
    args = (torch.randn(2, 3, 40), proj.detach(), approximate, backend)
    torch.library.opcheck(torch.ops.fastarch.geglu_packed_backward.default, args)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_opcheck_packed_cpp_kernel_op(act):
    torch.library.opcheck(torch.ops.fastarch._gated_act_bwd_packed.default, (torch.randn(6, 40), torch.randn(6, 80), act))


def test_compile_geglu_packed_fullgraph_matches_eager():
    torch._dynamo.reset()
    proj = torch.randn(2, 3, 80, requires_grad=True)

    def f(proj):
        y = ops.geglu_packed(proj)
        return y, (y * 1.5).sum()

    eager_y, eager_loss = f(proj)
    comp_y, comp_loss = torch.compile(f, fullgraph=True, dynamic=False)(proj)
    torch.testing.assert_close(comp_y, eager_y, rtol=0, atol=0)
    grads = [torch.autograd.grad(loss, proj) for loss in (eager_loss, comp_loss)]
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
