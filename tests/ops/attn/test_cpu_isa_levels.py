"""The instruction-set levels of the CPU kernels (csrc/cpu/isa.h): generic < avx2 < avx512 <
avx512_bf16 < amx, forced with fastarch._C._set_cpu_isa or FASTARCH_CPU_ISA. Each level either
runs here (and then the kernels it selects give the reference's answers and build_info and
the bench label name it) or is refused with the machine's reason, which must agree with what
build_info says the CPU and build have: the test then skips with that reason, never passes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import backend_rows  # tests/backend_rows.py

from fastarch import _extension, ops
from test_attention import compare, make_qkv

_C = _extension._C
pytestmark = pytest.mark.skipif(_C is None, reason=f"fastarch._C is not loaded: {_extension.LOAD_ERROR}")
LEVELS = ["generic", "avx2", "avx512", "avx512_bf16", "amx"]


def _runnable(level: str) -> str | None:
    """None when this CPU and build run ``level``, else why not (from build_info)."""
    info = _C.build_info()
    if level == "generic":
        return None
    if level == "avx2":
        if "avx2" not in info["cpu_kernels"]:
            return "the build has no AVX2 kernels"
        return None if info["cpu_has_avx2"] else "the CPU lacks AVX2, FMA or F16C"
    if "avx512" not in info["cpu_kernels"]:
        return "the build has no AVX-512 kernels"
    if not info["cpu_has_avx512"]:
        return "the CPU lacks AVX-512"
    if level in ("avx512_bf16", "amx") and not info["cpu_has_avx512_bf16"]:
        return "the CPU lacks AVX512-BF16"
    if level == "amx" and not info["cpu_has_amx"]:
        return info["cpu_amx_missing"]
    return None


@pytest.fixture(params=LEVELS)
def level(request):
    why = _runnable(request.param)
    try:
        _C._set_cpu_isa(request.param)
    except ValueError as e:
        assert why is not None, f"{request.param} refused on a CPU and build that have it: {e}"
        assert str(e), "the refusal must say why"
        pytest.skip(f"level {request.param} cannot run here: {e}")
    assert why is None, f"{request.param} accepted although {why}"
    yield request.param
    _C._set_cpu_isa(backend_rows.DEFAULT_ISA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_level_runs_and_is_reported(level, dtype):
    info = _C.build_info()
    assert info["cpu_isa"] == level
    assert _extension.cpu_path("attention", dtype).startswith(f"cpu/{level}")
    if info["cpu_brgemm"] == "auto":  # the bf16 forward through brgemm at level amx only
        assert info["cpu_attention_brgemm"] == (level == "amx")
    q, k, v = make_qkv(1, 2, 1, 77, 150, 64, dtype, "cpu", seed=2)
    compare("cpu", q, k, v, dtype, causal=True)
    x = torch.randn(33, 200, generator=torch.Generator().manual_seed(1)).to(dtype)
    w = torch.randn(200, generator=torch.Generator().manual_seed(2)).to(dtype)
    ours = ops.layer_norm(x, w, None, 1e-5, backend="cpu")
    ref = torch.nn.functional.layer_norm(x.double(), (200,), w.double(), None, 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2 * 2**-8 * ref.abs().max().item()
    assert (ours.double() - ref).abs().max() <= tol


def test_auto_is_the_highest_runnable_level():
    _C._set_cpu_isa("auto")
    try:
        best = [lv for lv in LEVELS if _runnable(lv) is None][-1]
        assert _C.build_info()["cpu_isa"] == best == _C.build_info()["cpu_isa_auto"]
    finally:
        _C._set_cpu_isa(backend_rows.DEFAULT_ISA)


def test_unknown_level_names_the_choices():
    with pytest.raises(ValueError, match="'auto', 'generic', 'avx2', 'avx512', 'avx512_bf16' or 'amx', got 'sse4'"):
        _C._set_cpu_isa("sse4")


def _import_with(env: dict) -> subprocess.CompletedProcess:
    code = "from fastarch import _extension; print(_extension.build_info()['cpu_isa'], _extension.cpu_path('attention'))"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(_extension.__file__)))


def test_environment_switch():
    """FASTARCH_CPU_ISA at import: a level this machine runs is taken (and labelled); the
    highest level it does not run is an error naming the variable, not a silent fallback."""
    runnable = [lv for lv in LEVELS if _runnable(lv) is None]
    low = "avx512" if "avx512" in runnable else "generic"
    done = _import_with({"FASTARCH_CPU_ISA": low, "FASTARCH_CPU_BRGEMM": "auto"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [low, f"cpu/{low}"]
    missing = [lv for lv in LEVELS if lv not in runnable]
    if not missing:
        pytest.skip("this CPU runs every level: no refusal to check")
    done = _import_with({"FASTARCH_CPU_ISA": missing[-1]})
    assert done.returncode != 0 and f"FASTARCH_CPU_ISA='{missing[-1]}'" in done.stderr, done.stderr
