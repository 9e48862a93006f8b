"""fastarch.ops.linear: every backend against an fp64 reference, judged as the other ops are
(the error of ours at most FACTOR x the error of PyTorch's same-dtype F.linear, plus a floor of
two ulps of the dtype at the output's scale: both sum in fp32 in different orders and round
once). The C++ kernel is also run directly at every row count (the dispatcher only sends it
the counts where it is faster) at each instruction-set level; NaN, autograd, errors, opcheck,
torch.compile and the backend choice."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import backend_rows  # tests/backend_rows.py
import fastarch
from fastarch import availability, ops, registry
from fastarch._extension import _C
from fastarch.ops.linear import backends as linear_backends
from fastarch.ops.linear.backends import CPU_ROWS, LinearProblem

HAS_CUDA = torch.cuda.is_available()
GPU = pytest.mark.gpu
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
FACTOR = 2.0
# dtype -> floor of the error, relative to max |reference|: two ulps at 1.0
FLOOR = {torch.float32: 2.4e-7, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-14}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (in_features, out_features): 16-lane tails both ways, one feature, a SmolLM2 projection, a
# LLaMA-7B-width row, out_features not a multiple of the 4-column tiles
SHAPES = [(113, 37), (1, 5), (576, 1728), (4096, 3), (203, 65)]
# rows each backend runs for every dtype (the CPU kernels take fp16 from 3 rows)
BACKEND_ROWS = {"cpu": [3, 4], "reference": [1, 40], "triton": [1, 3], "cuda": [1, 3, 16]}


def make(rows, k, n, dtype, device="cpu", bias=True):
    g = torch.Generator().manual_seed(rows * 7919 + k * 31 + n)
    x = torch.randn(rows, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5
    b = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(x), cast(w), cast(b)


def check(ours, x, w, b):
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    theirs = F.linear(x.cpu(), w.cpu(), None if b is None else b.cpu()) if x.dtype != torch.float64 else ref
    assert ours.shape == ref.shape and ours.dtype == x.dtype
    if not ref.numel():
        return
    scale = max(ref.abs().max().item(), 1.0)
    e_ours = (ours.cpu().double() - ref.cpu()).abs().max().item()
    e_torch = (theirs.double() - ref.cpu()).abs().max().item()
    bound = FACTOR * e_torch + FLOOR[x.dtype] * scale
    assert e_ours <= bound, f"error {e_ours:.3g} vs fp64 > {FACTOR} x torch's {e_torch:.3g} + floor = {bound:.3g}"


# Triton's interpreter (no GPU) runs the shapes of up to 200K weights: the 4096-wide rows are
# minutes there
INTERPRETED_SHAPES = [s for s in SHAPES if s[0] * s[1] <= 200_000]
CASES = [
    pytest.param(backend, device, rows, shape, marks=p.marks, id=f"{backend}-{rows}x{shape[0]}x{shape[1]}")
    for p in backend_rows.rows("linear")
    for backend, device in [p.values]
    for rows in BACKEND_ROWS[backend]
    for shape in (INTERPRETED_SHAPES if backend == "triton" and device == "cpu" else SHAPES)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("backend,device,rows,shape", CASES)
def test_linear_matches_reference(backend, device, rows, shape, bias, dtype):
    x, w, b = make(rows, *shape, dtype, device, bias)
    backend_rows.require("linear", backend, LinearProblem.of(x, w))
    check(ops.linear(x, w, b, backend=backend), x, w, b)


@pytest.fixture
def cpu_isa():
    """Selects the CPU kernels' instruction set for one test, then restores the default."""

    def select(name):
        backend_rows.set_cpu_isa(name)
        registry.clear_choices()  # the CPU backend's row limits depend on the level

    yield select
    select(backend_rows.DEFAULT_ISA)


@pytest.mark.parametrize("isa", ["auto", "generic", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 17, 33])
def test_cpu_kernel_every_row_count(cpu_isa, isa, dtype, rows):
    """The kernel itself, past the dispatcher's limits: 4-row groups and their tails, 4-column
    tiles and theirs, a K that ends mid-vector, with and without bias. bf16 past 4 rows: the
    vdpbf16ps tiles at auto on an AVX512-BF16 CPU, the widened ones at level avx512."""
    cpu_isa(isa)
    for k, n in [(77, 13), (576, 9)]:
        x, w, b = make(rows, k, n, dtype)
        check(torch.ops.fastarch._linear(x, w, b), x, w, b)
        check(torch.ops.fastarch._linear(x, w, None), x, w, None)


