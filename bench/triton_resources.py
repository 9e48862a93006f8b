"""Registers, stack (spills) and shared memory of the Triton norm kernels, compiled for a GPU
that need not be present (Triton's own ptxas and cuobjdump, target sm_90 by default).

    TRITON_INTERPRET= python bench/triton_resources.py [--arch 90]

A kernel whose STACK is not 0 spills registers to local memory. What a GPU costs nothing to
learn: run it before spending device time on a Triton kernel change.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1 (the interpreter has no compiler)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastarch.kernels import norms  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TYPES = {"bf16": "*bf16", "fp32": "*fp32"}


def resources(fn, signature: dict, constexprs: dict, num_warps: int, arch: int) -> str:
    """cuobjdump's resource line (REG, STACK, SHARED, ...) of fn compiled for sm_<arch>."""
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = next((line for line in out.splitlines() if "REG:" in line), "")
    return " ".join(f for f in line.split() if f.split(":")[0] in ("REG", "STACK", "SHARED", "LOCAL"))


def norm_backward_rows(arch: int) -> None:
    """The register-resident backward at every tile norm_backward launches."""
    for block_n in (16, 128, 512, 1024, 2048, 4096, 8192):
        block_m = max(1, min(16, 2048 // block_n))
        for dtype, t in TYPES.items():
            sig = {"DY": t, "DRES": t, "XIN": t, "W": t, "MEAN": "*fp32", "RSTD": "*fp32", "DX": t, "DW_PART": "*fp32",
                   "DB_PART": "*fp32", "stride_dy": "i32", "stride_dres": "i32", "stride_x": "i32", "M": "i32",
                   "N": "i32", "rows_per_program": "i32"}
            flags = dict(HAS_DRES=False, HAS_WEIGHT=True, IS_RMS=False, WEIGHT_GRADS=True, ROUND_BY_HAND=False,
                         BLOCK_M=block_m, BLOCK_N=block_n)
            sig.update({name: "constexpr" for name in flags})
            warps = norms._num_warps(block_m * block_n)
            usage = resources(norms._norm_bwd_kernel, sig, flags, warps, arch)
            print(f"norm backward  {dtype:4}  tile {block_m:2} x {block_n:5}  warps {warps:2}  {usage}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: Hopper)")
    norm_backward_rows(p.parse_args().arch)


if __name__ == "__main__":
    main()
