"""Machine checks shared by every op family: which GPUs the compiled CUDA kernels can run on."""

from __future__ import annotations

import pytest
import torch

from fastarch import availability, registry
from fastarch.ops.attn import backends as attn_backends
from fastarch.ops.attn.args import AttentionProblem
from fastarch.ops.norms import backends as norm_backends


@pytest.mark.parametrize(
    "targets,capability,runs",
    [
        ("sm_80;sm_90;compute_90", (8, 0), True),  # the default build: 8.0;9.0+PTX
        ("sm_80;sm_90;compute_90", (8, 6), True),  # an sm_80 cubin runs on any 8.x at or above 8.0
        ("sm_80;sm_90;compute_90", (9, 0), True),
        ("sm_80;sm_90;compute_90", (10, 0), True),  # Blackwell: the driver compiles the 9.0 PTX
        ("sm_80;sm_90;compute_90", (12, 0), True),
        ("sm_80;sm_90;compute_90", (7, 5), False),  # Turing: older than every target
        ("sm_80;sm_90", (10, 0), False),  # no PTX: a newer major has no code
        ("sm_90", (8, 6), False),
        ("sm_86", (8, 0), False),  # a cubin runs on its minor version and above only
        ("sm_90a", (9, 0), True),
        ("sm_90a;compute_90a", (10, 0), False),  # arch-specific code runs on its exact version
        ("8.0;9.0", (9, 0), None),  # not the recorded format: unknown (the launch will say)
    ],
)
def test_runs_on(targets, capability, runs):
    assert availability.runs_on(targets, capability) is runs


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
    fake_gpu((7, 5), "sm_80;sm_90;compute_90")
    why = availability.cuda_device_reason()
    assert why is not None and "compiled for sm_80;sm_90;compute_90" in why and "7.5" in why
    assert isinstance(why, registry.MachineReason)
    problem = norm_backends.NormProblem("cuda", torch.float16, 4, 8)
    assert norm_backends._cuda_supports(problem) == why
    fake_gpu((10, 0), "sm_80;sm_90")
    assert "compiled for sm_80;sm_90" in availability.cuda_device_reason()
    fake_gpu((10, 0), "sm_80;sm_90;compute_90")
    assert availability.cuda_device_reason() is None
    fake_gpu((10, 0), "Ampere;Hopper")  # a string that does not parse: no claim either way
    assert availability.cuda_device_reason() is None


def test_attention_cuda_declines_a_gpu_the_build_cannot_run(fake_gpu, monkeypatch):
    fake_gpu((7, 5), "sm_80;sm_90;compute_90")
    problem = AttentionProblem("cuda", torch.float16, 64, 64, 8, 8)
    why = attn_backends.cuda_supports(problem)
    assert why is not None and "compiled for sm_80;sm_90;compute_90" in why


def test_cpuinfo_matches_whole_keys(tmp_path, monkeypatch):
    # /proc/cpuinfo lists "model" before "model name": a prefix match would answer one for the other
    info = tmp_path / "cpuinfo"
    info.write_text("vendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n")
    real_path = availability.Path
    monkeypatch.setattr(availability, "Path", lambda p: info if p == "/proc/cpuinfo" else real_path(p))
    availability.cpuinfo.cache_clear()
    try:
        assert (availability.cpuinfo("model"), availability.cpuinfo("model name")) == ("2", "AMD EPYC")
        assert availability.cpuinfo("cpu family") == "26" and availability.cpuinfo("flags") == ""
        assert availability.cpu_name() == "AMD EPYC (family 26 model 2: Zen 5)"
    finally:
        availability.cpuinfo.cache_clear()


@pytest.mark.parametrize(
    "vendor,family,model,generation",
    [
        ("AuthenticAMD", 0x19, 0x01, "Zen 3"),  # Milan
        ("AuthenticAMD", 0x19, 0x11, "Zen 4"),  # Genoa
        ("AuthenticAMD", 0x19, 0xA0, "Zen 4"),  # Bergamo
        ("AuthenticAMD", 0x1A, 0x02, "Zen 5"),  # Turin
        ("AuthenticAMD", 0x17, 0x31, "Zen 2"),  # Rome
        ("GenuineIntel", 6, 0x8F, "Sapphire Rapids"),
        ("GenuineIntel", 6, 0xAD, "Granite Rapids"),
        ("GenuineIntel", 6, 0x9A, ""),  # a client part: no server name
        ("HygonGenuine", 0x18, 0x01, ""),
    ],
)
def test_cpu_generation(vendor, family, model, generation):
    assert availability.cpu_generation(vendor, family, model) == generation
