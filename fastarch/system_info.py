"""fastarch.info(): versions, and for every op which backends can run here and why the others cannot."""

from __future__ import annotations

import os
import platform

import torch

from fastarch import _extension, availability, registry

# build_info()["cpu_int8_products"] in words (csrc/cpu/isa.h, Int8Products)
_INT8_PRODUCTS = {
    "avx512_vnni": "vpdpbusd (AVX512-VNNI)",
    "avx_vnni": "vpdpbusd on ymm (AVX-VNNI)",
    "avx2": "vpmaddubsw (AVX2)",
    "exact": "exact kernels on the rounded x",
}


def report() -> str:
    """The text that info() prints."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    build = _extension.build_info()
    if _extension.LOAD_ERROR:
        extension = _extension.LOAD_ERROR
    else:
        cuda = f"compiled in for {build.get('cuda_archs')}" if build.get("cuda") else "not compiled"
        extension = (
            f"loaded; CUDA kernels {cuda}; CPU kernels compiled: {', '.join(build.get('cpu_kernels', []))},"
            f" running {_extension.cpu_path()} (auto: {build.get('cpu_isa_auto')})"
        )
        amx = build.get("cpu_amx_missing")
        extension += f"; AMX: {'yes' if build.get('cpu_has_amx') else amx}"
        tiles = "brgemm" if build.get("cpu_attention_brgemm") else "AVX-512 register tiles"
        if build.get("cpu_attention_brgemm_fp32"):
            tiles += ", fp32 and fp16 through brgemm too"
        if build.get("cpu_brgemm_check") not in (None, "passed", "not run"):
            tiles += f" ({build['cpu_brgemm_check']})"
        extension += f"; bf16 attention forward and backward: {tiles} (FASTARCH_CPU_BRGEMM={build.get('cpu_brgemm')})"
        extension += f"; int8 products of quantized layers: {_INT8_PRODUCTS.get(build.get('cpu_int8_products'), '?')}"
    env = os.environ.get("FASTARCH_BACKEND")
    lines = [
        f"fastarch {__import__('fastarch').__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}",
        f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'};"
        f" CPU: {availability.cpu_name()}, {torch.get_num_threads()} threads",
        f"extension fastarch._C: {extension}",
        f"forced backend: {registry.requested_backend() or 'none (automatic)'}" + (f" (FASTARCH_BACKEND={env})" if env else ""),
        "",
        f"{'op':<16} {'backend':<10} status",
    ]
    for op in registry.ops():
        for b in registry.backends_of(op):
            why = b.available()
            lines.append(f"{op:<16} {b.name:<10} {'available' if why is None else 'unavailable: ' + why}")
    return "\n".join(lines)


def info() -> None:
    """Print versions, the extension's build, and each op's backends with why any is missing."""
    print(report())
