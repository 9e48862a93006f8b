"""Numerics of bias_gelu, every backend, against an fp64 reference.

How a result is judged (as tests/ops/norms/test_norms.py): the error of our output against
F.gelu in fp64 on the same inputs must be at most FACTOR x the error of PyTorch's own
same-dtype computation (x + bias, then F.gelu) against that reference, plus a floor of two ulps
of the dtype at the output's scale. Ours computes x + bias in fp32 and rounds once, PyTorch
rounds x + bias to the dtype first, so an honest kernel lands at or below 1x; a wrong formula
or a missed column lands at 10x-1000x. Gradients (dx, and dbias, the column sums of dx in
fp32): the same, with PyTorch's autograd of the same computation as the yardstick.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import backend_rows  # tests/backend_rows.py
from activation_tolerance import assert_close_to_reference  # beside this file
from fastarch import ops
from fastarch.ops.activations import reference

HAS_CUDA = torch.cuda.is_available()
GPU = pytest.mark.gpu
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # on CPU: Triton's interpreter (conftest)

FORWARD_FACTOR = 2.0
GRAD_FACTOR = 3.0
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
APPROXIMATIONS = ["none", "tanh"]

# Widths around the 16-lane chunks (tails), GPT-2/BERT MLP widths; 0 rows; outputs of 4 MB and
# more (fp32 1040x1024, every dtype 2080x1024) take the CPU's streaming stores.
SMALL_SHAPES = [(0, 7), (1, 1), (3, 17), (5, 33), (64, 3072), (33, 1000)]
CPU_SHAPES = SMALL_SHAPES + [(1040, 1024), (2080, 1024)]
BACKENDS = [  # (backend, device, isa of the cpu kernels, shapes)
    pytest.param(("cpu", "cpu", "auto", CPU_SHAPES), id="cpu"),
    pytest.param(("cpu", "cpu", "generic", CPU_SHAPES), id="cpu-generic"),
    pytest.param(("cpu", "cpu", "avx2", CPU_SHAPES), id="cpu-avx2"),
    pytest.param(("reference", "cpu", "auto", SMALL_SHAPES), id="reference"),
    pytest.param(("triton", TRITON_DEVICE, "auto", SMALL_SHAPES), id="triton"),
    pytest.param(("cuda", "cuda", "auto", CPU_SHAPES), id="cuda", marks=GPU),
]


def _cases():
    for b in BACKENDS:
        backend, device, isa, shapes = b.values[0]
        for shape in shapes:
            yield pytest.param(backend, device, isa, shape, marks=b.marks, id=f"{b.id}-{shape[0]}x{shape[1]}")


CASES = list(_cases())


def make_inputs(rows, n, dtype, device, scale=3.0):
    """x spread over the whole curve (|x + bias| up to ~15: the far negative tail too)."""
    g = torch.Generator().manual_seed(rows * 1009 + n)
    x = (torch.randn(rows, n, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    bias = torch.randn(n, generator=g, dtype=torch.float64).to(dtype).to(device)
    return x, bias


def forward_and_grads(fn, x, bias, dy):
    x = x.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    y = fn(x, bias)
    dx, dbias = torch.autograd.grad(y, (x, bias), dy)
    return y.detach(), dx, dbias


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device,isa,shape", CASES)
def test_forward_and_backward(backend, device, isa, shape, dtype, approximate, cpu_isa):
    cpu_isa(isa)
    rows, n = shape
    x, bias = make_inputs(rows, n, dtype, device)
    backend_rows.require("bias_gelu", backend, _problem(x))
    dy = torch.randn(rows, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = forward_and_grads(lambda a, b: F.gelu(a + b, approximate=approximate), x.double(), bias.double(), dy.to(device))
    theirs = forward_and_grads(lambda a, b: F.gelu(a + b, approximate=approximate), x, bias, dy.to(dtype).to(device))
    ours = forward_and_grads(lambda a, b: ops.bias_gelu(a, b, approximate, backend=backend), x, bias, dy.to(dtype).to(device))
    for name, a, b, r, factor in zip(("y", "dx", "dbias"), ours, theirs, ref, (FORWARD_FACTOR, GRAD_FACTOR, GRAD_FACTOR)):
        assert_close_to_reference(name, a, b, r, dtype, factor)


def _problem(x):
    from fastarch.ops.activations.backends import ActivationProblem

    return ActivationProblem.of(x.reshape(-1, x.shape[-1]))


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("isa", ["auto", "generic", "avx2"])
def test_fp32_accuracy_over_the_whole_curve(approximate, isa, cpu_isa):
    """Every fp32 kernel, on a dense grid of h in [-14, 14], against the cancellation-free fp64
    truth (reference.gelu; F.gelu itself loses every digit below h ~ -3 in fp32, ~ -5.5 in
    fp64): a relative error of at most 8 ulps x (1 + h^2), the function's own condition number
    in the negative tail, wherever the value is a normal fp32 number; the gradient within 16
    ulps of 1."""
    cpu_isa(isa)
    h = torch.linspace(-14, 14, 200_001, dtype=torch.float32)
    truth = reference.gelu(h.double(), approximate)
    normal = truth.abs() > 1e-35
    # (the level selects the CPU kernels only: Triton runs in the "auto" row)
    for backend, device in [("cpu", "cpu")] + ([("triton", TRITON_DEVICE)] if isa == "auto" else []):
        y = ops.bias_gelu(h.to(device), approximate=approximate, backend=backend).double().cpu()
        ulps = ((y - truth).abs() / truth.abs() / 2**-24)[normal] / (1 + h.double()[normal] ** 2)
        assert ulps.max() <= 8, f"{backend}: {ulps.max():.3g} ulps x (1 + h^2)"
        assert (y[~normal].abs() <= 1e-35).all()
        dx = _grad(lambda t: ops.bias_gelu(t, approximate=approximate, backend=backend), h.to(device)).double().cpu()
        dref = reference.gelu_derivative(h.double(), approximate)
        assert (dx - dref).abs().max() < 16 * 2**-24, f"{backend}: gradient error {(dx - dref).abs().max():.3g}"


def _grad(fn, t):
    t = t.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(t).sum(), t)
    return g


SPECIAL = [float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-30, 30.0, -30.0, 3e38, -3e38]


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("backend", ["cpu", "cpu-generic", "reference", "triton", pytest.param("cuda", marks=GPU)])
def test_nan_and_inf_as_torch_in_fp64(backend, approximate, cpu_isa):
    """NaN in, NaN out; gelu(+inf) = inf, gelu(-inf) = NaN (-inf * 0), every gradient at +-inf
    NaN: F.gelu's values in fp64 (fp32's erf form gives NaN even at +inf)."""
    cpu_isa("generic" if backend == "cpu-generic" else "auto")
    name = backend.removesuffix("-generic")
    device = {"triton": TRITON_DEVICE, "cuda": "cuda"}.get(name, "cpu")
    h = torch.tensor(SPECIAL, dtype=torch.float32)
    ref = F.gelu(h.double(), approximate=approximate).float()
    y = ops.bias_gelu(h.to(device), approximate=approximate, backend=name).cpu()
    torch.testing.assert_close(y, ref, equal_nan=True, rtol=1e-6, atol=0)
    dx = _grad(lambda t: ops.bias_gelu(t, approximate=approximate, backend=name), h.to(device)).cpu()
    dref = _grad(lambda t: F.gelu(t, approximate=approximate), h.double()).float()
    torch.testing.assert_close(dx, dref, equal_nan=True, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton", pytest.param("cuda", marks=GPU)])
def test_nan_stays_in_its_element_and_column(backend):
    device = {"triton": TRITON_DEVICE, "cuda": "cuda"}.get(backend, "cpu")
    x, bias = make_inputs(6, 40, torch.float32, device)
    x[2, 5] = float("nan")
    x = x.requires_grad_()
    bias = bias.requires_grad_()
    y = ops.bias_gelu(x, bias, backend=backend)
    assert torch.isnan(y[2, 5]) and torch.isnan(y).sum() == 1
    dx, dbias = torch.autograd.grad(y, (x, bias), torch.ones_like(y))
    assert torch.isnan(dx[2, 5]) and torch.isnan(dx).sum() == 1
    assert torch.isnan(dbias[5]) and torch.isnan(dbias).sum() == 1


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton", pytest.param("cuda", marks=GPU)])
def test_without_bias_and_non_contiguous(backend):
    """No bias: gelu(x). Non-contiguous x and dy (row-strided: read in place; transposed,
    3-D permuted: copied) give exactly the results of contiguous ones; the output has x's shape."""
    device = {"triton": TRITON_DEVICE, "cuda": "cuda"}.get(backend, "cpu")
    x, bias = make_inputs(48, 200, torch.float32, device)
    wide = torch.zeros(48, 256, device=device)
    wide[:, 7:207] = x
    layouts = [wide[:, 7:207], x.t().contiguous().t(), x.view(6, 8, 200).permute(1, 0, 2)]
    for approximate in APPROXIMATIONS:
        y = ops.bias_gelu(x, approximate=approximate, backend=backend)
        assert_close_to_reference("y", y, F.gelu(x, approximate=approximate), F.gelu(x.double(), approximate=approximate), torch.float32, FORWARD_FACTOR)
        for laid in layouts:
            assert not laid.is_contiguous()
            a = laid.detach().requires_grad_()
            b = laid.detach().contiguous().requires_grad_()
            ya = ops.bias_gelu(a, bias, approximate, backend=backend)
            yb = ops.bias_gelu(b, bias, approximate, backend=backend)
            assert ya.shape == laid.shape and ya.is_contiguous()
            torch.testing.assert_close(ya, yb, rtol=0, atol=0)
            dy = torch.randn(laid.shape, device=device)
            torch.testing.assert_close(torch.autograd.grad(ya, a, dy)[0], torch.autograd.grad(yb, b, dy)[0], rtol=0, atol=0)


