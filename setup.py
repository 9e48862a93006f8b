"""Builds fastarch and its extension fastarch._C.

Environment switches (each "auto" by default):
- FASTARCH_CUDA=0|1: leave out / require the CUDA kernels (auto: built when torch is a CUDA
  build and a CUDA toolkit is found). TORCH_CUDA_ARCH_LIST chooses the GPU architectures
  (default: the visible GPUs' from 8.0 on, else CUDA_DEFAULT_ARCHS); the code compiled is
  recorded in fastarch._C.build_info()["cuda_archs"] ("sm_80;sm_90;compute_90") so that the
  CUDA backends decline a GPU they cannot run on.
- FASTARCH_CPU_AVX512=0|1: leave out / require the AVX-512 CPU kernels (auto: built on x86-64;
  other CPUs get the portable C++ kernels, which are always built).
- FASTARCH_CPU_AVX2=0|1: leave out / require the AVX2 build of the portable kernels (auto: built
  on x86-64; csrc/cpu/portable.h).
- FASTARCH_DEBUG_INFO=1: compile the C++ with debug info (-g; default -g0: Python's own CFLAGS
  carry -g, which costs a third to a half of the C++ compile time and most of the library's size).
- FASTARCH_PCH=0: no precompiled torch headers (_precompiled_torch_headers).
- MAX_JOBS: parallel compile jobs (ninja).

Each family's sources live in csrc/cpu/<family>/ and csrc/cuda/<family>/; a CPU source whose
name ends in _avx512.cpp is an AVX-512 translation unit, one ending in _avx2.cpp the AVX2
build of the portable *_generic.cpp beside it. The CUDA kernels are instantiated per
dtype (and head dim) in small translation units generated here from the CUDA_* lists below,
with a header (cuda_instances.h) that names the same instances to the host code.
"""

import glob
import os
import platform
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
GENERATED = os.path.join("build", "generated")

# The CUDA kernel instances: one translation unit per (direction, dtype[, head dim]).
CUDA_ATTENTION_DTYPES = {"f16": "__half", "bf16": "__nv_bfloat16"}
CUDA_ATTENTION_HEAD_DIMS = (32, 64, 128, 256)
CUDA_NORM_DTYPES = {"f32": "float", "f16": "__half", "bf16": "__nv_bfloat16"}
CUDA_ROPE_DTYPES = {"f32": "float", "f16": "__half", "bf16": "__nv_bfloat16"}
CUDA_ACTIVATION_DTYPES = {"f32": "float", "f16": "__half", "bf16": "__nv_bfloat16"}
CUDA_GROUP_NORM_DTYPES = {"f32": "float", "f16": "__half", "bf16": "__nv_bfloat16"}
# Ampere and Hopper cubins, and Hopper's PTX for newer GPUs (the driver compiles it for them).
CUDA_DEFAULT_ARCHS = "8.0;9.0+PTX"
CUDA_MIN_ARCH = (8, 0)  # bf16 mma.sync, ldmatrix, cp.async


