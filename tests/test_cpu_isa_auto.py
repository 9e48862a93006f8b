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

# Each: the op on the "cpu" backend, and the levels whose kernels round differently from the
# portable ones (reductions: another summation order), so that running the portable kernels
# there shows as different bits. The norms' portable kernels sum in the same order in their
# baseline and AVX2 builds (32 fixed lanes, no implicit FMA): the same bits at level avx2, so
# there only which build with_portable_build picks can be checked (_cpu_portable_avx2).
AVX512 = frozenset(("avx512", "avx512_bf16", "amx"))
ABOVE_GENERIC = AVX512 | {"avx2"}
CASES = {
    "layer_norm": (lambda: ops.layer_norm(X2, W, W, backend="cpu"), AVX512),
    "rms_norm": (lambda: ops.rms_norm(X2, W, backend="cpu"), AVX512),
    "group_norm": (lambda: ops.group_norm(X4, 8, activation="silu", backend="cpu"), ABOVE_GENERIC),
    "attention": (lambda: ops.attention(Q, K, V, causal=True, backend="cpu"), ABOVE_GENERIC),
    "bias_gelu": (lambda: ops.bias_gelu(X2, W, backend="cpu"), frozenset()),
    "geglu": (lambda: ops.geglu(GATE, UP, backend="cpu"), frozenset()),
    "swiglu": (lambda: ops.swiglu(GATE, UP, backend="cpu"), frozenset()),
    "rotary": (lambda: ops.rotary(Q.float(), K.float(), COS, SIN, backend="cpu")[0], frozenset()),
}


@pytest.mark.parametrize("name", list(CASES))
def test_auto_runs_the_automatic_level(name):
    if _C is None:
        pytest.skip("the C++ extension did not load")
    run, differs = CASES[name]
    best = build_info()["cpu_isa_auto"]
    try:
        _C._set_cpu_isa("auto")
        auto = run()
        portable_avx2 = _C._cpu_portable_avx2()
        _C._set_cpu_isa(best)
        forced = run()
        _C._set_cpu_isa("generic")
        portable = run()
    finally:
        _C._set_cpu_isa(backend_rows.DEFAULT_ISA)
    assert torch.equal(auto, forced), f"{name}: auto differs from forcing its own level {best}"
    if best in differs:
        assert not torch.equal(auto, portable), f"{name}: auto ({best}) gives the portable kernels' bits"
    assert portable_avx2 is (best != "generic" and "avx2" in build_info()["cpu_kernels"])
