"""Numerics of fastarch.ops.rotary, every backend, against an fp64 reference.

How a result is judged: every backend computes in fp32 and rounds once, so each element must
lie within one ulp of the dtype at the fp64 truth (plus the fp32 computation's own few-ulp
error at the inputs' scale); see rope_cases.ulp_bound. That is stricter than comparing with
the same computation done in the dtype (transformers' q * cos + rotate_half(q) * sin in bf16
rounds three times, with cos and sin themselves rounded), which the last test checks we beat.
The gradient is the same rotation by the opposite angle, judged the same way.
"""

from __future__ import annotations

import pytest
import torch

import backend_rows  # tests/backend_rows.py
from fastarch import ops
from fastarch._extension import _C
from rope_cases import CASES, make, truth, ulp_bound

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = [pytest.param(False, id="neox"), pytest.param(True, id="gptj")]
# Every backend row, and the CPU kernels' portable builds (run on an AVX-512 machine too).
ROWS = backend_rows.rows("rotary") + [pytest.param("cpu", "cpu", id=f"cpu-{level}") for level in ("generic", "avx2")]


@pytest.fixture
def cpu_isa(request):
    """The CPU kernels' level for one test (generic or avx2 for the cpu-generic and cpu-avx2
    rows), restored after."""
    level = next((lv for lv in ("generic", "avx2") if f"cpu-{lv}" in request.node.callspec.id), None)
    if level:
        backend_rows.set_cpu_isa(level)
    yield
    if level:
        _C._set_cpu_isa(backend_rows.DEFAULT_ISA)


def _problem(q, cos):
    from fastarch.ops.rope.backends import RotaryProblem

    return RotaryProblem.of(q, cos)


def _to(device, *ts):
    return [t.to(device) if t is not None else None for t in ts]


def _check_close(out, ref, x, dtype, what):
    assert out.dtype == dtype and out.shape == ref.shape, what
    err = (out.double() - ref).abs()
    bound = ulp_bound(ref, x.double(), dtype)
    worst = (err - bound).max().item() if err.numel() else 0.0
    assert worst <= 0, f"{what}: error {err.max().item():.3g} exceeds the one-ulp bound by {worst:.3g}"


