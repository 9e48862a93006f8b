"""Numerics of geglu (gelu(gate) * up, erf and tanh forms), every backend, against an fp64
reference, judged as bias_gelu's and swiglu's (activation_tolerance.py): PyTorch's yardstick is
``up * F.gelu(gate)`` in the inputs' dtype (diffusers' GEGLU), which rounds twice where ours
rounds once, so an honest kernel lands at or below 1x its error; a wrong formula or a missed
column lands at 10x-1000x. Gradients likewise, against PyTorch's autograd of the same code."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import backend_rows  # tests/backend_rows.py
from activation_tolerance import assert_close_to_reference  # beside this file
from fastarch import ops, registry
from fastarch.ops.activations import reference
from fastarch.ops.activations.backends import ActivationProblem

HAS_CUDA = torch.cuda.is_available()
GPU = pytest.mark.gpu
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # on CPU: Triton's interpreter (conftest)

FORWARD_FACTOR = 2.0
GRAD_FACTOR = 3.0
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
APPROXIMATIONS = ["none", "tanh"]
# Tails of the 16-lane chunks (odd widths), 0 rows, the SD UNet's widest GEGLU half (1280 * 4);
# on the CPU also an fp32 output of 4 MB and more (streaming stores).
SMALL_SHAPES = [(0, 7), (1, 1), (3, 17), (33, 1000), (4, 5120)]
CPU_SHAPES = SMALL_SHAPES + [(1040, 1024)]
BACKENDS = [  # (backend, device, isa of the cpu kernels, shapes)
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
    """gate spread over the whole curve (|gate| up to ~16: the far negative tail too)."""
    g = torch.Generator().manual_seed(rows * 1013 + n)
    gate = (torch.randn(rows, n, generator=g, dtype=torch.float64) * 4).to(dtype).to(device)
    up = torch.randn(rows, n, generator=g, dtype=torch.float64).to(dtype).to(device)
    return gate, up


def torch_geglu(gate, up, approximate="none"):
    return up * F.gelu(gate, approximate=approximate)


def forward_and_grads(fn, gate, up, dy):
    gate = gate.detach().clone().requires_grad_()
    up = up.detach().clone().requires_grad_()
    y = fn(gate, up)
    return (y.detach(), *torch.autograd.grad(y, (gate, up), dy))


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device,isa,shape", CASES)
def test_forward_and_backward(backend, device, isa, shape, dtype, approximate, cpu_isa):
    cpu_isa(isa)
    gate, up = make_inputs(*shape, dtype, device)
    backend_rows.require("geglu", backend, ActivationProblem.of(gate))
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)
    ref = forward_and_grads(lambda g, u: torch_geglu(g, u, approximate), gate.double(), up.double(), dy)
    theirs = forward_and_grads(lambda g, u: torch_geglu(g, u, approximate), gate, up, dy.to(dtype))
    ours = forward_and_grads(lambda g, u: ops.geglu(g, u, approximate, backend=backend), gate, up, dy.to(dtype))
    for name, a, b, r, factor in zip(("y", "dgate", "dup"), ours, theirs, ref, (FORWARD_FACTOR, GRAD_FACTOR, GRAD_FACTOR)):
        assert_close_to_reference(name, a, b, r, dtype, factor)


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("backend,isa", [("cpu", "auto"), ("cpu", "generic"), ("cpu", "avx2"), ("reference", "auto")])
def test_fp64_against_torch(backend, isa, approximate, cpu_isa):
    """fp64 (cpu and reference): within a few ulps of torch's fp64 computation (its 1 + erf
    loses digits only where gelu's value is below ~1e-16 of the scale)."""
    cpu_isa(isa)
    gate, up = make_inputs(37, 203, torch.float64, "cpu")
    dy = torch.randn(37, 203, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = forward_and_grads(lambda g, u: torch_geglu(g, u, approximate), gate, up, dy)
    ours = forward_and_grads(lambda g, u: ops.geglu(g, u, approximate, backend=backend), gate, up, dy)
    for name, a, r in zip(("y", "dgate", "dup"), ours, ref):
        assert_close_to_reference(name, a, r, r, torch.float64, 1.0)


SPECIAL = [float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-30, 100.0, -100.0, 3e38, -3e38]


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("backend", ["cpu", "cpu-generic", "reference", "triton", pytest.param("cuda", marks=GPU)])
def test_nan_and_inf_as_torch_in_fp64(backend, approximate, cpu_isa):
    """NaN in (gate or up), NaN out; gelu(+inf) = inf, gelu(-inf) = NaN (-inf * 0); the
    gradients at +-inf as F.gelu's in fp64; huge finite gates get their limits."""
    cpu_isa("generic" if backend == "cpu-generic" else "auto")
    name = backend.removesuffix("-generic")
    device = {"triton": TRITON_DEVICE, "cuda": "cuda"}.get(name, "cpu")
    gate = torch.tensor(SPECIAL, dtype=torch.float32)
    up = torch.full_like(gate, 0.5)
    up[3] = float("nan")  # a NaN up with a finite gate
    fn64 = lambda g, u: torch_geglu(g, u, approximate)  # noqa: E731
    ref = forward_and_grads(fn64, gate.double(), up.double(), torch.ones(len(SPECIAL), dtype=torch.float64))
    ours = forward_and_grads(lambda g, u: ops.geglu(g, u, approximate, backend=name), gate.to(device), up.to(device),
                             torch.ones(len(SPECIAL), device=device))
    assert ours[0][2].isnan() and ours[0][3].isnan()
    for what, a, r in zip(("y", "dgate", "dup"), ours, ref):
        torch.testing.assert_close(a.cpu(), r.float(), equal_nan=True, rtol=1e-6, atol=1e-30, msg=what)


@pytest.mark.parametrize("n", [96, 97])
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton", pytest.param("cuda", marks=GPU)])
def test_chunks_of_one_projection_read_in_place(backend, n):
    """diffusers' layout: ``up, gate = proj(x).chunk(2, -1)`` of a (B, S, 2N) projection, views
    whose rows are strided by 2N (an odd N misaligns gate's rows for vector loads): exactly the
    results of contiguous copies, and the kernels get the views themselves (no copy)."""
    device = {"triton": TRITON_DEVICE, "cuda": "cuda"}.get(backend, "cpu")
    fused = torch.randn(2, 5, 2 * n, device=device)
    up, gate = fused.chunk(2, dim=-1)
    assert not gate.is_contiguous() and gate.stride(-2) == 2 * n
    a = [t.detach().requires_grad_() for t in (gate, up)]
    b = [t.detach().contiguous().requires_grad_() for t in (gate, up)]
    ya, yb = ops.geglu(*a, backend=backend), ops.geglu(*b, backend=backend)
    assert ya.shape == (2, 5, n) and ya.is_contiguous()
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    dy = torch.randn(2, 5, n, device=device)
    for u, v in zip(torch.autograd.grad(ya, a, dy), torch.autograd.grad(yb, b, dy)):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_chunks_reach_the_kernel_without_a_copy(monkeypatch):
    """The backend receives (rows, N) views of the projection's own storage, rows strided 2N."""
    seen = []
    table = registry.backends_of("geglu")
    cpu = next(b for b in table if b.name == "cpu")
    spy = dataclasses.replace(cpu, forward=lambda g, u, act: seen.append((g, u)) or cpu.forward(g, u, act))
    monkeypatch.setitem(registry._REGISTRY, "geglu", [spy if b is cpu else b for b in table])
    fused = torch.randn(3, 4, 2 * 40)
    up, gate = fused.chunk(2, dim=-1)
    ops.geglu(gate, up, backend="cpu")
    ((g, u),) = seen
    assert g.shape == (12, 40) and g.stride() == (80, 1) and g.data_ptr() == gate.data_ptr()
    assert u.shape == (12, 40) and u.stride() == (80, 1) and u.data_ptr() == fused.data_ptr()


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("isa", ["auto", "generic", "avx2"])
def test_gradcheck_fp64_cpu(isa, approximate, cpu_isa):
    cpu_isa(isa)
    gate, up = make_inputs(5, 13, torch.float64, "cpu")
    assert torch.autograd.gradcheck(
        lambda g, u: ops.geglu(g, u, approximate, backend="cpu"), (gate.requires_grad_(), up.requires_grad_())
    )


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("isa", ["auto", "generic", "avx2"])
def test_fp32_accuracy_over_the_whole_curve(isa, approximate, cpu_isa):
    """The gated path of every fp32 kernel, up = 1, on a dense grid of gates in [-12, 12],
    against the cancellation-free fp64 truth (reference.gelu: F.gelu loses every digit below
    g ~ -3 in fp32, ~ -5.5 in fp64): a relative error of at most 8 ulps x (1 + g^2), gelu's
    own condition number in the negative tail, wherever the value is a normal fp32 number (as
    bias_gelu's); dgate within 16 ulps of 1 of gelu'(g), and dup = y."""
    cpu_isa(isa)
    g = torch.linspace(-12, 12, 40_001, dtype=torch.float32)
    truth = reference.gelu(g.double(), approximate)
    dtruth = reference.gelu_derivative(g.double(), approximate)
    normal = truth.abs() > 1e-35
    # (the level selects the CPU kernels only: Triton runs in the "auto" row)
    for backend, device in [("cpu", "cpu")] + ([("triton", TRITON_DEVICE)] if isa == "auto" else []):
        fn = lambda a, u: ops.geglu(a, u, approximate, backend=backend)  # noqa: E731
        y, dgate, dup = (t.double().cpu() for t in forward_and_grads(fn, g.to(device), torch.ones_like(g).to(device),
                                                                      torch.ones_like(g).to(device)))
        ulps = ((y - truth).abs() / truth.abs() / 2**-24)[normal] / (1 + g.double()[normal] ** 2)
        assert ulps.max() <= 8, f"{backend}: {ulps.max():.3g} ulps x (1 + g^2)"
        assert (y[~normal].abs() <= 1e-35).all()
        assert (dgate - dtruth).abs().max() < 16 * 2**-24, f"{backend}: dgate error {(dgate - dtruth).abs().max():.3g}"
        assert torch.equal(dup, y)


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 2 * 96), (3, 2 * 97), (1, 2), (0, 2 * 8)], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton", pytest.param("cuda", marks=GPU)])
def test_geglu_packed_is_geglu_of_the_chunks(backend, shape, dtype, approximate):
    """geglu_packed(proj) runs the kernels of geglu(gate, up) on up, gate = proj.chunk(2, -1):
    the same bits, and its gradient of proj is exactly [dup | dgate] (written whole; an odd
    half misaligns the gate half for vector stores)."""
    device = {"triton": TRITON_DEVICE, "cuda": "cuda"}.get(backend, "cpu")
    proj = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 3).to(dtype).to(device)
    dy = torch.randn(*shape[:-1], shape[-1] // 2).to(dtype).to(device)
    p1, p2 = proj.clone().requires_grad_(), proj.clone().requires_grad_()
    y1 = ops.geglu_packed(p1, approximate, backend=backend)
    up, gate = p2.chunk(2, dim=-1)
    y2 = ops.geglu(gate, up, approximate, backend=backend)
    assert y1.shape == y2.shape and y1.is_contiguous()
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    (g1,), (g2,) = torch.autograd.grad(y1, p1, dy), torch.autograd.grad(y2, p2, dy)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_geglu_packed_backward_writes_no_concatenation():
    """Autograd of geglu_packed runs one backward op returning the projection's gradient: no
    cat (the cost of the chunked form's gradient)."""
    proj = torch.randn(64, 2 * 48, requires_grad=True)
    with torch.profiler.profile() as prof:
        ops.geglu_packed(proj).backward(torch.randn(64, 48))
    names = {e.name for e in prof.events()}
    assert "fastarch::_gated_act_bwd_packed" in names and "aten::cat" not in names
