"""Numerics of the norm ops, every backend, against an fp64 reference.

How a result is judged (as flash-attention judges its kernels): the error of our output
against an fp64 computation on the same inputs must be at most FACTOR x the error of
PyTorch's own same-dtype op (F.layer_norm / F.rms_norm, which compute in fp32 and round
once) against that reference, plus a floor of a couple of ulps of the dtype at the output's
scale (for when PyTorch happens to be nearly exact). Both sides round the result to the dtype
once, so an honest kernel lands at about 1x; a wrong reduction, a missed rounding of the
residual or a bad mask lands at 10x-1000x.

Gradients: 3x PyTorch's error plus the floor. dweight/dbias sum over rows; their error and
their magnitude both grow about as sqrt(rows), so a floor relative to the output's scale
covers every row count.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import backend_rows  # tests/backend_rows.py
import torch.nn.functional as F

import fastarch
from fastarch import ops
from fastarch._extension import _C

HAS_CUDA = torch.cuda.is_available()

# dtype -> floor of the error, relative to max |reference|: two ulps at 1.0
FLOOR = {torch.float32: 2.4e-7, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-14}
FORWARD_FACTOR = 2.0
GRAD_FACTOR = 3.0
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

OPS = {  # name -> (is_rms, has_residual)
    "layer_norm": (False, False),
    "rms_norm": (True, False),
    "add_layer_norm": (False, True),
    "add_rms_norm": (True, True),
}

ROWS = (0, 1, 333)
HIDDEN = (1, 3, 127, 768, 1537, 8192, 65536)
ALL_SHAPES = [(r, n) for r in ROWS for n in HIDDEN]
# The CPU kernels' longest rows, 37 of them: still shared between threads, and outputs past the
# streaming-store threshold (4 MB) in every dtype; 333 x 65536 took ~10 s a row, the fp64
# reference's time.
CPU_SHAPES = [(37 if n == 65536 and r == 333 else r, n) for r, n in ALL_SHAPES]
# The interpreted and portable backends are slow: every hidden size, fewer rows when large.
SMALL_SHAPES = [(r, n) for r in ROWS for n in HIDDEN if r * n <= 333 * 1537] + [(5, 8192), (2, 65536)]

GPU = pytest.mark.gpu
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # on CPU: Triton's interpreter (conftest)
BACKENDS = [  # (backend, device, isa of the cpu kernels, shapes)
    pytest.param(("cpu", "cpu", "auto", CPU_SHAPES), id="cpu"),
    pytest.param(("cpu", "cpu", "generic", SMALL_SHAPES), id="cpu-generic"),
    pytest.param(("cpu", "cpu", "avx2", SMALL_SHAPES), id="cpu-avx2"),
    pytest.param(("reference", "cpu", "auto", SMALL_SHAPES), id="reference"),
    pytest.param(("triton", TRITON_DEVICE, "auto", ALL_SHAPES if HAS_CUDA else SMALL_SHAPES), id="triton"),
    pytest.param(("cuda", "cuda", "auto", ALL_SHAPES), id="cuda", marks=GPU),
]


def _cases():
    """Each backend's shapes x ops x dtypes; the largest rows (over 1M elements) are marked slow:
    CI runs them, the quick command does not. Triton's interpreter runs a Latin-square third
    of it (backend_rows.interpreter_keeps: every shape meets every op and every dtype)."""
    for b in BACKENDS:
        backend, device, isa, shapes = b.values[0]
        for (i, shape), (j, op), (k, dtype) in itertools.product(enumerate(shapes), enumerate(OPS), enumerate(DTYPES)):
            if not backend_rows.interpreter_keeps(backend, device, i, j, k):
                continue
            marks = list(b.marks) + ([pytest.mark.slow] if shape[0] * shape[1] > 1 << 20 else [])
            yield pytest.param(op, backend, device, isa, shape, dtype, marks=marks,
                               id=f"{b.id}-{shape[0]}x{shape[1]}-{op}-{dtype}")


CASES = list(_cases())


@pytest.fixture
def cpu_isa(request):
    """Selects the CPU kernels' instruction set for one test, then restores automatic choice."""

    def select(isa: str):
        backend_rows.set_cpu_isa(isa)

    yield select
    _C._set_cpu_isa(backend_rows.DEFAULT_ISA)


