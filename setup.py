"""Builds fastarch and its extension fastarch._C.

The C++ CPU kernels are always compiled. The CUDA kernels are compiled as well when torch is
a CUDA build and nvcc is found; FASTARCH_CUDA=0 or 1 forces either way (1 fails loudly when
it cannot). TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" when no GPU is visible; MAX_JOBS sets
the number of parallel compile jobs (ninja).

The CPU kernels come in a portable build (every machine) and an AVX-512 build (csrc/cpu/*_avx512.cpp,
chosen at run time on CPUs that have it), compiled on x86-64 only; FASTARCH_CPU_AVX512=0 leaves it out
there too (to test the portable-only build), 1 fails loudly where it cannot be compiled.
"""

import glob
import os
import platform
import shutil

from setuptools import find_packages, setup


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
    flag = os.environ.get("FASTARCH_CUDA", "auto").strip().lower()
    if flag not in ("auto", "0", "1"):
        raise RuntimeError(f"FASTARCH_CUDA must be 0, 1 or auto, got {flag!r}")
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


def _build_avx512() -> bool:
    flag = os.environ.get("FASTARCH_CPU_AVX512", "auto").strip().lower()
    if flag not in ("auto", "0", "1"):
        raise RuntimeError(f"FASTARCH_CPU_AVX512 must be 0, 1 or auto, got {flag!r}")
    machine = platform.machine()
    x86_64 = machine.lower() in ("x86_64", "amd64")
    if flag == "1" and not x86_64:
        raise RuntimeError(f"FASTARCH_CPU_AVX512=1 but the AVX-512 kernels need an x86-64 build machine, this is {machine!r}")
    if flag == "0" or not x86_64:
        print(f"fastarch: building the portable CPU kernels only ({'FASTARCH_CPU_AVX512=0' if flag == '0' else machine})")
        return False
    return True


def _extension():
    with_cuda = _build_cuda()
    with_avx512 = _build_avx512()
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if not with_avx512:
        cpu_sources = [s for s in cpu_sources if not s.endswith("_avx512.cpp")]
    sources = ["csrc/ops.cpp", "csrc/module.cpp"] + cpu_sources
    # -ffp-contract=off: no implicit FMAs, so kernels round where the reference rounds (explicit
    # FMA intrinsics stay); e.g. dy*w - mean(dy*w) is exactly 0 for a row of one element.
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden", "-ffp-contract=off"]
    if with_avx512:
        cxx.append("-DFASTARCH_WITH_AVX512")  # the glue calls the AVX-512 kernels
    if not with_cuda:
        return CppExtension(
            "fastarch._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    nvcc = ["-O3", "-lineinfo"]
    return CUDAExtension(
        "fastarch._C",
        sources,
        extra_compile_args={"cxx": cxx + ["-DFASTARCH_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["fastarch", "fastarch.*"]) + ["fastarch.kernels"],
    package_dir={"fastarch.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
