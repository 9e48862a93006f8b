"""Numerics of swiglu (silu(gate) * up), every backend, against an fp64 reference, judged as
bias_gelu's (activation_tolerance.py): PyTorch's yardstick is F.silu(gate) * up in the inputs'
dtype, which rounds twice where ours rounds once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import backend_rows  # tests/backend_rows.py
from activation_tolerance import assert_close_to_reference  # beside this file
from fastarch import ops
from fastarch.ops.activations.backends import ActivationProblem

HAS_CUDA = torch.cuda.is_available()
GPU = pytest.mark.gpu
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

FORWARD_FACTOR = 2.0
GRAD_FACTOR = 3.0
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tails of the 16-lane chunks, a LLaMA-7B MLP width; 0 rows; an fp32 output of 4 MB and more
# (the CPU's streaming stores).
SMALL_SHAPES = [(0, 7), (1, 1), (3, 17), (33, 1000), (8, 11008)]
CPU_SHAPES = SMALL_SHAPES + [(1040, 1024)]
BACKENDS = [
    pytest.param(("cpu", "cpu", "auto", CPU_SHAPES), id="cpu"),
    pytest.param(("cpu", "cpu", "generic", CPU_SHAPES), id="cpu-generic"),
    pytest.param(("cpu", "cpu", "avx2", CPU_SHAPES), id="cpu-avx2"),
    pytest.param(("reference", "cpu", "auto", SMALL_SHAPES), id="reference"),
    pytest.param(("triton", TRITON_DEVICE, "auto", SMALL_SHAPES), id="triton"),
    pytest.param(("cuda", "cuda", "auto", CPU_SHAPES), id="cuda", marks=GPU),
]
CASES = [
    pytest.param(*b.values[0][:3], shape, marks=b.marks, id=f"{b.id}-{shape[0]}x{shape[1]}")
    for b in BACKENDS
    for shape in b.values[0][3]
]


def make_inputs(rows, n, dtype, device):
    g = torch.Generator().manual_seed(rows * 1013 + n)
    gate = (torch.randn(rows, n, generator=g, dtype=torch.float64) * 4).to(dtype).to(device)
    up = torch.randn(rows, n, generator=g, dtype=torch.float64).to(dtype).to(device)
    return gate, up


def torch_swiglu(gate, up):
    return F.silu(gate) * up


def forward_and_grads(fn, gate, up, dy):
    gate = gate.detach().clone().requires_grad_()
    up = up.detach().clone().requires_grad_()
    y = fn(gate, up)
    return (y.detach(), *torch.autograd.grad(y, (gate, up), dy))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device,isa,shape", CASES)
def test_forward_and_backward(backend, device, isa, shape, dtype, cpu_isa):
    cpu_isa(isa)
    gate, up = make_inputs(*shape, dtype, device)
    backend_rows.require("swiglu", backend, ActivationProblem.of(gate))
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)
    ref = forward_and_grads(torch_swiglu, gate.double(), up.double(), dy)
    theirs = forward_and_grads(torch_swiglu, gate, up, dy.to(dtype))
    ours = forward_and_grads(lambda g, u: ops.swiglu(g, u, backend=backend), gate, up, dy.to(dtype))
    for name, a, b, r, factor in zip(("y", "dgate", "dup"), ours, theirs, ref, (FORWARD_FACTOR, GRAD_FACTOR, GRAD_FACTOR)):
        assert_close_to_reference(name, a, b, r, dtype, factor)


SPECIAL = [float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-30, 100.0, -100.0, 3e38, -3e38]


@pytest.mark.parametrize("backend", ["cpu", "cpu-generic", "reference", "triton", pytest.param("cuda", marks=GPU)])
def test_nan_and_inf_as_torch_in_fp64(backend, cpu_isa):
    """NaN in, NaN out; silu(+inf) = inf, silu(-inf) = NaN (-inf * 0); the gradients at +-inf
    as F.silu's in fp64 (NaN for the gate); huge finite gates get their limits."""
    cpu_isa("generic" if backend == "cpu-generic" else "auto")
    name = backend.removesuffix("-generic")
    device = {"triton": TRITON_DEVICE, "cuda": "cuda"}.get(name, "cpu")
    gate = torch.tensor(SPECIAL, dtype=torch.float32)
    up = torch.full_like(gate, 0.5)
    ref = forward_and_grads(torch_swiglu, gate.double(), up.double(), torch.ones(len(SPECIAL), dtype=torch.float64))
    ours = forward_and_grads(lambda g, u: ops.swiglu(g, u, backend=name), gate.to(device), up.to(device),
                             torch.ones(len(SPECIAL), device=device))
    for what, a, r in zip(("y", "dgate", "dup"), ours, ref):
        torch.testing.assert_close(a.cpu(), r.float(), equal_nan=True, rtol=1e-6, atol=1e-30, msg=what)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton", pytest.param("cuda", marks=GPU)])
def test_non_contiguous_and_leading_dims(backend):
    """(B, S, N) inputs, and gate/up as strided halves of one (..., 2N) projection (the fused
    gate_up layout: read in place), give exactly the results of contiguous copies."""
    device = {"triton": TRITON_DEVICE, "cuda": "cuda"}.get(backend, "cpu")
    fused = torch.randn(2, 5, 2 * 96, device=device)
    gate, up = fused[..., :96], fused[..., 96:]
    assert not gate.is_contiguous()
    a = [t.detach().requires_grad_() for t in (gate, up)]
    b = [t.detach().contiguous().requires_grad_() for t in (gate, up)]
    ya, yb = ops.swiglu(*a, backend=backend), ops.swiglu(*b, backend=backend)
    assert ya.shape == (2, 5, 96) and ya.is_contiguous()
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    dy = torch.randn(2, 5, 96, device=device)
    for u, v in zip(torch.autograd.grad(ya, a, dy), torch.autograd.grad(yb, b, dy)):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize("isa", ["auto", "generic", "avx2"])
def test_gradcheck_fp64_cpu(isa, cpu_isa):
    cpu_isa(isa)
    gate, up = make_inputs(5, 13, torch.float64, "cpu")
    assert torch.autograd.gradcheck(
        lambda g, u: ops.swiglu(g, u, backend="cpu"), (gate.requires_grad_(), up.requires_grad_())
    )


@pytest.mark.parametrize("isa", ["auto", "generic", "avx2"])
def test_fp32_accuracy_over_the_whole_curve(isa, cpu_isa):
    """silu on a dense grid of gates in [-90, 90] against fp64: a relative error of at most
    8 ulps x (1 + |g|) (the condition number of g sigmoid(g) for negative g) wherever the value
    is a normal fp32 number."""
    cpu_isa(isa)
    g = torch.linspace(-90, 90, 200_001, dtype=torch.float32)
    one = torch.ones_like(g)
    truth = torch_swiglu(g.double(), one.double())
    normal = truth.abs() > 1e-35
    # (the level selects the CPU kernels only: Triton runs in the "auto" row)
    for backend, device in [("cpu", "cpu")] + ([("triton", TRITON_DEVICE)] if isa == "auto" else []):
        y = ops.swiglu(g.to(device), one.to(device), backend=backend).double().cpu()
        ulps = ((y - truth).abs() / truth.abs() / 2**-24)[normal] / (1 + g.double()[normal].abs())
        assert ulps.max() <= 8, f"{backend}: {ulps.max():.3g} ulps x (1 + |g|)"