def test_leading_dims_and_bias_gradient_only_when_asked():
    """(B, S, N) inputs; a bias that does not require grad gets none (need_dbias false)."""
    x = torch.randn(2, 3, 64, requires_grad=True)
    bias = torch.randn(64)
    y = ops.bias_gelu(x, bias)
    assert y.shape == (2, 3, 64)
    (dx,) = torch.autograd.grad(y.sum(), x)
    ref = _grad(lambda t: F.gelu(t + bias.double()), x.double())
    torch.testing.assert_close(dx.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", ["auto", "generic", "avx2"])
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_gradcheck_fp64_cpu(approximate, isa, cpu_isa):
    """The CPU kernels' fp64 gradients match finite differences (fp64 runs the portable build)."""
    cpu_isa(isa)
    x, bias = make_inputs(5, 13, torch.float64, "cpu", scale=2.0)
    assert torch.autograd.gradcheck(
        lambda a, b: ops.bias_gelu(a, b, approximate, backend="cpu"), (x.requires_grad_(), bias.requires_grad_())
    )


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "cpu-generic", "triton"])
def test_16bit_results_within_one_ulp(backend, dtype, approximate, cpu_isa):
    """16-bit inputs (whose AVX-512 kernels use shorter polynomials): on a dense grid of h, every
    result within one ulp of the fp64 truth, and nearly all of them its correct rounding. (bf16
    values below 1e-30 are left out: the math is fp32, where they are denormal intermediates,
    as in torch.)"""
    cpu_isa("generic" if backend == "cpu-generic" else "auto")
    name = backend.removesuffix("-generic")
    device = TRITON_DEVICE if name == "triton" else "cpu"
    h = torch.linspace(-12, 12, 20_001, dtype=torch.float64).to(dtype)
    truth = reference.gelu(h.double(), approximate)
    y = ops.bias_gelu(h.to(device), approximate=approximate, backend=name).cpu()
    normal = truth.abs() > max(torch.finfo(dtype).tiny, 1e-30)
    mantissa_bits = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    ulp = 2.0 ** (torch.floor(torch.log2(truth.abs()[normal])) - mantissa_bits)
    assert ((y.double()[normal] - truth[normal]).abs() <= ulp).all()
    assert (y[normal] == truth[normal].to(dtype)).double().mean() > 0.99
