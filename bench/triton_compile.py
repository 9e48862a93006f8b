"""Compiles every Triton kernel as the ops launch it, for a GPU that need not be present.

    TRITON_INTERPRET= python bench/triton_compile.py [--arch 90] [--only attention,norms,...]

Each op family runs on small CPU tensors with backend="triton", its launches caught instead of
run (their outputs are left unwritten): every kernel with the argument types and constexprs of
that launch (dtypes, flags, autotuner entries) is compiled by Triton for sm_<arch>. Catches what
Triton's interpreter cannot: code its compiler refuses, and changes of the language between
Triton releases (run it under the Triton a GPU machine has), and a global a kernel reads whose
value does not equal itself (a constexpr NaN: Triton compares each launch's globals with the
first compile's and refuses the launch). Without a GPU it costs nothing;
run it before spending device time. Prints one line per compiled variant, then a summary;
exits 1 if any variant failed to compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import inspect
import multiprocessing
import os
import pkgutil
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1 (the interpreter has no compiler)")

os.environ["FASTARCH_TRITON_OPS"] = "1"  # the kernels as torch ops, as on a GPU (fastarch.availability)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fastarch  # noqa: E402
import fastarch.kernels.launch  # noqa: E402
from fastarch import availability, ops, registry  # noqa: E402

POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                 torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}
ALIGNED = [["tt.divisibility", 16]]

LAUNCHES: list[tuple[JITFunction | Autotuner, tuple, dict]] = []


class _Caught:
    """What a kernel module's wrap_triton(kernel) gives here: kernel[grid](...) is recorded."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            LAUNCHES.append((self.kernel, args, kwargs))

        return launch


def _catch_launches() -> None:
    """Every kernel module's launches recorded; the Triton backends take CPU tensors."""
    original = fastarch.kernels.launch.wrap_triton
    for name, module in list(sys.modules.items()):
        if name.startswith("fastarch.kernels.") and getattr(module, "wrap_triton", None) is original:
            module.wrap_triton = _Caught
    availability.triton_device_reason = lambda device: None
    for op in registry.ops():
        registry._REGISTRY[op] = [dataclasses.replace(b, available=lambda: None) if b.name == "triton" else b
                                  for b in registry.backends_of(op)]
    registry.clear_choices()


