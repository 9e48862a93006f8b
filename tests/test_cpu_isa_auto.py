"""Automatic choice of the CPU kernels' instruction-set level: every op family's CPU glue must
run the kernels of the level ``auto`` picks (build_info's cpu_isa_auto), not a lower one. (A
glue that compared the level for equality with one name ran the portable kernels once a higher
level was added above it: its table tests still passed, on the wrong kernels.)"""

from __future__ import annotations

import pytest
import torch

import backend_rows  # tests/backend_rows.py
from fastarch import ops
from fastarch._extension import _C, build_info

gen = torch.Generator().manual_seed(0)


def _randn(*shape):
    return torch.randn(*shape, generator=gen)


X2 = _randn(16, 4096)
W = _randn(4096)
X4 = _randn(2, 64, 33, 17)
Q, K, V = (_randn(1, 2, 200, 64).bfloat16() for _ in range(3))
GATE, UP = _randn(64, 1000), _randn(64, 1000)
COS, SIN, _ = ops.rotary_tables(64, 200)

# Each: the op on the "cpu" backend, and whether its AVX-512 and portable kernels round
# differently (reductions: a different summation order), so that running the portable ones
# shows as different bits.
CASES = {
    "layer_norm": (lambda: ops.layer_norm(X2, W, W, backend="cpu"), True),
    "rms_norm": (lambda: ops.rms_norm(X2, W, backend="cpu"), True),
    "group_norm": (lambda: ops.group_norm(X4, 8, activation="silu", backend="cpu"), True),
    "attention": (lambda: ops.attention(Q, K, V, causal=True, backend="cpu"), True),
    "bias_gelu": (lambda: ops.bias_gelu(X2, W, backend="cpu"), False),
    "geglu": (lambda: ops.geglu(GATE, UP, backend="cpu"), False),
    "swiglu": (lambda: ops.swiglu(GATE, UP, backend="cpu"), False),
    "rotary": (lambda: ops.rotary(Q.float(), K.float(), COS, SIN, backend="cpu")[0], False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_auto_runs_the_automatic_level(name):
    if _C is None:
        pytest.skip("the C++ extension did not load")
    run, reduction = CASES[name]
    best = build_info()["cpu_isa_auto"]
    try:
        _C._set_cpu_isa("auto")
        auto = run()
        _C._set_cpu_isa(best)
        forced = run()
        _C._set_cpu_isa("generic")
        portable = run()
    finally:
        _C._set_cpu_isa(backend_rows.DEFAULT_ISA)
    assert torch.equal(auto, forced), f"{name}: auto differs from forcing its own level {best}"
    if reduction and best != "generic":
        assert not torch.equal(auto, portable), f"{name}: auto ({best}) gives the portable kernels' bits"
