"""The backend registry: automatic choice, forcing (argument, context, environment), and the
error that lists every backend's reason."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import fastarch
from fastarch import availability, ops, registry
from fastarch.ops.norms.backends import NormProblem


def spy_on(monkeypatch, field: str) -> list[str]:
    """Wraps ``field`` (forward or backward) of every layer_norm backend; returns the list of
    backend names in the order they ran."""
    calls = []

    def wrap(b):
        def run(*args):
            calls.append(b.name)
            return getattr(b, field)(*args)

        return dataclasses.replace(b, **{field: run})

    monkeypatch.setitem(registry._REGISTRY, "layer_norm", [wrap(b) for b in registry.backends_of("layer_norm")])
    return calls


@pytest.fixture
def spies(monkeypatch):
    return spy_on(monkeypatch, "forward")


def test_automatic_choice_on_cpu_is_the_cpu_kernel(spies):
    ops.layer_norm(torch.randn(3, 8))
    assert spies == ["cpu"]


def test_argument_context_and_nesting(spies):
    x = torch.randn(3, 8)
    with fastarch.backend("reference"):
        ops.layer_norm(x)
        with fastarch.backend("cpu"):
            ops.layer_norm(x)
        ops.layer_norm(x)
        ops.layer_norm(x, backend="cpu")  # the argument wins over the block
    ops.layer_norm(x)
    assert spies == ["reference", "cpu", "reference", "cpu", "cpu"]


def test_context_is_restored_after_an_exception():
    with pytest.raises(RuntimeError):
        with fastarch.backend("reference"):
            raise RuntimeError("boom")
    assert registry.requested_backend() == ""


def test_backward_uses_the_forward_backend(monkeypatch):
    calls = spy_on(monkeypatch, "backward")
    x = torch.randn(3, 8, requires_grad=True)
    with fastarch.backend("reference"):
        y = ops.layer_norm(x)
    y.sum().backward()  # outside the block: still the reference
    assert calls == ["reference"]


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastarch.backend("mps"):
            pass


def test_choose_without_any_able_backend_lists_reasons(monkeypatch):
    never = registry.Backend("reference", lambda: None, lambda p: "never in this test", None)
    monkeypatch.setitem(registry._REGISTRY, "layer_norm", [never])
    with pytest.raises(fastarch.NoBackendError, match="no backend can run .*\n  reference: never in this test"):
        ops.layer_norm(torch.randn(2, 4))


def test_automatic_choice_passes_over_the_interpreter(monkeypatch):
    """Triton on CPU tensors (Triton's interpreter) runs only when asked for: the automatic choice
    takes the next backend, as it does where TRITON_INTERPRET is unset, and the error of an
    automatic choice says why Triton was passed over."""
    def able(problem):
        return None

    table = [
        registry.Backend("cpu", lambda: None, lambda p: "declines", None),
        registry.Backend("triton", lambda: None, able, None),
        registry.Backend("reference", lambda: None, able, None),
    ]
    monkeypatch.setitem(registry._REGISTRY, "layer_norm", table)
    cpu, cuda = (NormProblem(device, torch.float32, 2, 4) for device in ("cpu", "cuda"))
    assert registry.choose("layer_norm", cpu).name == "reference"
    assert registry.choose("layer_norm", cpu, "triton").name == "triton"
    assert registry.choose("layer_norm", cuda).name == "triton"
    monkeypatch.setitem(registry._REGISTRY, "layer_norm", table[:2])
    with pytest.raises(fastarch.NoBackendError, match="triton: runs CPU tensors in Triton's interpreter, only when asked"):
        registry.choose("layer_norm", cpu)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )


def test_environment_variable_forces_a_backend():
    out = _python("import fastarch.registry as r; print(r.requested_backend())", FASTARCH_BACKEND="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"


def test_bad_environment_variable_is_a_clear_error():
    out = _python("import fastarch", FASTARCH_BACKEND="gpu")
    assert out.returncode != 0
    assert "FASTARCH_BACKEND must be one of cuda, cpu, triton, reference" in out.stderr


def test_import_works_without_the_extension():
    """With fastarch._C missing, the reference backend still runs and info() says why."""
    code = (
        "import sys; sys.modules['fastarch._C'] = None\n"
        "import torch, fastarch\n"
        "x = torch.randn(3, 8)\n"
        "y = fastarch.ops.layer_norm(x)\n"
        "assert torch.allclose(y, torch.nn.functional.layer_norm(x, (8,)), atol=1e-6)\n"
        "fastarch.info()\n"
    )
    out = _python(code, TRITON_INTERPRET="0")
    assert out.returncode == 0, out.stderr
    assert "layer_norm       cpu        unavailable: fastarch._C failed to load (ModuleNotFoundError" in out.stdout
    assert "layer_norm       reference  available" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA: there the Triton ops register")
def test_import_without_a_place_for_the_triton_kernels(tmp_path):
    """Without a CUDA device or Triton's interpreter, importing fastarch registers no Triton
    kernel as a torch op and imports no torch._dynamo (each ~1 s); the ops run on the CPU, and
    asking for Triton names why not. (Under the tests' TRITON_INTERPRET=1 they register.)"""
    code = (
        "import sys, torch, fastarch\n"
        "from fastarch import availability\n"
        "print(availability.TRITON_OPS, hasattr(torch.ops.fastarch, '_triton_norm_fwd'),"
        " 'torch._dynamo' in sys.modules)\n"
        "x = torch.randn(3, 8)\n"
        "torch.testing.assert_close(fastarch.ops.rms_norm(x, torch.ones(8)), fastarch.ops.rms_norm(x, torch.ones(8),"
        " backend='reference'))\n"
        "try:\n"
        "    fastarch.ops.rms_norm(x, torch.ones(8), backend='triton')\n"
        "except fastarch.registry.NoBackendError as e:\n"
        "    print('triton:', 'no CUDA device is visible' in str(e))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # (run outside the source tree: "python -c" puts the working directory first on sys.path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "False", "triton:", "True"], out.stdout
    # this process (TRITON_INTERPRET=1 from conftest): registered wherever triton and the kernels import
    assert availability.TRITON_OPS == (availability._TRITON_IMPORT_ERROR is None)
    assert hasattr(torch.ops.fastarch, "_triton_norm_fwd") == availability.TRITON_OPS


def test_the_drop_in_choice_is_marked_constant_as_torch_marks_it():
    """fastarch.override marks _backend_for for torch.compile by hand (importing torch._dynamo
    for torch.compiler.assume_constant_result cost ~1 s of fastarch's import): the mark is the
    one that function sets."""
    from fastarch import override

    def probe():
        return 0

    marked = torch.compiler.assume_constant_result(probe)
    attributes = {k: v for k, v in vars(marked).items()}
    assert attributes and all(getattr(override._backend_for, k, None) == v for k, v in attributes.items())
