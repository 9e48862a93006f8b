"""Numerics of group_norm, every backend, against an fp64 computation (group_norm_cases.py):
dtypes x layouts (NCHW, channels-last; 0 to 3 spatial dims) x group counts (1, 32, C) x odd
sizes x which of weight/bias/scale/shift/silu are given; forward and every gradient."""

from __future__ import annotations

import pytest
import torch

import backend_rows  # tests/backend_rows.py
from fastarch import ops
from fastarch.ops.group_norms.layout import is_channels_last, to_3d
from fastarch.ops.group_norms.backends import GroupNormProblem
from group_norm_cases import (  # beside this file
    FORWARD_FACTOR,
    GRAD_FACTOR,
    OPTIONS,
    assert_close_to_reference,
    make_inputs,
    run_with_grads,
    to_layout,
    torch_group_norm,
)

HAS_CUDA = torch.cuda.is_available()
GPU = pytest.mark.gpu
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

# (shape, num_groups): odd spatial sizes (tails of the 16-lane vectors), G = 1, 32 and C,
# 1-D and 3-D spatial, no spatial dims, a single position.
SMALL = [
    ((2, 64, 7, 9), 32),
    ((1, 32, 5, 3), 1),
    ((3, 12, 11), 12),
    ((2, 16, 3, 5, 7), 4),
    ((2, 24), 6),
    ((2, 40, 1, 1), 40),
]
# Bigger than one work item of the CPU kernels (16K elements): a group split over several
# items, combined; one sample, 32 groups, as a UNet at batch 1; 16 one-channel groups of two
# items each (16384 and 516 positions), which the CPU runs group by group, its forward
# pipelined (each group's items paired with the next group's); 4 samples of 3 tiles each, which
# channels-last runs sample by sample on 1 or 2 threads, pipelined the same way.
LARGE = SMALL + [((1, 8, 67, 257), 2), ((1, 64, 33, 17), 32), ((2, 8, 130, 130), 8), ((4, 64, 24, 24), 32)]
BACKENDS = [
    pytest.param(("cpu", "cpu", "auto", LARGE), id="cpu"),
    pytest.param(("cpu", "cpu", "generic", LARGE), id="cpu-generic"),
    pytest.param(("cpu", "cpu", "avx2", LARGE), id="cpu-avx2"),
    pytest.param(("reference", "cpu", "auto", SMALL), id="reference"),
    pytest.param(("triton", TRITON_DEVICE, "auto", SMALL[:3]), id="triton"),
    pytest.param(("cuda", "cuda", "auto", LARGE), id="cuda", marks=GPU),
]
DTYPES = {"cpu": [torch.float32, torch.float16, torch.bfloat16, torch.float64],
          "reference": [torch.float32, torch.float64],
          "triton": [torch.float32, torch.bfloat16], "cuda": [torch.float32, torch.float16, torch.bfloat16]}


def _cases():
    for b in BACKENDS:
        backend, device, isa, shapes = b.values[0]
        for shape, groups in shapes:
            for channels_last in (False, True):
                if channels_last and len(shape) == 2:
                    continue  # (N, C): one layout
                # every option set on the first shapes, the richest ones on the rest (time)
                options = list(OPTIONS) if shape == shapes[0][0] else ["plain", "all"]
                for j, opt in enumerate(options):
                    for i, dtype in enumerate(DTYPES[backend]):
                        # Triton's interpreter: half, each (option, layout) in one of its two dtypes
                        if not backend_rows.interpreter_keeps(backend, device, i, j, channels_last, n=2):
                            continue
                        layout = "nhwc" if channels_last else "nchw"
                        yield pytest.param(
                            backend, device, isa, shape, groups, channels_last, opt, dtype, marks=b.marks,
                            id=f"{b.id}-{'x'.join(map(str, shape))}-g{groups}-{layout}-{opt}-{str(dtype)[6:]}",
                        )


@pytest.mark.parametrize("backend,device,isa,shape,groups,channels_last,options,dtype", list(_cases()))
def test_forward_and_backward(backend, device, isa, shape, groups, channels_last, options, dtype, cpu_isa):
    cpu_isa(isa)
    x, tensors, silu = make_inputs(shape, OPTIONS[options], dtype, device, channels_last)
    layout = is_channels_last(x)
    backend_rows.require("group_norm", backend, GroupNormProblem.of(to_3d(x, layout), groups, layout))
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)
    to64 = {k: v.double() if v is not None else None for k, v in tensors.items()}
    ref = run_with_grads(torch_group_norm, x.double(), groups, to64, silu, dy)
    theirs = run_with_grads(torch_group_norm, x, groups, tensors, silu, dy.to(dtype))

    def ours_fn(*args, **kwargs):
        return ops.group_norm(*args, **kwargs, backend=backend)

    ours = run_with_grads(ours_fn, x, groups, tensors, silu, to_layout(dy.to(dtype), channels_last))
    assert set(ours) == set(ref)
    for name in ref:
        factor = FORWARD_FACTOR if name == "y" else GRAD_FACTOR
        assert_close_to_reference(name, ours[name], theirs[name], ref[name], dtype, factor)
    fmt = torch.channels_last if channels_last and len(shape) == 4 else None
    for name in ("y", "dx"):  # the memory format of x, no layout copy
        assert ours[name].stride() == x.stride() or x.dim() == 2 or ours[name].numel() <= 1, (
            f"{name} strides {ours[name].stride()} != x's {x.stride()}"
        )
        if fmt is not None:
            assert ours[name].is_contiguous(memory_format=fmt)
