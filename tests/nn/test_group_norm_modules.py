"""fastarch.nn.GroupNorm as a drop-in for torch.nn.GroupNorm, and GroupNormSiLU (the norm, the
time embedding's scale/shift and SiLU fused) against the torch modules it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastarch


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_group_norm_is_a_drop_in(affine, fmt):
    theirs = torch.nn.GroupNorm(8, 32, eps=1e-6, affine=affine)
    ours = fastarch.nn.GroupNorm(8, 32, eps=1e-6, affine=affine)
    assert isinstance(ours, torch.nn.GroupNorm)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 32, 6, 5).to(memory_format=fmt).requires_grad_()
    y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    g_ours = torch.autograd.grad(y_ours.square().sum(), [x, *ours.parameters()])
    g_theirs = torch.autograd.grad(y_theirs.square().sum(), [x, *theirs.parameters()])
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [fastarch.nn.GroupNorm, fastarch.nn.GroupNormSiLU])
def test_from_torch_shares_parameters(cls):
    theirs = torch.nn.GroupNorm(4, 16).eval()
    ours = cls.from_torch(theirs)
    assert ours.weight is theirs.weight and ours.bias is theirs.bias
    assert (ours.num_groups, ours.num_channels, ours.eps, ours.training) == (4, 16, theirs.eps, False)
    with torch.no_grad():
        theirs.weight.mul_(3)  # seen by ours: the same tensor
    x = torch.randn(2, 16, 7)
    expected = theirs(x) if cls is fastarch.nn.GroupNorm else F.silu(theirs(x))
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    assert not list(cls.from_torch(torch.nn.GroupNorm(4, 16, affine=False)).parameters())


@pytest.mark.parametrize("scale_shift", [False, True])
def test_group_norm_silu_is_the_unet_norm_and_nonlinearity(scale_shift):
    """GroupNormSiLU(x, scale, shift) = silu(norm(x) * (1 + scale) + shift) with norm a
    torch.nn.GroupNorm holding the same weights (diffusers' ResnetBlock2D, "scale_shift")."""
    norm = torch.nn.GroupNorm(32, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    fused = fastarch.nn.GroupNormSiLU(32, 64, eps=1e-6)
    fused.load_state_dict(norm.state_dict())
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    emb = torch.randn(2, 128, requires_grad=True) if scale_shift else None
    scale, shift = emb.chunk(2, dim=1) if scale_shift else (None, None)
    y = fused(x, scale, shift)
    h = norm(x)
    if scale_shift:
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    expected = F.silu(h)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    wrt = [x, norm.weight, norm.bias] + ([emb] if scale_shift else [])
    wrt_ours = [x, fused.weight, fused.bias] + ([emb] if scale_shift else [])
    dy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, wrt_ours, dy), torch.autograd.grad(expected, wrt, dy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