@pytest.mark.parametrize("interleaved", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", ROWS)
def test_forward_and_backward(backend, device, dtype, case, interleaved, cpu_isa):
    q, k, cos, sin, positions = make(case, dtype)
    backend_rows.require("rotary", backend, _problem(q.to(device), cos))
    q_ref, k_ref = truth(q, k, cos, sin, positions, interleaved)
    qd, kd, cosd, sind, posd = _to(device, q, k, cos, sin, positions)
    qd.requires_grad_(True)
    kd.requires_grad_(True)
    q_out, k_out = ops.rotary(qd, kd, cosd, sind, posd, interleaved, backend=backend)
    _check_close(q_out.cpu(), q_ref, q, dtype, "q_out")
    _check_close(k_out.cpu(), k_ref, k, dtype, "k_out")
    # pass-through channels are copied bit for bit
    assert torch.equal(q_out[..., case.rot :].cpu(), q[..., case.rot :])
    assert q_out.is_contiguous() == qd.is_contiguous()

    g = torch.Generator().manual_seed(1)
    dq_out = torch.randn(q.shape, generator=g).to(dtype)
    dk_out = torch.randn(k.shape, generator=g).to(dtype)
    torch.autograd.backward((q_out, k_out), _to(device, dq_out, dk_out))
    dq_ref, dk_ref = truth(dq_out, dk_out, cos, sin, positions, interleaved, inverse=True)
    _check_close(qd.grad.cpu(), dq_ref, dq_out, dtype, "dq")
    _check_close(kd.grad.cpu(), dk_ref, dk_out, dtype, "dk")


def test_reference_backward_is_autograd_of_the_forward():
    """The inverse rotation is the true gradient: fp64 autograd through the reference's forward."""
    for case in CASES[:5]:
        for interleaved in (False, True):
            q, k, cos, sin, positions = make(case, torch.float64)
            q.requires_grad_(True)
            k.requires_grad_(True)
            q_out, k_out = truth(q, k, cos, sin, positions, interleaved)
            dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
            dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))
            dq2, dk2 = truth(dq_out, dk_out, cos, sin, positions, interleaved, inverse=True)
            torch.testing.assert_close(dq, dq2, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(dk, dk2, rtol=1e-12, atol=1e-12)


def test_gradcheck_fp64():
    q, k, cos, sin, positions = make(CASES[2], torch.float64)
    q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    torch.autograd.gradcheck(lambda a, b: ops.rotary(a, b, cos.double(), sin.double(), positions), (q, k))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fp64(backend):
    """fp64 inputs (gradcheck's) on the backends that take them: the fp64 truth itself."""
    q, k, cos, sin, positions = make(CASES[2], torch.float64)
    backend_rows.require("rotary", backend, _problem(q, cos))
    q_out, k_out = ops.rotary(q, k, cos.double(), sin.double(), positions, True, backend=backend)
    q_ref, k_ref = truth(q, k, cos, sin, positions, True)
    torch.testing.assert_close(q_out, q_ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(k_out, k_ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", ROWS)
def test_nan_in_gives_nan_out_only_in_its_pair(backend, device, dtype, cpu_isa):
    case = CASES[0]
    q, k, cos, sin, positions = make(case, dtype)
    backend_rows.require("rotary", backend, _problem(q.to(device), cos))
    q[1, 2, 3, 5] = float("nan")  # channel 5 pairs with 13 (half-split) and with 4 (interleaved)
    for interleaved, partner in ((False, 13), (True, 4)):
        q_out, _ = ops.rotary(*_to(device, q, k, cos, sin, positions), interleaved, backend=backend)
        bad = torch.isnan(q_out.cpu())
        assert bad[1, 2, 3, 5] and bad[1, 2, 3, partner]
        assert bad.sum() == 2


@pytest.mark.parametrize("backend,device", backend_rows.rows("rotary"))
def test_empty(backend, device):
    q = torch.randn(0, 2, 3, 8, device=device)
    cos, sin, _ = ops.rotary_tables(8, 4)
    backend_rows.require("rotary", backend, _problem(q, cos))
    q_out, k_out = ops.rotary(q, torch.randn(0, 1, 3, 8, device=device), *_to(device, cos, sin), backend=backend)
    assert q_out.shape == (0, 2, 3, 8) and k_out.shape == (0, 1, 3, 8)
    q_out, _ = ops.rotary(*_to(device, torch.randn(2, 2, 0, 8), torch.randn(2, 1, 0, 8), cos, sin), backend=backend)
    assert q_out.shape == (2, 2, 0, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_beats_the_same_computation_in_the_dtype(dtype):
    """transformers' formula in the dtype (cos and sin rounded to it, three roundings) is
    further from the truth than ours: the bound above is the stricter one."""
    case = CASES[0]
    q, k, cos, sin, positions = make(case, dtype, seed=5)
    q_ref, _ = truth(q, k, cos, sin, positions, False)
    c = torch.cat((cos, cos), -1)[: case.seqlen].to(dtype)
    s = torch.cat((sin, sin), -1)[: case.seqlen].to(dtype)
    half = case.rot // 2
    eager = q * c + torch.cat((-q[..., half:], q[..., :half]), -1) * s
    ours, _ = ops.rotary(q, k, cos, sin)
    ours_err = (ours.double() - q_ref).abs().max().item()
    eager_err = (eager.double() - q_ref).abs().max().item()
    assert ours_err <= eager_err


@pytest.mark.parametrize("isa", ["generic", "auto"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_rounds_exactly_as_the_reference(isa, dtype):
    """The CPU kernels do the reference's fp32 operations and round once to nearest even, so
    they give its bits, across the dtype's whole range: subnormal and overflowing results,
    inf, NaN, signed zeros, the largest finite values."""
    g = torch.Generator().manual_seed(2)
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), info.max, -info.max, info.tiny,
                            info.tiny / 8, info.smallest_normal * 0.75, 1.0, info.max * 0.999])
    magnitude = torch.exp(torch.empty(2 * 64 * 64).uniform_(-20, 11.5, generator=g))
    values = torch.cat((special, magnitude * torch.randn(magnitude.shape, generator=g).sign()))
    q = values[: 2 * 64 * 64].to(dtype).reshape(1, 2, 64, 64)
    k = values.flip(0)[: 64 * 64].to(dtype).reshape(1, 1, 64, 64)
    cos, sin, _ = ops.rotary_tables(64, 64, base=100.0)
    _C._set_cpu_isa(isa)
    try:
        for interleaved in (False, True):
            for inverse in (False, True):
                ours = torch.ops.fastarch._rotary(q, k, cos, sin, None, interleaved, inverse)
                ref = ops.rope.reference.rotary_ref(q, k, cos, sin, None, interleaved, inverse)
                for a, b in zip(ours, ref):
                    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    finally:
        _C._set_cpu_isa(backend_rows.DEFAULT_ISA)