def _switch(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise RuntimeError(f"{name} must be 0, 1 or auto, got {value!r}")
    return value


def _locate_cuda_home() -> str | None:
    """A directory with bin/nvcc and include/cuda_runtime.h, or None.

    torch guesses CUDA_HOME from the nvcc on PATH; when that nvcc is a wrapper script
    (e.g. /usr/local/bin/nvcc) the guess is /usr/local and linking -lcudart fails, so the
    candidates are checked for the files the build needs.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


_cuda_home = _locate_cuda_home()
if _cuda_home and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = _cuda_home  # must be set before cpp_extension is imported

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _build_cuda() -> bool:
    flag = _switch("FASTARCH_CUDA")
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if _cuda_home is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)")
    if flag == "1" and reasons:
        raise RuntimeError("FASTARCH_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
    if flag == "0" or reasons:
        print("fastarch: building the CPU kernels only" + (f" ({'; '.join(reasons)})" if reasons else ""))
        return False
    return True


def _build_x86(switch: str, what: str) -> bool:
    """Whether to build the x86 translation units that ``switch`` (FASTARCH_CPU_AVX512 or
    FASTARCH_CPU_AVX2) controls: on x86-64 unless it is 0."""
    flag = _switch(switch)
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if flag == "1" and not x86:
        raise RuntimeError(f"{switch}=1 but this is a {platform.machine()} machine, not x86-64")
    build = x86 and flag != "0"
    if not build:
        print(f"fastarch: building without the {what}")
    return build


def _cuda_targets() -> str:
    """The GPU code to compile, as the gencode targets torch's build will use ("sm_80;sm_90;
    compute_90": cubins and PTX), which build_info() records: from TORCH_CUDA_ARCH_LIST (any
    syntax torch takes), else the visible GPUs' (torch's own default: each GPU's capability, PTX
    for the newest), else CUDA_DEFAULT_ARCHS. GPUs older than CUDA_MIN_ARCH are left out: the
    kernels use instructions they lack."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    if not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        found = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        usable = sorted(c for c in found if c >= CUDA_MIN_ARCH)
        if found - set(usable):
            print(f"fastarch: no CUDA kernels for the visible GPUs older than {CUDA_MIN_ARCH}: {sorted(found - set(usable))}")
        archs = ";".join(f"{major}.{minor}" for major, minor in usable) + "+PTX" if usable else CUDA_DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    targets = []
    for flag in _get_cuda_arch_flags():  # -gencode=arch=compute_80,code=sm_80
        code = flag.rsplit("code=", 1)[-1]
        if code not in targets:
            targets.append(code)
    old = [t for t in targets if int(t.split("_")[1].rstrip("abf")) < CUDA_MIN_ARCH[0] * 10 + CUDA_MIN_ARCH[1]]
    if old:
        raise RuntimeError(
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} asks for {', '.join(old)}: fastarch's CUDA kernels"
            f" need compute capability {CUDA_MIN_ARCH[0]}.{CUDA_MIN_ARCH[1]} or newer (leave those out)"
        )
    return ";".join(targets)


