"""Machine checks shared by every op family: which GPUs the compiled CUDA kernels can run on."""

from __future__ import annotations

import pytest
import torch

from fastarch import availability
from fastarch.ops.attn import backends as attn_backends
from fastarch.ops.attn.args import AttentionProblem
from fastarch.ops.norms import backends as norm_backends


@pytest.mark.parametrize(
    "archs,capability,runs",
    [
        ("8.0;9.0+PTX", (8, 0), True),
        ("8.0;9.0+PTX", (8, 6), True),  # an sm_80 cubin runs on any 8.x at or above 8.0
        ("8.0;9.0+PTX", (9, 0), True),
        ("8.0;9.0+PTX", (10, 0), True),  # Blackwell: the driver compiles the 9.0 PTX
        ("8.0;9.0+PTX", (12, 0), True),
        ("8.0;9.0+PTX", (7, 5), False),  # Turing: older than every arch compiled
        ("8.0;9.0", (10, 0), False),  # no PTX: a newer major has no code
        ("9.0", (8, 6), False),
        ("8.6", (8, 0), False),  # a cubin runs on its minor version and above only
        ("9.0a", (9, 0), True),
        ("9.0a", (10, 0), False),  # an arch-specific cubin runs on its exact version
        ("8.0 9.0", (9, 0), False),  # (space-separated lists are not TORCH_CUDA_ARCH_LIST syntax)
    ],
)
def test_runs_on(archs, capability, runs):
    if " " in archs:
        with pytest.raises(ValueError):
            availability.runs_on(archs, capability)
        return
    assert availability.runs_on(archs, capability) is runs


@pytest.fixture
def fake_gpu(monkeypatch):
    """A visible GPU of a given capability, with the extension compiled for given archs."""

    def make(capability, archs):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
        monkeypatch.setattr(availability, "build_info", lambda: {"cuda": True, "cuda_archs": archs})
        availability._cuda_arch_reason.cache_clear()

    yield make
    availability._cuda_arch_reason.cache_clear()


def test_cuda_backends_decline_a_gpu_the_build_cannot_run(fake_gpu):
    fake_gpu((7, 5), "8.0;9.0+PTX")
    why = availability.cuda_device_reason()
    assert why is not None and "compiled for 8.0;9.0+PTX" in why and "7.5" in why and "TORCH_CUDA_ARCH_LIST=7.5" in why
    problem = norm_backends.NormProblem("cuda", torch.float16, 4, 8)
    assert norm_backends._cuda_supports(problem) == why
    fake_gpu((10, 0), "8.0;9.0")
    assert "compiled for 8.0;9.0" in availability.cuda_device_reason()
    fake_gpu((10, 0), "8.0;9.0+PTX")
    assert availability.cuda_device_reason() is None


def test_attention_cuda_declines_a_gpu_the_build_cannot_run(fake_gpu, monkeypatch):
    fake_gpu((7, 5), "8.0;9.0+PTX")
    problem = AttentionProblem("cuda", torch.float16, 64, 64, 8, 8)
    why = attn_backends.cuda_supports(problem)
    assert why is not None and "compiled for 8.0;9.0+PTX" in why
