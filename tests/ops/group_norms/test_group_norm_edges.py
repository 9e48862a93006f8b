"""group_norm beyond the numerics table: bad input, NaN, equality with PyTorch's GroupNorm,
the memory format, determinism across thread counts, empty batches, gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import backend_rows  # tests/backend_rows.py
from fastarch import ops
from fastarch.ops.group_norms.layout import is_channels_last, to_3d
from fastarch.ops.group_norms.backends import GroupNormProblem
from group_norm_cases import to_layout, torch_group_norm  # beside this file

CPU_BACKENDS = ["cpu", "cpu-generic", "reference", "triton"]


def select(backend: str, cpu_isa, x: torch.Tensor | None = None, groups: int = 1) -> str:
    """The backend name for ops.group_norm (cpu-generic: the cpu row on the portable kernels);
    skips a row that cannot run here for a reason of this machine."""
    cpu_isa("generic" if backend == "cpu-generic" else backend_rows.DEFAULT_ISA)
    name = backend.removesuffix("-generic")
    if x is not None:
        layout = is_channels_last(x)
        backend_rows.require("group_norm", name, GroupNormProblem.of(to_3d(x, layout), groups, layout))
    return name


# ----------------------------------------------------------------------------- bad input

C = 8


def _args(**changes):
    args = {"x": torch.randn(2, C, 3, 3), "num_groups": 4, "weight": torch.ones(C), "bias": torch.zeros(C),
            "scale": torch.zeros(2, C), "shift": torch.zeros(2, C)}
    args.update(changes)
    return args


BAD = [
    ("groups-not-dividing", _args(num_groups=3), ValueError, r"num_groups \(3\).*C = 8"),
    ("groups-zero", _args(num_groups=0), ValueError, "num_groups"),
    ("groups-float", _args(num_groups=2.0), TypeError, "num_groups must be an int"),
    ("x-int", _args(x=torch.ones(2, C, 3, dtype=torch.int32)), TypeError, "x must be float32"),
    ("x-1d", _args(x=torch.randn(C)), ValueError, "at least 2-D"),
    ("x-empty-spatial", _args(x=torch.randn(2, C, 0, 3)), ValueError, "at least one spatial position"),
    ("x-not-tensor", _args(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    ("weight-shape", _args(weight=torch.ones(C + 1)), ValueError, r"weight must have shape \(C,\) = \(8,\)"),
    ("bias-dtype", _args(bias=torch.zeros(C, dtype=torch.float64)), TypeError, "bias must have x's dtype"),
    ("scale-shape", _args(scale=torch.zeros(C)), ValueError, r"scale must have shape \(N, C\) = \(2, 8\)"),
    ("shift-shape", _args(shift=torch.zeros(3, C)), ValueError, r"shift must have shape \(N, C\)"),
    ("shift-device", _args(shift=torch.zeros(2, C, device="meta")), ValueError, "shift must be on x's device"),
    ("scale-not-tensor", _args(scale=0.5), TypeError, "scale must be a torch.Tensor or None"),
]


@pytest.mark.parametrize("case, args, error, match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(case, args, error, match):
    with pytest.raises(error, match=match):
        ops.group_norm(args.pop("x"), args.pop("num_groups"), **args)


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf")])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        ops.group_norm(torch.randn(2, C, 3), 4, eps=eps)


def test_bad_activation():
    with pytest.raises(ValueError, match="activation must be None or 'silu'"):
        ops.group_norm(torch.randn(2, C, 3), 4, activation="gelu")


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        ops.group_norm(torch.randn(2, C, 3), 4, backend="tpu")


KERNEL_BAD = [
    ("scale", {"scale": torch.zeros(C)}, r"fastarch::_group_norm_fwd \(cpu\): scale must have shape \(N, C\) = \(2, 8\)"),
    ("weight", {"weight": torch.ones(C, 2)}, r"fastarch::_group_norm_fwd \(cpu\): weight must be a contiguous vector of shape \(C,\)"),
    ("groups", {"num_groups": 3}, r"fastarch::_group_norm_fwd \(cpu\): the channel count C = 8 must be a positive multiple of num_groups = 3"),
    ("x", {"x": torch.randn(2, C, 3, 3)}, r"fastarch::_group_norm_fwd \(cpu\): x must be 3-D"),
    ("x-strided", {"x": torch.randn(2, 6, C).transpose(1, 2)}, r"fastarch::_group_norm_fwd \(cpu\): x must be contiguous"),
]


@pytest.mark.parametrize("case, change, match", KERNEL_BAD, ids=[k[0] for k in KERNEL_BAD])
def test_kernel_op_checks_name_the_argument(case, change, match):
    """The C++ kernel op checks its own arguments (torch.ops.fastarch._group_norm_fwd called directly)."""
    args = {"x": torch.randn(2, C, 6), "num_groups": 4, "weight": None, "bias": None, "scale": None, "shift": None,
            "eps": 1e-5, "silu": False, "channels_last": False}
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastarch._group_norm_fwd(*args.values())


# ----------------------------------------------------------------------------- NaN, torch, layout


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_stays_in_its_group(backend, channels_last, cpu_isa):
    """A NaN in one group makes that group's outputs (and gradients) NaN; every other group,
    of this sample and the next, stays finite."""
    x = torch.randn(2, 16, 5, 7)
    x[0, 5, 2, 3] = float("nan")  # group 1 of sample 0 (channels 4..7 with 4 groups)
    x = to_layout(x, channels_last).requires_grad_()
    name = select(backend, cpu_isa, x, 4)
    w = torch.randn(16, requires_grad=True)
    y = ops.group_norm(x, 4, w, torch.randn(16), scale=torch.randn(2, 16), activation="silu", backend=name)
    y.backward(torch.ones_like(y))
    for t in (y, x.grad):
        bad = t[0, 4:8]
        assert torch.isnan(bad).all()
        assert torch.isfinite(t[0, :4]).all() and torch.isfinite(t[0, 8:]).all() and torch.isfinite(t[1]).all()
    assert torch.isnan(w.grad[4:8]).all() and torch.isfinite(w.grad[:4]).all()


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_equals_torch_group_norm_fp32(channels_last, silu):
    """F.group_norm (+ F.silu) in fp32 on a UNet-like shape: within a few fp32 ulps."""
    x = to_layout(torch.randn(2, 128, 16, 16) * 3 + 1, channels_last)
    w, b = torch.randn(128), torch.randn(128)
    ours = ops.group_norm(x, 32, w, b, 1e-6, activation="silu" if silu else None)
    theirs = F.group_norm(x, 32, w, b, 1e-6)
    theirs = F.silu(theirs) if silu else theirs
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt, shape", [(torch.channels_last, (2, 32, 6, 5)), (torch.channels_last_3d, (2, 32, 3, 4, 5))])
def test_channels_last_output_keeps_its_memory_format(fmt, shape):
    x = torch.randn(shape).to(memory_format=fmt).requires_grad_()
    y = ops.group_norm(x, 8, activation="silu")
    assert y.is_contiguous(memory_format=fmt) and y.stride() == x.stride()
    y.backward(torch.randn(shape))  # a contiguous dy: brought to x's layout
    assert x.grad.is_contiguous(memory_format=fmt)
    ref = torch_group_norm(x.detach().contiguous(), 8, activation="silu")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_other_layouts_are_copied_to_contiguous():
    """A layout that is neither (a transposed spatial view) gives the contiguous result."""
    x = torch.randn(2, 16, 7, 5).transpose(2, 3)
    y = ops.group_norm(x, 4)
    assert y.is_contiguous()
    torch.testing.assert_close(y, F.group_norm(x.contiguous(), 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend, cpu_isa):
    x = torch.randn(0, 8, 3, 3, requires_grad=True)
    name = select(backend, cpu_isa, x, 4)
    w = torch.ones(8, requires_grad=True)
    y = ops.group_norm(x, 4, w, scale=torch.zeros(0, 8), backend=name)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("isa", ["auto", "generic", "avx2"])
def test_deterministic_across_thread_counts(isa, channels_last, dtype, cpu_isa):
    """32 groups split over several work items: the same bits with 1, 2 and 16 threads, forward
    and every gradient (fixed items and a fixed combining order, no atomics). With 1 and 2
    threads the CPU kernels run unit by unit: NCHW one sample's groups, NHWC four samples (the
    forward pipelined, the next unit's statistics with this unit's output; a bf16 backward keeps
    dz in a per-thread buffer); 16 threads have too few units each and run phase by phase over
    the tensor (bf16 recomputes dz): the schedules must agree."""
    cpu_isa(isa)
    shape = (4, 64, 24, 24) if channels_last else (1, 64, 48, 48)  # (NHWC: 3 tiles a sample, the last shorter)
    x = to_layout(torch.randn(shape, dtype=dtype), channels_last).requires_grad_()
    n = shape[0]
    params = [torch.randn(*s, dtype=dtype, requires_grad=True) for s in ((64,), (64,), (n, 64), (n, 64))]
    dy = torch.randn(shape, dtype=dtype)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 16):
            torch.set_num_threads(n)
            y = ops.group_norm(x, 32, params[0], params[1], scale=params[2], shift=params[3], activation="silu",
                               backend="cpu")
            results.append([y.detach(), *torch.autograd.grad(y, [x, *params], dy)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpu", "cpu-generic", "reference"])
def test_gradcheck_fp64(backend, cpu_isa):
    name = select(backend, cpu_isa)
    g = torch.Generator().manual_seed(1)
    x = to_layout(torch.randn(2, 6, 3, 5, generator=g, dtype=torch.float64), True).requires_grad_()
    tensors = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((6,), (6,), (2, 6), (2, 6))]
    assert torch.autograd.gradcheck(
        lambda x, w, b, sc, sh: ops.group_norm(x, 3, w, b, scale=sc, shift=sh, activation="silu", backend=name),
        (x, *tensors),
    )
