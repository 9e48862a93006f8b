"""The Triton kernels compile for a Hopper GPU (sm_90) as the ops launch them, without a GPU:
what the interpreter, which runs the kernels' tests here, cannot check (code Triton's compiler
refuses). bench/triton_compile.py does the compiling; here the families but attention (its
compiles take minutes: run the script by hand after changing it), bf16."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "triton_compile.py"


def test_kernels_compile_for_sm90(tmp_path):
    # (a cache of its own: Triton's would answer from earlier compiles of the same source)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "norms,activations,group_norm,rotary,linear,quantized_linear", "--dtypes", "bf16",
         "--jobs", "1"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    compiled = [line for line in out.stdout.splitlines() if line.startswith("ok")]
    kernels = {line.split()[2] for line in compiled}
    assert {"_norm_fwd_kernel", "_norm_bwd_looped_kernel", "_act_fwd_kernel", "_act_bwd_kernel", "_gn_fwd_stats_kernel",
            "_gn_bwd_dx_kernel", "_rotary_kernel", "_linear_kernel", "_qlinear_kernel"} <= kernels, kernels
