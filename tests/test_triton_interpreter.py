"""tests/triton_interpreter.py (the shortcut conftest.py installs in Triton's CPU interpreter)
leaves what the kernels compute unchanged: each kernel family's Triton forward and backward,
with helpers called in their loops, gives the same bits with the shortcut on and off."""

from __future__ import annotations

import os

import pytest
import torch

import triton_interpreter
from fastarch import ops

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _runs():
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    def group_norm():
        x, w, b, scale = (randn(*shape, dtype=torch.bfloat16) for shape in ((2, 8, 5, 3), (8,), (8,), (2, 8)))
        y = ops.group_norm(x, 4, w, b, scale=scale, activation="silu", backend="triton")
        return [y, *torch.autograd.grad(y.float().square().sum(), (x, w, b, scale))]

    def attention():
        q, k, v = (randn(1, 2, s, 16, dtype=torch.float16) for s in (37, 70, 70))
        out = ops.attention(q, k, v, causal=True, window=(9, -1), backend="triton")
        return [out, *torch.autograd.grad(out.float().square().sum(), (q, k, v))]

    def layer_norm():
        x, res, w = (randn(*shape, dtype=torch.bfloat16) for shape in ((7, 300), (7, 300), (300,)))
        y, out = ops.add_layer_norm(x, res, w, backend="triton")
        return [y, out, *torch.autograd.grad(y.float().square().sum(), (x, res, w))]

    return {"group_norm": group_norm, "attention": attention, "layer_norm": layer_norm}


@pytest.mark.parametrize("kernel", list(_runs()))
def test_same_bits_with_and_without_the_shortcut(kernel):
    if not INTERPRETED:  # Triton compiles for the GPU: nothing to speed up, nothing installed
        assert not triton_interpreter.installed()
        return
    assert triton_interpreter.installed(), "conftest.py installs it in the interpreter"
    run = _runs()[kernel]
    fast = run()
    triton_interpreter.set_enabled(False)
    try:
        slow = _runs()[kernel]()
    finally:
        triton_interpreter.set_enabled(True)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)
