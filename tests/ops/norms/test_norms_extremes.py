"""The norms at the edges of fp32, every backend, against PyTorch's fp32 computation.

Each case is a 3-row matrix whose middle row is the edge (a row of magnitude 1e-30 ... 1e36,
a huge constant row, a NaN or an inf in x, residual, weight, bias, dy or dresidual_out)
between two ordinary rows. The yardstick is torch.nn.functional.layer_norm / rms_norm
computed in fp32 on the CPU, and its autograd, rounded to the dtype: our outputs and
gradients must be NaN, +inf and -inf in exactly its elements (when an input holds an inf:
non-finite in exactly its elements, see assert_same_non_finite). Where the yardstick is
finite, the error against an fp64 computation is judged as in test_norms.py (at most FACTOR
x PyTorch's own error plus a floor of a couple of ulps), row by row, so that an ordinary
row's error cannot hide an edge row's.

What PyTorch does at the edges, and so every backend:
- A NaN in a row makes the row's y and dx NaN; in LayerNorm an inf too. RMSNorm: an inf
  makes rstd = 0, so y is 0 but for the inf element (inf * 0 = NaN), and dx is NaN.
- A row whose mean square mean^2 + var overflows fp32 (|x| above ~1.8e19): LayerNorm gives
  NaN for the row (y, dx, and every column of dweight; PyTorch only when n % 8 == 0 or
  n < 8, see test_overflowing_statistics_at_any_length); RMSNorm's rstd is 0, so y and dx
  are 0.
- dweight is NaN in every column a NaN xhat or dy reaches; dbias only where dy is NaN (it
  does not depend on x). A NaN or inf in weight makes its column of y non-finite, and dx
  non-finite everywhere (every row's sum of dy * weight holds it).
"""

from __future__ import annotations

import pytest
import torch

import backend_rows  # tests/backend_rows.py
import torch.nn.functional as F

from fastarch import ops
from fastarch._extension import build_info
from test_norms import FLOOR, FORWARD_FACTOR, GRAD_FACTOR, OPS  # tests/ops/norms/test_norms.py

HAS_CUDA = torch.cuda.is_available()
GPU = pytest.mark.gpu
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # on CPU: Triton's interpreter (conftest)
HAS_AVX512 = bool(build_info().get("cpu_has_avx512")) and "avx512" in build_info().get("cpu_kernels", [])

EPS = 1e-5
# Two 16-lane chunks and a masked tail of 8 (the AVX-512 kernels); a 64-wide Triton tile.
N = 40
# Longer than a register-resident row: the looped Triton kernels (> 8192 columns) and the
# looped CUDA kernels (> 16384 fp32 columns).
N_LOOPED = 16512
# Both multiples of 8: only there does PyTorch's CPU LayerNorm give NaN for a row whose
# statistics overflow (see test_overflowing_statistics_at_any_length).

# Triton's interpreter computes in numpy, which warns of the overflows these cases are about.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