def test_cpu_kernel_strided_rows_and_empty():
    x = torch.randn(5, 48)[:, :33]  # rows 48 apart
    w = torch.randn(7, 33)
    check(torch.ops.fastarch._linear(x, w, None), x, w, None)
    xc = torch.randn(6, 4)[:, 1:2]  # a single strided column
    w1 = torch.randn(3, 1)
    check(torch.ops.fastarch._linear(xc, w1, None), xc, w1, None)
    assert torch.ops.fastarch._linear(torch.randn(0, 8), torch.randn(3, 8), None).shape == (0, 3)
    assert torch.ops.fastarch._linear(torch.randn(2, 8), torch.randn(0, 8), None).shape == (2, 0)
    b = torch.randn(3)
    assert torch.equal(torch.ops.fastarch._linear(torch.randn(2, 0), torch.randn(3, 0), b), b.expand(2, 3))


@pytest.mark.parametrize("isa", ["auto", "avx512"])
def test_cpu_bf16_tiles_strided_rows_nan_and_subnormals(cpu_isa, isa):
    """The bf16 tiles (past 4 rows; vdpbf16ps at auto on an AVX512-BF16 CPU): x rows apart in
    memory (a view), NaN and inf kept in their row and column (inf * 0 is NaN), and subnormal
    terms: vdpbf16ps reads bf16 subnormals as 0 and flushes subnormal sums to 0, as PyTorch's
    oneDNN bf16 GEMM does; every result within the check's bound of fp64 either way."""
    cpu_isa(isa)
    x = torch.randn(9, 80, dtype=torch.float64).to(torch.bfloat16)[:, :67]  # rows 80 apart
    w = (torch.randn(10, 67, dtype=torch.float64) / 8).to(torch.bfloat16)
    b = torch.randn(10, dtype=torch.float64).to(torch.bfloat16)
    check(torch.ops.fastarch._linear(x, w, b), x, w, b)
    xn, wn = x.clone(), w.clone()
    xn[6, 40] = float("nan")
    wn[3, 66] = float("inf")  # (in the masked last step; x[:, 66] finite and nonzero)
    xn[:, 66] = 1.0
    y = torch.ops.fastarch._linear(xn, wn, None)
    expect = torch.zeros_like(y, dtype=torch.bool)
    expect[6, :] = True
    assert torch.equal(y.isnan(), expect)
    assert torch.isposinf(y[:, 3][torch.arange(9) != 6]).all()
    tiny = torch.full((6, 32), 2.0**-130, dtype=torch.bfloat16)  # subnormal in bf16 and fp32
    wt = torch.ones(2, 32, dtype=torch.bfloat16)
    y = torch.ops.fastarch._linear(tiny, wt, None)
    assert (y.abs() <= 32 * 2.0**-130).all() and (y >= 0).all()