def _signature(jit: JITFunction, args: tuple, kwargs: dict, config) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of one launch, as Triton's launcher would make
    them: tensors are pointers (16-byte aligned where their address is), integers i32 or i64
    (16-divisible ones marked, as Triton specializes them), None and constexpr parameters
    constants."""
    params = inspect.signature(jit.fn).parameters
    names = list(params)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(names, args)) | kwargs
    if config is not None:
        values |= config.kwargs
        options |= dict(num_warps=config.num_warps, num_stages=config.num_stages)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name not in values:
            default = params[name].default
            if default is inspect.Parameter.empty:
                raise TypeError(f"{jit.fn.__name__}: no value for {name}")
            values[name] = default
        value = values[name]
        is_constexpr = "constexpr" in str(params[name].annotation)
        if is_constexpr or value is None:
            signature[name] = "constexpr"
            constexprs[name] = value.value if hasattr(value, "value") and not isinstance(value, torch.Tensor) else value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + POINTER_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = ALIGNED
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and value != 0:
                attrs[(i,)] = ALIGNED
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{jit.fn.__name__}: argument {name} is a {type(value).__name__}")
    return signature, constexprs, attrs, options


def _variants(kernel, args, kwargs, all_tiles: bool):
    """(jit, signature, constexprs, attrs, options) of each variant one launch can compile: of
    an autotuned kernel, the first entry that survives its pruning (the one that runs with
    FASTARCH_TRITON_AUTOTUNE=0), or every one with all_tiles."""
    if isinstance(kernel, Autotuner):
        jit = kernel.fn
        named = dict(zip(inspect.signature(jit.fn).parameters, args))
        configs = kernel.configs
        if kernel.early_config_prune:
            configs = kernel.early_config_prune(configs, named, **kwargs)
        for config in configs if all_tiles else configs[:1]:
            yield (jit, *_signature(jit, args, dict(kwargs), config))
    else:
        yield (kernel, *_signature(kernel, args, dict(kwargs), None))


def _families(only: set[str]):
    g = torch.Generator().manual_seed(0)

    def t(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)

    def backward(y, *inputs):
        y = y[0] if isinstance(y, tuple) else y
        torch.autograd.grad(y, [x for x in inputs if x is not None and x.requires_grad], torch.ones_like(y),
                            allow_unused=True)

    def norms(dtype):
        for rows, cols in ((64, 768), (4, 16384)):  # the register-resident and the looped kernels
            x, r = t(rows, cols, dtype=dtype, grad=True), t(rows, cols, dtype=dtype, grad=True)
            w, b = t(cols, dtype=dtype, grad=True), t(cols, dtype=dtype, grad=True)
            backward(ops.layer_norm(x, w, b, backend="triton"), x, w, b)
            backward(ops.rms_norm(x, w, backend="triton"), x, w)
            backward(ops.add_layer_norm(x, r, w, b, backend="triton"), x, r, w, b)
            backward(ops.add_rms_norm(x, r, None, backend="triton"), x, r)

    def activations(dtype):
        x, bias = t(64, 512, dtype=dtype, grad=True), t(512, dtype=dtype, grad=True)
        gate, up = t(64, 512, dtype=dtype, grad=True), t(64, 512, dtype=dtype, grad=True)
        for approximate in ("none", "tanh"):
            backward(ops.bias_gelu(x, bias, approximate, backend="triton"), x, bias)
        backward(ops.bias_gelu(x, None, backend="triton"), x)
        backward(ops.swiglu(gate, up, backend="triton"), gate, up)
        backward(ops.geglu(gate, up, backend="triton"), gate, up)
        proj = t(64, 1024, dtype=dtype, grad=True)
        backward(ops.geglu_packed(proj, backend="triton"), proj)

    def group_norm(dtype):
        for layout in (torch.contiguous_format, torch.channels_last):
            x = t(2, 64, 8, 8, dtype=dtype).to(memory_format=layout).requires_grad_(True)
            w, b = t(64, dtype=dtype, grad=True), t(64, dtype=dtype, grad=True)
            scale, shift = t(2, 64, dtype=dtype, grad=True), t(2, 64, dtype=dtype, grad=True)
            backward(ops.group_norm(x, 32, w, b, backend="triton"), x, w, b)
            backward(ops.group_norm(x, 32, w, b, scale=scale, shift=shift, activation="silu", backend="triton"),
                     x, w, b, scale, shift)

    def rotary(dtype):
        q, k = t(2, 4, 16, 64, dtype=dtype, grad=True), t(2, 2, 16, 64, dtype=dtype, grad=True)  # (B, H, S, D)
        cos, sin = t(64, 32), t(64, 32)
        backward(ops.rotary(q, k, cos, sin, backend="triton"), q, k)
        backward(ops.rotary(q, k, cos, sin, torch.tensor([3, 7]), interleaved=True, backend="triton"), q, k)
        backward(ops.rotary(q, k, cos[:, :16], sin[:, :16], backend="triton"), q, k)  # partial rotary

    def linear(dtype):
        for rows in (1, 4, 16):
            ops.linear(t(rows, 512, dtype=dtype), t(256, 512, dtype=dtype), t(256, dtype=dtype), backend="triton")
            ops.linear(t(rows, 512, dtype=dtype), t(256, 512, dtype=dtype), None, backend="triton")

    def quantized_linear(dtype):
        from fastarch.ops.qlinear import QUANTS, quantize_blocks

        for quant in QUANTS:
            blocks = quantize_blocks(t(256, 512), quant)
            for rows in (1, 16):
                ops.quantized_linear(t(rows, 512, dtype=dtype), blocks, quant, t(256, dtype=dtype), backend="triton")
            ops.quantized_linear(t(1, 512, dtype=dtype), blocks, quant, None, backend="triton")

    def attention(dtype):
        for d in (64, 128):
            q, k, v = (t(2, 4, 128, d, dtype=dtype, grad=True) for _ in range(3))
            for kwargs in (dict(causal=False), dict(causal=True), dict(causal=True, window=(32, 0)),
                           dict(key_padding_mask=torch.rand(2, 128, generator=g) > 0.2),
                           dict(attn_mask=t(128, 128, dtype=dtype)), dict(dropout_p=0.1, generator=torch.Generator().manual_seed(1))):
                backward(ops.attention(q, k, v, **kwargs, backend="triton"), q, k, v)
            kg, vg = t(2, 2, 128, d, dtype=dtype, grad=True), t(2, 2, 128, d, dtype=dtype, grad=True)
            backward(ops.attention(q, kg, vg, causal=True, backend="triton"), q, kg, vg)  # grouped-query
            packed = [t(200, 4, d, dtype=dtype, grad=True) for _ in range(3)]
            cu = torch.tensor([0, 72, 200], dtype=torch.int32)
            backward(ops.attention(*packed, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=128,
                                   max_seqlen_k=128, backend="triton"), *packed)
            kc, vc = t(2, 2, 256, d, dtype=dtype), t(2, 2, 256, d, dtype=dtype)
            lens = torch.tensor([100, 37], dtype=torch.int32)
            ops.append_kv(kc, vc, t(2, 2, 1, d, dtype=dtype), t(2, 2, 1, d, dtype=dtype), lens, backend="triton")
            for sq in (1, 4):
                ops.attention_decode(t(2, 4, sq, d, dtype=dtype), kc, vc, lens, backend="triton")
            ops.attention_decode(t(2, 4, 1, d, dtype=dtype), kc, vc, lens, window=64, backend="triton")

    table = dict(norms=norms, activations=activations, group_norm=group_norm, rotary=rotary, linear=linear,
                 quantized_linear=quantized_linear, attention=attention)
    for name, run in table.items():
        if not only or name in only:
            yield name, run


def _unstable_globals() -> list[str]:
    """Every kernel of fastarch.kernels whose globals would fail Triton's check at each launch
    (JITFunction.run: each global the kernel and its callees read must equal its value at the
    first compile; cache_key records them, as the first launch does)."""
    import fastarch.kernels as package

    failed = []
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and value.__module__ == module.__name__:
                value.cache_key  # noqa: B018 (collects used_global_vals)
                for (var, _), (first, scope) in value.used_global_vals.items():
                    if scope.get(var) != first:
                        failed.append(f"{module.__name__}.{name} reads the global {var} = {first}, which does not"
                                      f" equal itself: Triton refuses its launches on a GPU")
    return failed


VARIANTS: list[tuple] = []  # (description, jit, signature, constexprs, attrs, options), for the workers


def _compile(index: int, arch: int) -> str | None:
    """Compiles VARIANTS[index] (in a forked worker); None, or why it failed."""
    _, jit, signature, constexprs, attrs, options = VARIANTS[index]
    try:
        src = ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs)
        triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:
        return f"{type(e).__name__}: {e}"[-2000:]
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: Hopper)")
    p.add_argument("--only", default="", help="comma-separated families: norms, activations, group_norm, rotary, "
                                              "linear, quantized_linear, attention")
    p.add_argument("--dtypes", default="fp32,bf16,fp16")
    p.add_argument("--all-tiles", action="store_true", help="every autotuner entry, not the first")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiles at once (default: every CPU)")
    args = p.parse_args()
    dtypes = [{"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[d] for d in args.dtypes.split(",")]
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}", flush=True)
    _catch_launches()
    failed, seen = _unstable_globals(), set()
    for line in failed:
        print(f"FAILED {line}", flush=True)
    start = time.perf_counter()
    for family, run in _families(set(filter(None, args.only.split(",")))):
        for dtype in dtypes:
            LAUNCHES.clear()
            try:
                run(dtype)
            except Exception as e:  # a launcher that fails before its launch
                failed.append(f"{family} {dtype}: the launcher raised {type(e).__name__}: {e}")
                continue
            for kernel, call_args, call_kwargs in LAUNCHES:
                for jit, signature, constexprs, attrs, options in _variants(kernel, call_args, call_kwargs,
                                                                            args.all_tiles):
                    key = (jit.fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items(), key=str)),
                           tuple(sorted(attrs)), tuple(sorted(options.items())))
                    if key not in seen:
                        seen.add(key)
                        flags = " ".join(f"{k}={v}" for k, v in constexprs.items() if v is not None)
                        what = f"{family:11} {jit.fn.__name__:24} {str(dtype)[6:]:8} {options} {flags}"
                        VARIANTS.append((what, jit, signature, constexprs, attrs, options))
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
        for (what, *_), error in zip(VARIANTS, pool.imap(functools.partial(_compile, arch=args.arch),
                                                          range(len(VARIANTS)))):
            print(f"{'ok' if error is None else 'FAILED':6} {what}" + (f"\n{error}" if error else ""), flush=True)
            if error:
                failed.append(f"{what}: {error.strip().splitlines()[-1] if error.strip() else ''}")
    print(f"\n{len(VARIANTS)} kernel variants for sm_{args.arch} in {time.perf_counter() - start:.0f} s; "
          f"{len(failed)} failed")
    for line in failed:
        print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