BACKENDS = [  # (backend, device, isa of the cpu kernels)
    pytest.param(("cpu", "cpu", "avx512"), id="cpu-avx512",
                 marks=pytest.mark.skipif(not HAS_AVX512, reason="the CPU or this build lacks the AVX-512 kernels")),
    pytest.param(("cpu", "cpu", "generic"), id="cpu-generic"),
    pytest.param(("cpu", "cpu", "avx2"), id="cpu-avx2"),
    pytest.param(("triton", TRITON_DEVICE, "auto"), id="triton"),
    pytest.param(("reference", "cpu", "auto"), id="reference"),
    pytest.param(("cuda", "cuda", "auto"), id="cuda", marks=GPU),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ----------------------------------------------------------------------------- the edges

# Each edge changes the inputs in place: (x, residual, weight, bias, dy, dresidual_out), all
# fp64 (rows, n) or (n,); row 1 is the edge row. Rows are x = (randn + 0.5) * magnitude.


def _magnitude(m):
    def apply(x, *_):
        x[1] *= m

    return apply


def _constant(c):
    def apply(x, *_):
        x[1] = c

    return apply


def _element(index, value):
    """Sets element [1, 5] (or [5] of a vector) of input `index` to value."""

    def apply(*inputs):
        t = inputs[index]
        if t.dim() == 2:
            t[1, 5] = value
        else:
            t[5] = value

    return apply


X, RESIDUAL, WEIGHT, BIAS, DY, DRES = range(6)
NAN, INF = float("nan"), float("inf")

EDGES = {  # name -> (change, dtypes it applies to)
    "tiny-1e-30": (_magnitude(1e-30), DTYPES),  # squares underflow: var = 0, rstd = 1/sqrt(eps)
    "unit": (_magnitude(1.0), DTYPES),
    "big-1e18": (_magnitude(1e18), DTYPES),  # fp16: inf
    "huge-1e28": (_magnitude(1e28), DTYPES),  # squares overflow fp32
    "huge-1e36": (_magnitude(1e36), DTYPES[:2]),  # near the top of the fp32 range
    "constant-1e18": (_constant(1e18), DTYPES),  # variance 0, statistics in range: y = bias
    "constant-1e30": (_constant(1e30), DTYPES[:2]),  # variance 0, mean^2 overflows
    "nan-x": (_element(X, NAN), DTYPES),
    "inf-x": (_element(X, INF), DTYPES),
    "-inf-x": (_element(X, -INF), DTYPES),
    "nan-residual": (_element(RESIDUAL, NAN), DTYPES),
    "nan-weight": (_element(WEIGHT, NAN), DTYPES),
    "inf-weight": (_element(WEIGHT, INF), DTYPES),
    "nan-bias": (_element(BIAS, NAN), DTYPES),
    "nan-dy": (_element(DY, NAN), DTYPES),
    "inf-dy": (_element(DY, INF), DTYPES),
    "nan-dresidual_out": (_element(DRES, NAN), DTYPES),
}
# Which inputs an op has: an edge in an input the op lacks is no case.
_NEEDS = {"nan-residual": RESIDUAL, "nan-bias": BIAS, "nan-dresidual_out": DRES}


def _applies(edge: str, op: str) -> bool:
    is_rms, has_residual = OPS[op]
    need = _NEEDS.get(edge)
    return not ((need in (RESIDUAL, DRES) and not has_residual) or (need == BIAS and is_rms))


def make_inputs(op, edge, dtype, n=N):
    """x, residual, weight, bias, dy, dresidual_out in dtype on the CPU (None where absent)."""
    is_rms, has_residual = OPS[op]
    g = torch.Generator().manual_seed(n)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x = rand(3, n) + 0.5
    residual = rand(3, n)
    weight = rand(n) * 0.5 + 1.0
    bias = rand(n) * 0.5
    dy = rand(3, n)
    dres = rand(3, n)
    EDGES[edge][0](x, residual, weight, bias, dy, dres)
    out = [x, residual if has_residual else None, weight, None if is_rms else bias, dy, dres if has_residual else None]
    return [t.to(dtype) if t is not None else None for t in out]


# ----------------------------------------------------------------------------- computations


def _leaf(t, dtype=None, device="cpu"):
    if t is None:
        return None
    return t.detach().to(device=device, dtype=dtype or t.dtype).clone().requires_grad_()


def _grads(outputs, inputs, grad_outputs):
    wanted = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(outputs, wanted, grad_outputs))
    return [next(got) if t is not None else None for t in inputs]


def ours(op, backend, device, x, residual, weight, bias, dy, dres):
    """(y, residual_out or None, dx, dresidual, dweight, dbias) from our op, on the CPU."""
    inputs = [_leaf(t, device=device) for t in (x, residual, weight, bias)]
    xi, ri, wi, bi = inputs
    if op == "layer_norm":
        outs = (ops.layer_norm(xi, wi, bi, EPS, backend=backend),)
    elif op == "rms_norm":
        outs = (ops.rms_norm(xi, wi, EPS, backend=backend),)
    elif op == "add_layer_norm":
        outs = ops.add_layer_norm(xi, ri, wi, bi, EPS, backend=backend)
    else:
        outs = ops.add_rms_norm(xi, ri, wi, EPS, backend=backend)
    douts = [t.to(device) for t in (dy, dres)[: len(outs)]]
    grads = _grads(outs, inputs, douts)
    cpu = lambda t: t.detach().cpu() if t is not None else None  # noqa: E731
    return [cpu(outs[0]), cpu(outs[1]) if len(outs) > 1 else None] + [cpu(t) for t in grads]