@pytest.mark.parametrize("backend,device", backend_rows.rows("linear"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_stays_in_its_row_and_column(backend, device, dtype):
    rows = BACKEND_ROWS[backend][0]
    x, w, b = make(rows, 40, 9, dtype, device)
    x[0, 5] = float("nan")
    w[4, 7] = float("nan")
    backend_rows.require("linear", backend, LinearProblem.of(x, w))
    y = ops.linear(x, w, b, backend=backend).cpu()
    expect = torch.zeros_like(y, dtype=torch.bool)
    expect[0, :] = True
    expect[:, 4] = True
    assert torch.equal(y.isnan(), expect)


@pytest.mark.parametrize("backend", [None, "reference"], ids=["auto", "reference"])  # auto: the cpu kernel where it runs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_match_torch(backend, dtype):
    x, w, b = make(2, 37, 11, dtype)
    x = x.view(1, 2, 37)
    dy = torch.randn(1, 2, 11, dtype=dtype)
    grads = []
    for fn in (lambda *a: ops.linear(*a, backend=backend), F.linear):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        y = fn(*leaves)
        grads.append((y.detach(), *torch.autograd.grad(y, leaves, dy)))
    check(grads[0][0], x, w, b)
    for ours, theirs in zip(grads[0][1:], grads[1][1:]):
        torch.testing.assert_close(ours, theirs)  # the same products: PyTorch's GEMMs


def test_module_shares_parameters_and_follows_autocast():
    torch_layer = torch.nn.Linear(20, 5)
    layer = fastarch.nn.Linear.from_torch(torch_layer)
    assert layer.weight is torch_layer.weight and layer.bias is torch_layer.bias
    assert layer.state_dict().keys() == torch_layer.state_dict().keys()
    x = torch.randn(2, 20)
    check(layer(x), x, layer.weight, layer.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = layer(x), torch_layer(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)


def test_leading_dims_and_1d():
    x, w, b = make(6, 20, 5, torch.float32)
    y = ops.linear(x.view(2, 3, 20), w, b)
    assert y.shape == (2, 3, 5)
    torch.testing.assert_close(y, F.linear(x.view(2, 3, 20), w, b))
    torch.testing.assert_close(ops.linear(x[0], w, b), F.linear(x[0], w, b))


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.randn(2, 8), torch.randn(3, 7), None), ValueError, "weight must be .out_features, in_features. with in_features = x's last dim 8"),
        ((torch.randn(2, 8), torch.randn(3, 8, dtype=torch.float64), None), TypeError, "weight must have x's dtype"),
        ((torch.randn(2, 8), torch.randn(3, 8), torch.randn(4)), ValueError, r"bias must have shape \(3,\)"),
        ((torch.randn(2, 8), torch.randn(3, 8), torch.randn(3).half()), TypeError, "bias must have x's dtype"),
        ((torch.randint(0, 3, (2, 8)), torch.randn(3, 8), None), TypeError, "x must be float32"),
        ((torch.tensor(1.0), torch.randn(3, 1), None), ValueError, "at least one dimension"),
        ((torch.randn(2, 8), "w", None), TypeError, "weight must be a torch.Tensor"),
    ],
)
def test_bad_input_is_a_clear_error(args, error, match):
    with pytest.raises(error, match=match):
        ops.linear(*args)


def k_major(w: torch.Tensor) -> torch.Tensor:
    """w's values as transformers' Conv1D keeps them: the transpose of a contiguous (in, out)."""
    return w.t().contiguous().t()