# ----------------------------------------------------------------------------- helpers


def make_inputs(op, rows, n, dtype, device, affine=(True, True)):
    is_rms, has_residual = OPS[op]
    g = torch.Generator().manual_seed(rows * 100003 + n)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype).to(device)

    x = rand(rows, n, scale=2.0, shift=0.5)  # non-zero mean: the mean subtraction matters
    residual = rand(rows, n) if has_residual else None
    weight = rand(n, scale=0.5, shift=1.0) if affine[0] else None
    bias = rand(n, scale=0.5) if affine[1] and not is_rms else None
    return x, residual, weight, bias


def call_ours(op, x, residual, weight, bias, eps, backend):
    """Our op's outputs as a tuple: (y,) or (y, residual_out)."""
    if op == "layer_norm":
        return (ops.layer_norm(x, weight, bias, eps, backend=backend),)
    if op == "rms_norm":
        return (ops.rms_norm(x, weight, eps, backend=backend),)
    if op == "add_layer_norm":
        return ops.add_layer_norm(x, residual, weight, bias, eps, backend=backend)
    return ops.add_rms_norm(x, residual, weight, eps, backend=backend)


def call_torch(op, x, residual, weight, bias, eps):
    """PyTorch's own computation of the same thing, in the inputs' dtype."""
    is_rms, has_residual = OPS[op]
    s = x + residual if has_residual else x
    n = x.shape[-1:]
    y = F.rms_norm(s, n, weight, eps) if is_rms else F.layer_norm(s, n, weight, bias, eps)
    return (y, s) if has_residual else (y,)


def err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


def floor(dtype, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item() if ref.numel() else 1.0
    return FLOOR[dtype] * max(scale, 1.0)


def assert_close_to_reference(name, ours, theirs, ref, dtype, factor):
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == dtype, f"{name}: dtype {ours.dtype} != {dtype}"
    e_ours, e_torch = err(ours, ref), err(theirs, ref)
    bound = factor * e_torch + floor(dtype, ref)
    assert e_ours <= bound, f"{name}: error {e_ours:.3g} vs fp64 > {factor} x torch's {e_torch:.3g} + floor = {bound:.3g}"


def grads_of(outputs, inputs, grad_outputs, retain_graph=False):
    """d(sum(outputs * grad_outputs)) / d(inputs), None for inputs that are None."""
    wanted = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(outputs, wanted, grad_outputs, retain_graph=retain_graph))
    return [next(got) if t is not None else None for t in inputs]


def leaf(t, dtype=None):
    if t is None:
        return None
    return (t.detach().to(dtype) if dtype else t.detach().clone()).requires_grad_()


# ----------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("op,backend,device,isa,shape,dtype", CASES)
def test_forward_and_backward(op, backend, device, isa, shape, dtype, cpu_isa):
    cpu_isa(isa)
    rows, n = shape
    eps = 1e-5
    x, residual, weight, bias = make_inputs(op, rows, n, dtype, device)
    inputs = [x, residual, weight, bias]

    ours_in = [leaf(t) for t in inputs]
    ours = call_ours(op, *ours_in, eps, backend)
    torch_in = [leaf(t) for t in inputs]
    theirs = call_torch(op, *torch_in, eps)
    # The fp64 truth normalizes the same rounded sum x + residual that both sides normalize.
    s = theirs[-1].detach() if OPS[op][1] else x
    ref_in = [leaf(s, torch.float64), None, leaf(weight, torch.float64), leaf(bias, torch.float64)]
    ref = call_torch(op.removeprefix("add_"), *ref_in, eps)

    judge(op, dtype, device, (ours_in, ours), (torch_in, theirs), (ref_in, ref))