def _composite(s, weight, bias, is_rms):
    """The norm as plain tensor ops on centered values: differentiated by autograd in fp64,
    exact to fp64 rounding at any offset (F.layer_norm's own backward is not: it forms
    rstd * dy * w + b * x + c, whose terms cancel when the mean is large)."""
    d = s if is_rms else s - s.mean(-1, keepdim=True)
    y = d * torch.rsqrt(d.square().mean(-1, keepdim=True) + EPS)
    y = y * weight if weight is not None else y
    return y + bias if bias is not None else y


def torch_in(op, acc, x, residual, weight, bias, dy, dres):
    """PyTorch's computation, on the CPU: F.layer_norm / F.rms_norm in fp32 (the yardstick),
    or the fp64 truth; the same outputs as ours(). The fused add rounds x + residual to the
    dtype, as ours does, then normalizes that rounded sum; its gradient passes on to x and
    residual."""
    is_rms, has_residual = OPS[op]
    s = (x + residual) if has_residual else x  # torch adds in fp32 and rounds once
    si, wi, bi = _leaf(s, acc), _leaf(weight, acc), _leaf(bias, acc)
    if acc == torch.float64:
        y = _composite(si, wi, bi, is_rms)
    elif is_rms:
        y = F.rms_norm(si, (s.shape[-1],), wi, EPS)
    else:
        y = F.layer_norm(si, (s.shape[-1],), wi, bi, EPS)
    ds, dw, db = _grads([y], [si, wi, bi], [dy.to(acc)])
    if has_residual:
        ds = ds + dres.to(acc)
    return [y.detach(), s if has_residual else None, ds, ds if has_residual else None, dw, db]


# ----------------------------------------------------------------------------- checks

NAMES = ("y", "residual_out", "dx", "dresidual", "dweight", "dbias")


def assert_same_non_finite(name, a, yardstick, inf_input):
    """NaN, +inf and -inf in the same elements. inf_input (an inf among the inputs): non-finite
    in the same elements. Sums of infinities of both signs are then NaN or +-inf depending on
    the order of the additions, which no two implementations share."""
    masks = (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf))
    if inf_input:
        masks = (("non-finite values", lambda t: ~torch.isfinite(t)),)
    for what, mask in masks:
        got, want = mask(a), mask(yardstick)
        if not torch.equal(got, want):
            where = (got != want).nonzero().tolist()
            raise AssertionError(
                f"{name}: {what} in {int(got.sum())} elements, PyTorch's fp32 in {int(want.sum())}; "
                f"they differ at {where[:8]}{' ...' if len(where) > 8 else ''}\nours: {a}\nPyTorch fp32: {yardstick}"
            )


def assert_close_where_finite(name, a, theirs, truth, dtype, factor):
    """test_norms.py's criterion on the finite elements, per row (a vector is one row)."""
    rows = zip(a.double().reshape(-1, a.shape[-1]), theirs.double().reshape(-1, a.shape[-1]),
               truth.reshape(-1, a.shape[-1]))
    for i, (ra, rt, rr) in enumerate(rows):
        keep = torch.isfinite(ra) & torch.isfinite(rr)
        if not keep.any():
            continue
        e_ours = (ra - rr)[keep].abs().max().item()
        e_theirs = (rt - rr)[keep].abs().max().item()
        bound = factor * e_theirs + FLOOR[dtype] * rr[keep].abs().max().item()
        assert e_ours <= bound, (
            f"{name} row {i}: error {e_ours:.3g} vs fp64 > {factor} x PyTorch's {e_theirs:.3g} + floor = {bound:.3g}"
        )