def _write(path: str, text: str) -> None:
    """Writes only when the text changed, so that an unchanged unit is not rebuilt."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path) and open(path).read() == text:
        return
    with open(path, "w") as f:
        f.write(text)


def _generate_cuda_instances() -> list[str]:
    """The generated translation units (and cuda_instances.h) from the CUDA_* lists."""
    note = "// Generated by setup.py from its CUDA_* lists; do not edit.\n"
    sources = []

    def unit(name: str, body_header: str, defines: dict) -> None:
        lines = [note] + [f"#define {k} {v}\n" for k, v in defines.items()] + [f'#include "{body_header}"\n']
        path = os.path.join(GENERATED, "cuda", name)
        _write(path, "".join(lines))
        sources.append(path)

    for dtype, element in CUDA_ATTENTION_DTYPES.items():
        for hd in CUDA_ATTENTION_HEAD_DIMS:
            defines = {"FASTARCH_DTYPE": dtype, "FASTARCH_ELEMENT": element, "FASTARCH_HEAD_DIM": hd}
            unit(f"attention_fwd_{dtype}_d{hd}.cu", "cuda/attn/attention_fwd_instance.cuh", defines)
            unit(f"attention_bwd_{dtype}_d{hd}.cu", "cuda/attn/attention_bwd_instance.cuh", defines)
    for dtype, element in CUDA_NORM_DTYPES.items():
        defines = {"FASTARCH_DTYPE": dtype, "FASTARCH_ELEMENT": element}
        unit(f"norm_fwd_{dtype}.cu", "cuda/norms/norm_fwd_instance.cuh", defines)
        unit(f"norm_bwd_{dtype}.cu", "cuda/norms/norm_bwd_instance.cuh", defines)
    for dtype, element in CUDA_ROPE_DTYPES.items():
        unit(f"rope_{dtype}.cu", "cuda/rope/rope_instance.cuh", {"FASTARCH_DTYPE": dtype, "FASTARCH_ELEMENT": element})
    for dtype, element in CUDA_ACTIVATION_DTYPES.items():
        defines = {"FASTARCH_DTYPE": dtype, "FASTARCH_ELEMENT": element}
        unit(f"activation_fwd_{dtype}.cu", "cuda/activations/activation_fwd_instance.cuh", defines)
        unit(f"activation_bwd_{dtype}.cu", "cuda/activations/activation_bwd_instance.cuh", defines)
    for dtype, element in CUDA_GROUP_NORM_DTYPES.items():
        defines = {"FASTARCH_DTYPE": dtype, "FASTARCH_ELEMENT": element}
        unit(f"group_norm_fwd_{dtype}.cu", "cuda/group_norms/group_norm_fwd_instance.cuh", defines)
        unit(f"group_norm_bwd_{dtype}.cu", "cuda/group_norms/group_norm_bwd_instance.cuh", defines)

    attention = " ".join(f"X({d}, {hd})" for d in CUDA_ATTENTION_DTYPES for hd in CUDA_ATTENTION_HEAD_DIMS)
    head_dims = " ".join(f"X({hd})" for hd in sorted(CUDA_ATTENTION_HEAD_DIMS))
    norms = " ".join(f"X({d})" for d in CUDA_NORM_DTYPES)
    rope = " ".join(f"X({d})" for d in CUDA_ROPE_DTYPES)
    activations = " ".join(f"X({d})" for d in CUDA_ACTIVATION_DTYPES)
    group_norms = " ".join(f"X({d})" for d in CUDA_GROUP_NORM_DTYPES)
    _write(
        os.path.join(GENERATED, "cuda_instances.h"),
        note
        + "#pragma once\n"
        + f"#define FASTARCH_FOR_EACH_ATTENTION_INSTANCE(X) {attention}\n"
        + f"#define FASTARCH_FOR_EACH_ATTENTION_HEAD_DIM(X) {head_dims}\n"
        + f"#define FASTARCH_FOR_EACH_NORM_DTYPE(X) {norms}\n"
        + f"#define FASTARCH_FOR_EACH_ROPE_DTYPE(X) {rope}\n"
        + f"#define FASTARCH_FOR_EACH_ACTIVATION_DTYPE(X) {activations}\n"
        + f"#define FASTARCH_FOR_EACH_GROUP_NORM_DTYPE(X) {group_norms}\n",
    )
    return sources


def _precompiled_torch_headers() -> None:
    """Compiles csrc/pch/fastarch_torch.h, which the op-registering C++ units include first,
    into a GCC precompiled header in the build directory, with the exact flags torch's ninja
    build gives the C++ units (it hands them to _write_ninja_file_and_compile_objects, wrapped
    here), and puts that directory first on their include path: 17 units include
    torch/library.h, ~11 s of parsing each. GCC falls back to the plain header where the
    precompiled one does not fit (-Winvalid-pch says so); FASTARCH_PCH=0 leaves it out."""
    import shlex
    import subprocess

    import torch.utils.cpp_extension as cpp_extension

    write_and_compile = getattr(cpp_extension, "_write_ninja_file_and_compile_objects", None)
    if write_and_compile is None or os.environ.get("FASTARCH_PCH") == "0" or platform.system() != "Linux":
        return

    def with_pch(*args, **kwargs):
        cflags, post_cflags = kwargs.get("cflags"), kwargs.get("post_cflags")
        directory = kwargs.get("build_directory")
        if args or cflags is None or post_cflags is None or directory is None:  # another torch: no PCH
            return write_and_compile(*args, **kwargs)
        header = os.path.join(directory, "pch", "fastarch_torch.h")
        with open(os.path.join(ROOT, "csrc", "pch", "fastarch_torch.h")) as f:
            source = f.read()
        cxx = os.environ.get("CXX", "c++")
        command = " ".join([cxx, *cflags, "-x", "c++-header", shlex.quote(header), "-o", shlex.quote(header + ".gch"),
                            *post_cflags])
        # GCC does not check a precompiled header against its sources: the stamp names the torch,
        # the command and the header it was made from, and any change remakes it
        recipe = f"torch {torch.__version__} at {os.path.dirname(torch.__file__)}\n{command}\n{source}"
        stamp = header + ".recipe"
        if not (os.path.exists(header + ".gch") and os.path.exists(stamp) and open(stamp).read() == recipe):
            _write(header, source)  # (only when changed: the units depend on it)
            print(f"fastarch: precompiling the torch headers ({header}.gch)")
            if subprocess.call(command, shell=True) != 0:
                print("fastarch: the torch headers could not be precompiled; building without")
                return write_and_compile(**kwargs)
            _write(stamp, recipe)
        kwargs["cflags"] = ["-I" + shlex.quote(os.path.dirname(header)), *cflags]  # before csrc/pch
        kwargs["post_cflags"] = [*post_cflags, "-Winvalid-pch"]
        return write_and_compile(**kwargs)

    cpp_extension._write_ninja_file_and_compile_objects = with_pch


def _extension():
    with_cuda = _build_cuda()
    with_avx512 = _build_x86("FASTARCH_CPU_AVX512", "AVX-512 CPU kernels (the *_avx512.cpp translation units)")
    with_avx2 = _build_x86("FASTARCH_CPU_AVX2", "AVX2 build of the portable CPU kernels (the *_avx2.cpp translation units)")
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/cpu/*/*.cpp"))
    if not with_avx512:
        cpu_sources = [s for s in cpu_sources if not s.endswith("_avx512.cpp")]
    if not with_avx2:
        cpu_sources = [s for s in cpu_sources if not s.endswith("_avx2.cpp")]
    sources = ["csrc/ops.cpp", "csrc/module.cpp"] + cpu_sources
    # -ffp-contract=off: no implicit FMAs, so kernels round where the reference rounds (explicit
    # FMA intrinsics stay); e.g. dy*w - mean(dy*w) is exactly 0 for a row of one element.
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden", "-ffp-contract=off"]
    cxx.append("-g" if os.environ.get("FASTARCH_DEBUG_INFO") == "1" else "-g0")  # after Python's CFLAGS' -g
    if with_avx512:
        cxx.append("-DFASTARCH_WITH_AVX512")
    if with_avx2:
        cxx.append("-DFASTARCH_WITH_AVX2")
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, GENERATED), os.path.join(ROOT, "csrc", "pch")]
    if not with_cuda:
        return CppExtension(
            "fastarch._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    targets = _cuda_targets()
    print(f"fastarch: building the CUDA kernels for {targets} (TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    sources += _generate_cuda_instances()
    sources += sorted(glob.glob("csrc/cuda/*/*.cpp") + glob.glob("csrc/cuda/*/*.cu"))
    cuda_defines = ["-DFASTARCH_WITH_CUDA", f'-DFASTARCH_CUDA_ARCHS="{targets}"']
    return CUDAExtension(
        "fastarch._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx + cuda_defines, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )


_precompiled_torch_headers()
setup(
    license="BSD-3-Clause",
    packages=find_packages(include=["fastarch", "fastarch.*"])
    + ["fastarch.kernels"]
    + [f"fastarch.kernels.{p}" for p in find_packages("kernels")],
    package_dir={"fastarch.kernels": "kernels"},
    # the trained digit models, so that `fastarch sample` works right after install
    package_data={"fastarch.generative": ["checkpoints/*/*.json", "checkpoints/*/*.safetensors"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