def judge(op, dtype, device, ours, theirs, ref):
    """Each of (inputs, outputs) of ours, PyTorch's and the fp64 reference: y against the
    reference (FORWARD_FACTOR x PyTorch's error), residual_out equal to PyTorch's, then every
    gradient for a random gradient of every output (GRAD_FACTOR)."""
    (ours_in, ours), (torch_in, theirs), (ref_in, ref) = ours, theirs, ref
    assert_close_to_reference("y", ours[0], theirs[0], ref[0].detach(), dtype, FORWARD_FACTOR)
    if OPS[op][1]:
        assert torch.equal(ours[1], theirs[1]), "residual_out must equal x + residual exactly"

    # Backward: a random gradient for every output (residual_out too).
    g = torch.Generator().manual_seed(7)
    douts = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype).to(device) for o in ours]
    d_ours = grads_of(ours, ours_in, douts)
    d_theirs = grads_of(theirs, torch_in, douts)
    d_ref = grads_of(ref[:1], ref_in, douts[:1])  # d/ds; s = x + residual also receives douts[1]
    if OPS[op][1]:
        d_ref[0] = d_ref[0] + douts[1].double()
        d_ref[1] = d_ref[0]
    for name, a, b, r in zip(("dx", "dresidual", "dweight", "dbias"), d_ours, d_theirs, d_ref):
        if a is None:
            assert b is None
            continue
        assert_close_to_reference(name, a, b, r.detach(), dtype, GRAD_FACTOR)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)], ids=["plain", "weight", "bias"])
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton", pytest.param("cuda", marks=GPU)])
def test_without_weight_or_bias(op, affine, backend):
    """weight and bias are optional; every combination matches PyTorch."""
    device = {"cpu": "cpu", "reference": "cpu", "triton": TRITON_DEVICE, "cuda": "cuda"}[backend]
    dtype = torch.float32
    x, residual, weight, bias = make_inputs(op, 33, 300, dtype, device, affine)
    inputs = [leaf(t) for t in (x, residual, weight, bias)]
    ours = call_ours(op, *inputs, 1e-5, backend)
    ref_in = [leaf(t, torch.float64) for t in (x, residual, weight, bias)]
    ref = call_torch(op, *ref_in, 1e-5)
    torch_in = [leaf(t) for t in (x, residual, weight, bias)]
    theirs = call_torch(op, *torch_in, 1e-5)
    assert_close_to_reference("y", ours[0], theirs[0], ref[0].detach(), dtype, FORWARD_FACTOR)
    dy = [torch.randn_like(o) for o in ours]
    for name, a, b, r in zip(
        ("dx", "dresidual", "dweight", "dbias"),
        grads_of(ours, inputs, dy),
        grads_of(theirs, torch_in, dy),
        grads_of(ref, ref_in, [d.double() for d in dy]),
    ):
        assert (a is None) == (r is None), name
        if a is not None:
            assert_close_to_reference(name, a, b, r.detach(), dtype, GRAD_FACTOR)


LAYOUTS = ["row-strided", "transposed", "3d-permuted", "strided-weight"]