@pytest.mark.parametrize("isa", ["auto", "generic", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_cpu_kernel_k_major_weight(cpu_isa, isa, dtype, rows):
    """A K-major weight (GPT-2's Conv1D) read as it is: column blocks of 512/1024 and their tails,
    4-row groups of W's rows and the rest of a 32-row chunk, a K of one group plus one row."""
    cpu_isa(isa)
    for k, n in [(77, 13), (576, 1029), (5, 2050)]:
        x, w, b = make(rows, k, n, dtype)
        wk = k_major(w)
        assert not wk.is_contiguous() and LinearProblem.of(x, wk).weight_k_major
        check(torch.ops.fastarch._linear(x, wk, b), x, w, b)
        check(torch.ops.fastarch._linear(x, wk, None), x, w, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_k_major_weight_through_the_op(dtype):
    """ops.linear on a K-major weight: the cpu kernel at a decode step's rows where the build
    takes the dtype, PyTorch's GEMM past them; NaN stays in its row and column."""
    for rows in (1, 3, 4, 5, 12):
        x, w, b = make(rows, 96, 40, dtype)
        x[0, 5] = float("nan")
        w[4, 7] = float("nan")
        wk = k_major(w)
        chosen = registry.choose("linear", LinearProblem.of(x, wk)).name
        first, last = CPU_ROWS[linear_backends._cpu_build()].get(dtype, (1, 0))
        assert (chosen == "cpu") == (availability.cpu() is None and first <= rows <= min(last, 4)), (rows, chosen)
        y = ops.linear(x, wk, b)
        expect = torch.zeros_like(y, dtype=torch.bool)
        expect[0, :] = True
        expect[:, 4] = True
        assert torch.equal(y.isnan(), expect)
        x[0, 5], w[4, 7] = 0.5, 0.5
        check(ops.linear(x, k_major(w), b), x, w, b)


def test_kernel_op_checks_its_arguments():
    with pytest.raises(RuntimeError, match="weight must be contiguous or the transpose of a contiguous"):
        torch.ops.fastarch._linear(torch.randn(2, 8), torch.randn(3, 16)[:, ::2], None)
    with pytest.raises(RuntimeError, match="K-major weight takes at most 4 rows"):
        torch.ops.fastarch._linear(torch.randn(5, 8), torch.randn(8, 3).t(), None)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        torch.ops.fastarch._linear(torch.randn(2, 2, 8), torch.randn(3, 8), None)


@pytest.fixture
def cpu_gemm(monkeypatch):
    """Sets where fp32 products beyond the CPU kernel's rows run (backends.CPU_GEMM)."""

    def select(value):
        monkeypatch.setattr(linear_backends, "CPU_GEMM", value)
        registry.clear_choices()

    yield select
    registry.clear_choices()


def test_choice_follows_rows_dtype_and_build(cpu_isa, cpu_gemm):
    """The CPU kernel where it was measured faster, PyTorch's GEMV/GEMM elsewhere."""
    cpu_gemm("torch")

    def chosen(rows, dtype, w=None):
        x = torch.randn(rows, 64, dtype=dtype)
        w = torch.randn(32, 64, dtype=dtype) if w is None else w
        return registry.choose("linear", LinearProblem.of(x, w)).name

    cpu_isa("auto")
    build = linear_backends._cpu_build()
    assert build == ("avx512_bf16" if _C._cpu_level() == "avx512_bf16" else "avx512" if _C._cpu_avx512()
                     else "avx2" if _C._cpu_portable_avx2() else "generic")
    for dtype in DTYPES:
        first, last = CPU_ROWS[build].get(dtype, (1, 0))
        # past the 16-bit rows at level avx2: the cpu backend's widened GEMM
        widened = build == "avx2" and dtype in linear_backends.WIDENED_DTYPES
        for rows in (1, 2, 3, 4, 5, 8, 32, 33, 512, 600):
            assert (chosen(rows, dtype) == "cpu") == (first <= rows <= last or widened and rows > last), (dtype, rows)
    # elsewhere: PyTorch's (never Triton's interpreter, which runs CPU tensors only when asked for)
    assert chosen(1, torch.float64) == "reference"
    assert chosen(1, torch.float32, torch.randn(64, 32).t()) == "cpu"  # K-major (Conv1D's): the kernel reads it
    assert chosen(5, torch.float32, torch.randn(64, 32).t()) == "reference"  # past its 4 rows there
    assert chosen(1, torch.float32, torch.randn(32, 128)[:, ::2]) == "reference"  # strided: no kernel
    cpu_isa("generic")
    assert chosen(1, torch.float32) == "cpu" and chosen(1, torch.bfloat16) != "cpu"


def test_choice_at_level_avx2(cpu_isa, cpu_gemm):
    """The AVX2 build's own rows: 16-bit weights too (PyTorch's bf16/fp16 products have no vector
    path there), and past them the 16-bit products widened to fp32 on the cpu backend."""
    cpu_gemm("torch")  # (fp32 past the rows: F.linear, not oneDNN's matmul on the cpu backend)
    cpu_isa("avx2")  # (skips where the CPU or the build lacks it)
    assert CPU_ROWS["avx2"][torch.bfloat16][1] >= 8  # (a batch of decode steps)
    for dtype, (first, last) in CPU_ROWS["avx2"].items():
        for rows in (1, 2, 4, last, last + 1, 4096):
            widened = dtype in linear_backends.WIDENED_DTYPES and rows > last
            assert (chosen_for(rows, dtype) == "cpu") == (first <= rows <= last or widened), (dtype, rows)
            assert linear_backends.cpu_product(rows, dtype) == ("widened" if widened else "onednn" if rows > last
                                                                else "kernel"), (dtype, rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_widened_16bit_products_at_level_avx2(cpu_isa, dtype):
    """Past the kernel's 16-bit rows at level avx2, the cpu backend runs the product widened to
    fp32 and rounds it once: exactly F.linear on the widened tensors, judged against fp64 as every
    backend (NaN kept in its row); its backward's products are widened too. At the AVX-512
    levels nothing is widened: the AVX-512 kernel's own rows there, PyTorch's (the reference
    backend) past them."""
    cpu_isa("avx2")
    rows = CPU_ROWS["avx2"][dtype][1] + 7
    for k, n in [(113, 37), (576, 1728), (1, 5)]:
        for bias in (True, False):
            x, w, b = make(rows, k, n, dtype, bias=bias)
            y = ops.linear(x, w, b)
            assert linear_backends.cpu_product(rows, dtype) == "widened"
            wide = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
            assert torch.equal(y, wide)
            check(y, x, w, b)
    x, w, b = make(rows, 113, 37, dtype)
    x[5, 7] = float("nan")
    y = ops.linear(x, w, b)
    assert y.isnan().any(1).nonzero().flatten().tolist() == [5] and y[5].isnan().all()
    # the backward: dx = dy W and dW = dy^T x, in fp32 and rounded once
    x, w, b = (t.requires_grad_() for t in make(rows, 113, 37, dtype))
    dy = torch.randn(rows, 37, dtype=dtype)
    ops.linear(x, w, b).backward(dy)
    assert torch.equal(x.grad, (dy.float() @ w.float()).to(dtype))
    assert torch.equal(w.grad, (dy.float().t() @ x.float()).to(dtype))
    if _runs_avx512():
        cpu_isa("avx512")
        last = CPU_ROWS["avx512"][dtype][1]
        for r in (rows, last, last + 1):
            assert linear_backends.cpu_product(r, dtype) != "widened"
            assert chosen_for(r, dtype) == ("cpu" if r <= last else "reference")


def _runs_avx512() -> bool:
    info = fastarch._extension.build_info()
    return info["cpu_has_avx512"] and "avx512" in info["cpu_kernels"]


def chosen_for(rows, dtype, k=64):
    return registry.choose("linear", LinearProblem.of(torch.randn(rows, k, dtype=dtype), torch.randn(32, k, dtype=dtype))).name


def test_many_fp32_rows_on_onednn(cpu_gemm):
    """FASTARCH_CPU_GEMM=onednn: fp32 products past the kernel's rows on the cpu backend, by
    oneDNN's matmul, judged against fp64 like every backend (strided rows, NaN kept in its
    row); bf16 (but at level avx2, widened) and an empty K stay on F.linear; torch: F.linear;
    auto: oneDNN on AMD CPUs."""
    cpu_gemm("onednn")
    assert chosen_for(33, torch.float32) == "cpu" and chosen_for(512, torch.float32) == "cpu"
    assert linear_backends.cpu_product(512, torch.float32) == "onednn"
    widened = linear_backends.cpu_product(1024, torch.bfloat16) == "widened"
    assert widened == (linear_backends._cpu_build() == "avx2")
    assert chosen_for(1024, torch.bfloat16) == ("cpu" if widened else "reference")
    assert chosen_for(40, torch.float32, k=0) == "reference"
    for rows, (k, n) in [(33, (113, 37)), (512, (576, 1728)), (40, (1, 5)), (97, (203, 65))]:
        x, w, b = make(rows, k, n, torch.float32)
        check(ops.linear(x, w, b, backend="cpu"), x, w, b)
        check(ops.linear(x, w, None, backend="cpu"), x, w, None)
    x = torch.randn(40, 48)[:, :33]  # rows 48 apart
    w = torch.randn(9, 33)
    check(ops.linear(x, w, backend="cpu"), x, w, None)
    x[5, 7] = float("nan")
    y = ops.linear(x, w, backend="cpu")
    assert y.isnan().any(1).nonzero().flatten().tolist() == [5] and y[5].isnan().all()
    assert torch.equal(ops.linear(torch.randn(40, 0), w[:, :0], backend="reference"), torch.zeros(40, 9))
    cpu_gemm("torch")
    assert chosen_for(512, torch.float32) == "reference"
    cpu_gemm("auto")
    assert (chosen_for(512, torch.float32) == "cpu") == (availability.cpuinfo("vendor_id") == "AuthenticAMD")


def test_onednn_gemm_not_where_onednn_rounds_fp32(cpu_gemm, monkeypatch):
    """A process that told oneDNN to run fp32 products in bf16 keeps F.linear's fp32 (the
    setting stood in for, as torch versions without it have no such attribute)."""
    cpu_gemm("onednn")
    monkeypatch.setattr(torch.backends.mkldnn, "matmul", types.SimpleNamespace(fp32_precision="bf16"), raising=False)
    registry.clear_choices()
    assert chosen_for(512, torch.float32) == "reference"
    monkeypatch.setattr(torch.backends.mkldnn, "matmul", types.SimpleNamespace(fp32_precision="ieee"), raising=False)
    registry.clear_choices()
    assert chosen_for(512, torch.float32) == "cpu"


def test_opcheck_and_compile():
    x, w, b = make(3, 24, 10, torch.float32)
    torch.library.opcheck(torch.ops.fastarch.linear.default, (x, w, b, ""))
    torch.library.opcheck(torch.ops.fastarch.linear.default, (x, w, None, "cpu"))
    torch.library.opcheck(torch.ops.fastarch._linear.default, (x, w, b))
    compiled = torch.compile(lambda x, w, b: ops.linear(x, w, b) * 2, fullgraph=True)
    assert torch.equal(compiled(x, w, b), ops.linear(x, w, b) * 2)
