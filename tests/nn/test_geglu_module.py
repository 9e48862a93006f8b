"""fastarch.nn.GEGLU against diffusers' GEGLU (diffusers.models.activations.GEGLU), the
feed-forward input layer of the diffusion UNet's transformer blocks.

Judged as the activation tests (tests/ops/activations/activation_tolerance.py): against the
diffusers module run in fp64, our fp32 error (output and every gradient) must be at most a
small multiple of diffusers' own fp32 error, plus two fp32 ulps at the output's scale: the
Linear is the same computation in both, the activation ours rounds once where diffusers rounds
twice (and its 1 + erf cancels in the tail)."""

from __future__ import annotations

import copy

import pytest
import torch

import fastarch

activations = pytest.importorskip("diffusers.models.activations")

FACTOR = 3.0
FLOOR = 2.4e-7  # two fp32 ulps at 1.0


def _err(a, ref):
    return (a.double() - ref).abs().max().item()


def _run(module, x):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, [x, *module.parameters()], dy)
    return [y.detach(), *grads]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dims", [(320, 1280), (40, 97)], ids=["sd-320", "odd"])
def test_geglu_equals_diffusers_fp32(dims, bias):
    torch.manual_seed(0)
    theirs = activations.GEGLU(*dims, bias=bias)
    ours = fastarch.nn.GEGLU.from_diffusers(theirs)
    assert ours.proj is theirs.proj  # shared, not copied
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 77, dims[0]) * 2
    ref = _run(copy.deepcopy(theirs).double(), x.double())
    names = ["y", "dx"] + [f"d{n}" for n, _ in theirs.named_parameters()]
    for name, a, b, r in zip(names, _run(ours, x), _run(theirs, x), ref):
        assert a.shape == r.shape and a.dtype == torch.float32, name
        bound = FACTOR * _err(b, r) + FLOOR * max(r.abs().max().item(), 1.0)
        assert _err(a, r) <= bound, f"{name}: error {_err(a, r):.3g} > {bound:.3g}"


def test_geglu_loads_a_diffusers_state_dict_and_takes_tanh():
    theirs = activations.GEGLU(16, 24)
    ours = fastarch.nn.GEGLU(16, 24, approximate="tanh")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 16)
    up, gate = theirs.proj(x).chunk(2, dim=-1)
    torch.testing.assert_close(ours(x), up * torch.nn.functional.gelu(gate, approximate="tanh"), rtol=1e-5, atol=1e-6)
    assert "approximate='tanh'" in repr(ours)


def test_geglu_rejects_a_bad_approximate_and_a_module_without_a_projection():
    with pytest.raises(ValueError, match="approximate must be 'none'"):
        fastarch.nn.GEGLU(8, 8, approximate="exact")
    with pytest.raises(TypeError, match="expected a diffusers GEGLU"):
        fastarch.nn.GEGLU.from_diffusers(torch.nn.GELU())