def lay_out(t, layout, is_vector=False):
    """The same values as t in a non-contiguous layout (differentiable)."""
    if t is None or (is_vector != (layout == "strided-weight")):
        return t
    if layout == "strided-weight":
        return torch.stack([t, t], dim=1)[:, 0]  # stride 2
    if layout == "row-strided":  # every row a slice of a wider row: read in place
        wide = torch.zeros(t.shape[0], t.shape[1] + 56, dtype=t.dtype, device=t.device)
        wide[:, 7 : 7 + t.shape[1]] = t
        return wide[:, 7 : 7 + t.shape[1]]
    if layout == "transposed":  # columns not contiguous: copied
        return t.t().contiguous().t()
    return t.view(6, 8, t.shape[1]).permute(1, 0, 2)  # leading dims not collapsible: copied


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton", pytest.param("cuda", marks=GPU)])
def test_non_contiguous_inputs(backend, dtype, op, layout):
    """Non-contiguous inputs and gradients give exactly the results of contiguous ones."""
    device = {"cpu": "cpu", "reference": "cpu", "triton": TRITON_DEVICE, "cuda": "cuda"}[backend]
    rows, n = 48, 200
    src = [leaf(t) for t in make_inputs(op, rows, n, dtype, device)]
    laid = [lay_out(t, layout, i >= 2) for i, t in enumerate(src)]
    assert not (laid[0] if layout != "strided-weight" else laid[2]).is_contiguous()
    a = call_ours(op, *laid, 1e-5, backend)
    b = call_ours(op, *[t.contiguous() if t is not None else None for t in laid], 1e-5, backend)
    for out_a, out_b in zip(a, b):
        assert out_a.is_contiguous()
        torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    dys = [lay_out(torch.randn(rows, n, dtype=dtype, device=device), layout).reshape(o.shape) for o in a]
    ga = grads_of(a, src, dys, retain_graph=True)  # a and b share the layout ops
    gb = grads_of(b, src, [d.contiguous() for d in dys])
    for u, v in zip(ga, gb):
        if u is not None:
            torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton", pytest.param("cuda", marks=GPU)])
