"""Registers, spills (stack), shared memory and matrix instructions of the Triton kernels,
compiled for a GPU that need not be present (Triton's own ptxas and cuobjdump; sm_90 by
default), with the alignment a real launch gives (16-byte pointers and strides).

    TRITON_INTERPRET= python bench/triton_resources.py [--arch 90] [--only norms|attention]

A kernel whose STACK is not 0 spills registers to local memory; HGMMA counts Hopper's wgmma,
HMMA mma.sync, LDGSTS cp.async (loads pipelined through shared memory). What a GPU costs
nothing to learn: run it before spending device time on a Triton kernel change.
"""

from __future__ import annotations

import argparse
import inspect
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
from fastarch.kernels.attn import backward, decode, forward  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ALIGNED = [["tt.divisibility", 16]]


def resources(jit, pointers: dict[str, str], constexprs: dict, num_warps: int, num_stages: int, arch: int,
              floats=()) -> str:
    """The compiled kernel's resources. Parameters named in pointers are pointers of that type
    (16-byte aligned), in floats fp32, in constexprs constants; the rest are int32, those named
    stride_* divisible by 16."""
    signature, attrs = {}, {}
    for i, name in enumerate(inspect.signature(jit.fn).parameters):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name], attrs[(i,)] = pointers[name], ALIGNED
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = ALIGNED
    src = ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([f"{BIN}/cuobjdump", "--dump-resource-usage", f.name], capture_output=True, text=True)
        sass = subprocess.run([f"{BIN}/cuobjdump", "--dump-sass", f.name], capture_output=True, text=True).stdout
    line = next((x for x in usage.stdout.splitlines() if "REG:" in x), "")
    fields = " ".join(f for f in line.split() if f.split(":")[0] in ("REG", "STACK"))
    counts = " ".join(f"{op} {sass.count(op)}" for op in ("HGMMA", "HMMA", "LDGSTS"))
    return f"{fields} smem {kernel.metadata.shared} {counts}"


def norm_backward(arch: int) -> None:
    """The register-resident norm backward at every tile norm_backward launches."""
    for block_n in (16, 128, 512, 1024, 2048, 4096, 8192):
        block_m = max(1, min(16, 2048 // block_n))
        for dtype in ("bf16", "fp32"):
            t = f"*{dtype}"
            pointers = dict(DY=t, DRES=t, XIN=t, W=t, MEAN="*fp32", RSTD="*fp32", DX=t, DW_PART="*fp32", DB_PART="*fp32")
            flags = dict(HAS_DRES=False, HAS_WEIGHT=True, HAS_OFFSET=False, IS_RMS=False, WEIGHT_GRADS=True,
                         ROUND_BY_HAND=False, BLOCK_M=block_m, BLOCK_N=block_n)
            warps = norms._num_warps(block_m * block_n)
            usage = resources(norms._norm_bwd_kernel, pointers, flags, warps, 3, arch, floats=("weight_offset",))
            print(f"norm backward  {dtype:4}  tile {block_m:2} x {block_n:5}  warps {warps:2}  {usage}")


def attention_tables(arch: int) -> None:
    """Every entry of the attention kernels' tile tables, bf16, causal, no masks or dropout."""
    t = "*bf16"
    pointers = dict(Q=t, K=t, V=t, MASK=t, KPM="*u8", CU_Q="*i32", CU_K="*i32", OUT=t, LSE="*fp32", DOUT=t, DQ=t,
                    DK=t, DV=t, DELTA="*fp32", SEQLENS="*i32", O_PART="*fp32", LSE_PART="*fp32")
    floats = ("qk_scale", "drop_scale", "scale")
    kernels = [("forward", forward._attn_fwd_kernel, forward._FWD_CONFIGS),
               ("dK/dV", backward._attn_bwd_dkdv_kernel, backward._DKDV_CONFIGS),
               ("dQ", backward._attn_bwd_dq_kernel, backward._DQ_CONFIGS)]
    for name, jit, table in kernels:
        for d, entries in table.items():
            for block_m, block_n, warps, stages in entries:
                flags = dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_D=d, BLOCK_DV=d, VARLEN=False, HAS_LEFT=False,
                             HAS_RIGHT=True, HAS_MASK=False, HAS_KPM=False, DROPOUT=False, PRECISION="tf32",
                             INTERPRET=False, BLOCK_M=block_m, BLOCK_N=block_n)
                usage = resources(jit, pointers, flags, warps, stages, arch, floats)
                print(f"{name:8} d {d:3}  {block_m:3} x {block_n:3}  warps {warps}  stages {stages}  {usage}")
    for d, entries in decode._DECODE_CONFIGS.items():
        for block_n, warps, stages in entries:
            flags = dict(CAUSAL=True, HAS_LEFT=False, DIRECT=False, HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_D=d, BLOCK_DV=d,
                         PRECISION="tf32", INTERPRET=False, BLOCK_M=16, BLOCK_N=block_n)
            usage = resources(decode._decode_split_kernel, pointers, flags, warps, stages, arch, floats)
            print(f"decode   d {d:3}   16 x {block_n:3}  warps {warps}  stages {stages}  {usage}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: Hopper)")
    p.add_argument("--only", choices=["norms", "attention"])
    args = p.parse_args()
    if args.only != "attention":
        norm_backward(args.arch)
    if args.only != "norms":
        attention_tables(args.arch)


if __name__ == "__main__":
    main()