def check_edge(op, edge, dtype, backend, device, n=N):
    inputs = make_inputs(op, edge, dtype, n)
    got = ours(op, backend, device, *inputs)
    yardstick = torch_in(op, torch.float32, *inputs)
    truth = torch_in(op, torch.float64, *inputs)
    for name, a, y32, t64 in zip(NAMES, got, yardstick, truth):
        if y32 is None:
            assert a is None, f"{name}: expected none"
            continue
        assert a is not None and a.shape == y32.shape and a.dtype == dtype, f"{name}: {a!r}"
        theirs = y32.to(dtype)  # what PyTorch's own op in this dtype returns
        if name == "residual_out":
            torch.testing.assert_close(a, theirs, rtol=0, atol=0, equal_nan=True, msg="residual_out != x + residual")
            continue
        assert_same_non_finite(name, a, theirs, inf_input="inf" in edge)
        assert_close_where_finite(name, a, theirs, t64, dtype, FORWARD_FACTOR if name == "y" else GRAD_FACTOR)


def _cases():
    for b in BACKENDS:
        backend, device, isa = b.values[0]
        for op in OPS:
            for edge, (_, dtypes) in EDGES.items():
                if not _applies(edge, op):
                    continue
                for dtype in dtypes:
                    yield pytest.param(
                        backend, device, isa, op, edge, dtype, marks=b.marks, id=f"{b.id}-{op}-{edge}-{str(dtype)[6:]}"
                    )


@pytest.mark.parametrize("backend,device,isa,op,edge,dtype", list(_cases()))
def test_edge(backend, device, isa, op, edge, dtype, cpu_isa):
    cpu_isa(isa)
    check_edge(op, edge, dtype, backend, device)


LOOPED_EDGES = ["huge-1e28", "constant-1e30", "nan-x", "inf-x", "nan-weight", "nan-dy"]
LOOPED_BACKENDS = [  # the kernels with a separate path for long rows
    pytest.param("triton", TRITON_DEVICE, id="triton"),
    pytest.param("cuda", "cuda", id="cuda", marks=GPU),
]


@pytest.mark.parametrize("edge", LOOPED_EDGES)
@pytest.mark.parametrize("op", ["layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("backend,device", LOOPED_BACKENDS)
def test_edge_long_rows(backend, device, op, edge):
    """The looped kernels (rows too long for registers) at the same edges."""
    check_edge(op, edge, torch.float32, backend, device, N_LOOPED)


@pytest.mark.parametrize("n", [7, 41, 47, 8196])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend,device,isa", [pytest.param(*b.values[0], marks=b.marks, id=b.id) for b in BACKENDS])
def test_overflowing_statistics_at_any_length(backend, device, isa, op, n, cpu_isa):
    """A row whose mean square overflows fp32 gives NaN (LayerNorm) or 0 (RMSNorm: x * rstd
    with rstd = 0) at every row length, forward and backward, and leaves the other rows
    alone. PyTorch's CPU LayerNorm agrees when n % 8 == 0 or n < 8; at other lengths its
    Welford combination returns var = inf, rstd = 0 and y = bias, which is silently wrong."""
    cpu_isa(isa)
    is_rms = OPS[op][0]
    for edge in ("huge-1e28", "constant-1e30"):
        x, residual, weight, bias, dy, dres = make_inputs(op, edge, torch.float32, n)
        y, _, dx, _, dweight, dbias = ours(op, backend, device, x, residual, weight, bias, dy, dres)
        dnorm = dx - dres if dres is not None else dx  # the fused add passes dresidual_out on
        for name, t in (("y", y), ("dx", dnorm)):
            assert torch.isfinite(t[[0, 2]]).all(), f"{edge}: {name} of the ordinary rows"
            if is_rms:
                assert torch.equal(t[1], torch.zeros_like(t[1])), f"{edge}: {name} of the huge row: {t[1]}"
            else:
                assert torch.isnan(t[1]).all(), f"{edge}: {name} of the huge row: {t[1]}"
        weight_ok = torch.isfinite(dweight).all() if is_rms else torch.isnan(dweight).all()
        assert weight_ok, f"{edge}: dweight {dweight}"
        assert dbias is None or torch.isfinite(dbias).all(), f"{edge}: dbias {dbias}"