def test_nan_propagates_to_its_row_only(op, backend):
    device = {"cpu": "cpu", "reference": "cpu", "triton": TRITON_DEVICE, "cuda": "cuda"}[backend]
    x, _, weight, bias = make_inputs(op, 4, 40, torch.float32, device)
    x[2, 5] = float("nan")
    (y,) = call_ours(op, x, None, weight, bias, 1e-5, backend)
    assert torch.isnan(y[2]).all()
    assert torch.isfinite(y[[0, 1, 3]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton", pytest.param("cuda", marks=GPU)])
def test_constant_rows_and_large_offsets(backend, dtype):
    """A constant row normalizes to 0 (var = 0, rstd = 1/sqrt(eps)); a row with a mean far
    from 0 keeps its precision (two-pass variance, no E[x^2] - mean^2 cancellation)."""
    device = {"cpu": "cpu", "reference": "cpu", "triton": TRITON_DEVICE, "cuda": "cuda"}[backend]
    n = 1000
    x = torch.randn(3, n, dtype=torch.float64)
    x[0] = 3.25
    x[1] = x[1] * 1e-2 + 1e4 if dtype == torch.float32 else x[1] * 30 + 2000
    x = x.to(dtype).to(device)
    y = ops.layer_norm(x, eps=1e-5, backend=backend)
    assert torch.equal(y[0], torch.zeros_like(y[0]))
    ref = F.layer_norm(x.double(), (n,), eps=1e-5)
    theirs = F.layer_norm(x, (n,), eps=1e-5)
    assert_close_to_reference("y", y, theirs, ref, dtype, FORWARD_FACTOR)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("isa", ["auto", "generic", "avx2"])
def test_gradcheck_fp64_cpu(op, isa, cpu_isa):
    """The CPU kernels' analytical gradients match finite differences in fp64."""
    cpu_isa(isa)
    x, residual, weight, bias = make_inputs(op, 5, 13, torch.float64, "cpu")
    inputs = tuple(leaf(t) for t in (x, residual, weight, bias) if t is not None)

    def f(*args):
        it = iter(args)
        x_ = next(it)
        r_ = next(it) if residual is not None else None
        w_ = next(it)
        b_ = next(it) if bias is not None else None
        return call_ours(op, x_, r_, w_, b_, 1e-5, "cpu")

    assert torch.autograd.gradcheck(f, inputs)


def test_cpu_isa_switch_is_real(cpu_isa):
    """The generic, AVX2 and AVX-512 builds all run (the table above covers them)."""
    info = fastarch._extension.build_info()
    cpu_isa("generic")
    assert _C.build_info()["cpu_isa"] == "generic"
    cpu_isa("auto")
    avx512 = info["cpu_has_avx512"] and "avx512" in info["cpu_kernels"]  # the CPU has it, the build too
    avx2 = info["cpu_has_avx2"] and "avx2" in info["cpu_kernels"]
    # the highest level the CPU and build run (cpu/isa.h)
    if avx512:
        assert _C.build_info()["cpu_isa"] in ("avx512", "avx512_bf16", "amx")
    else:
        assert _C.build_info()["cpu_isa"] == ("avx2" if avx2 else "generic")


# ----------------------------------------------------------------------------- weight_offset

OFFSET_BACKENDS = [  # (backend, device, isa of the cpu kernels)
    pytest.param(("cpu", "cpu", "auto"), id="cpu"),
    pytest.param(("cpu", "cpu", "generic"), id="cpu-generic"),
    pytest.param(("cpu", "cpu", "avx2"), id="cpu-avx2"),
    pytest.param(("reference", "cpu", "auto"), id="reference"),
    pytest.param(("triton", TRITON_DEVICE, "auto"), id="triton"),
    pytest.param(("cuda", "cuda", "auto"), id="cuda", marks=GPU),
]
# 8200 columns: past the portable forward's fp32 row copy (8192); 160 x 8192 (CPU only): outputs
# past the streaming-store threshold (4 MB in fp32)
OFFSET_SHAPES = [(33, 300), (3, 8200)]
CPU_OFFSET_SHAPES = OFFSET_SHAPES + [(160, 8192)]


def call_offset(op, x, residual, weight, bias, eps, backend, offset):
    """Our op with weight_offset, outputs as in call_ours."""
    kw = dict(weight_offset=offset, backend=backend)
    if op == "layer_norm":
        return (ops.layer_norm(x, weight, bias, eps, **kw),)
    if op == "rms_norm":
        return (ops.rms_norm(x, weight, eps, **kw),)
    if op == "add_layer_norm":
        return ops.add_layer_norm(x, residual, weight, bias, eps, **kw)
    return ops.add_rms_norm(x, residual, weight, eps, **kw)


def call_gemma_style(op, x, residual, weight, bias, eps, offset):
    """The offset norm as Gemma's RMSNorm computes it: in fp32 (fp64 for fp64 inputs), the
    weight's sum 1.0 + weight.float() there too, rounded to x's dtype once."""
    is_rms, has_residual = OPS[op]
    s = x + residual if has_residual else x
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = x.shape[-1:]
    w = weight.to(acc) + offset
    b = bias.to(acc) if bias is not None else None
    y = F.rms_norm(s.to(acc), n, w, eps) if is_rms else F.layer_norm(s.to(acc), n, w, b, eps)
    return (y.to(x.dtype), s) if has_residual else (y.to(x.dtype),)


def _offset_cases():
    """Each backend x op x dtype (fp64 where the backend has it) x shape."""
    for b in OFFSET_BACKENDS:
        backend = b.values[0][0]
        dtypes = DTYPES + ([torch.float64] if backend in ("cpu", "reference") else [])
        shapes = CPU_OFFSET_SHAPES if backend == "cpu" else OFFSET_SHAPES
        for op, dtype, shape in itertools.product(OPS, dtypes, shapes):
            yield pytest.param(b.values[0], op, dtype, shape, marks=b.marks,
                               id=f"{b.id}-{op}-{dtype}-{shape[0]}x{shape[1]}")


@pytest.mark.parametrize("case,op,dtype,shape", list(_offset_cases()))
def test_weight_offset(case, op, dtype, shape, cpu_isa):
    """y = xhat * (weight + weight_offset) (+ bias), Gemma's stored-as-difference weight, in
    every backend, forward and backward, against fp64 with the tolerances of the table above
    (PyTorch's comparator: Gemma's own formula in fp32, rounded once); dweight is unchanged by
    the offset."""
    backend, device, isa = case
    cpu_isa(isa)
    rows, n = shape
    x, residual, weight, bias = make_inputs(op, rows, n, dtype, device)
    weight = (weight.double() - 1.0).to(dtype)  # stored as the difference from 1, as Gemma's
    inputs = [x, residual, weight, bias]
    eps, offset = 1e-6, 1.0

    ours_in = [leaf(t) for t in inputs]
    ours = call_offset(op, *ours_in, eps, backend, offset)
    torch_in = [leaf(t) for t in inputs]
    theirs = call_gemma_style(op, *torch_in, eps, offset)
    s = theirs[-1].detach() if OPS[op][1] else x
    ref_in = [leaf(s, torch.float64), None, leaf(weight, torch.float64), leaf(bias, torch.float64)]
    ref = call_gemma_style(op.removeprefix("add_"), *ref_in, eps, offset)
    judge(op, dtype, device, (ours_in, ours), (torch_in, theirs), (ref_in, ref))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", OFFSET_BACKENDS)
def test_weight_offset_is_added_in_fp32(case, dtype, cpu_isa):
    """The 16-bit outputs are Gemma's own bits: the offset is added to the weight in fp32, not
    in the weight's dtype (that extra rounding, up to half a bf16 ulp of 1 + weight, moves
    about half the outputs by an ulp; the statistics' summation order moves a few near ties)."""
    backend, device, isa = case
    cpu_isa(isa)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 512, generator=g).to(dtype).to(device)
    weight = (torch.randn(512, generator=g) * 0.3).to(dtype).to(device)
    (ours,) = call_offset("rms_norm", x, None, weight, None, 1e-6, backend, 1.0)
    (gemma,) = call_gemma_style("rms_norm", x, None, weight, None, 1e-6, 1.0)
    ulp = torch.finfo(dtype).eps * gemma.float().abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((ours.float() - gemma.float()).abs() <= ulp).all(), "an output more than one ulp from Gemma's"
    same = (ours == gemma).double().mean().item()
    assert same >= 0.99, f"only {same:.1%} of the outputs are Gemma's bits"


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton", pytest.param("cuda", marks=GPU)])
def test_weight_offset_zero_keeps_the_weight_bits(backend):
    """weight_offset=0 multiplies by the weight as it is (w + 0.0 would turn a -0.0 weight
    into +0.0, flipping the sign of the zeros it makes), and equals the op without it."""
    device = {"cpu": "cpu", "reference": "cpu", "triton": TRITON_DEVICE, "cuda": "cuda"}[backend]
    x = torch.randn(4, 64, device=device)
    weight = torch.randn(64, device=device)
    weight[::2] = -0.0
    y = ops.rms_norm(x, weight, 1e-6, weight_offset=0.0, backend=backend)
    assert torch.equal(y, ops.rms_norm(x, weight, 1e-6, backend=backend))
    zeros = y[:, ::2]
    assert torch.equal(torch.signbit(zeros), torch.signbit(x[:, ::2]) ^ True), "the signs of x * -0.0"
    # and an offset of -1 cancels a weight of ones exactly
    z = ops.rms_norm(x, torch.ones(64, device=device), 1e-6, weight_offset=-1.0, backend=backend)
    assert torch.equal(z.abs(), torch.zeros_like(z))


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton", pytest.param("cuda", marks=GPU)])
def test_weight_offset_nan_weight_gives_nan(backend):
    device = {"cpu": "cpu", "reference": "cpu", "triton": TRITON_DEVICE, "cuda": "cuda"}[backend]
    x = torch.randn(3, 40, device=device)
    weight = torch.zeros(40, device=device)
    weight[7] = float("nan")
    xg = x.clone().requires_grad_()
    y = ops.rms_norm(xg, weight, 1e-6, weight_offset=1.0, backend=backend)
    assert torch.isnan(y[:, 7]).all() and not torch.isnan(y[:, :7]).any() and not torch.isnan(y[:, 8:]).any()
    (dx,) = torch.autograd.grad(y, xg, torch.ones_like(y))
    assert torch.isnan(dx).all()  # every dx of a row sums over its NaN column
