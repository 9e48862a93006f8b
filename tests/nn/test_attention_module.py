"""fastarch.nn.MultiheadAttention as a drop-in for torch.nn.MultiheadAttention."""

from __future__ import annotations

import pytest
import torch

import fastarch


def pair(**kwargs):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(32, 4, **kwargs).eval()
    ours = fastarch.nn.MultiheadAttention(32, 4, **kwargs).eval()
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", ["self", "cross", "kdim"])
def test_matches_torch(batch_first, kind):
    kwargs = dict(batch_first=batch_first)
    if kind == "kdim":
        kwargs.update(kdim=24, vdim=16)
    ours, theirs = pair(**kwargs)
    n, length, source = 3, 7, 11 if kind != "self" else 7
    shape = (n, length, 32) if batch_first else (length, n, 32)
    x = torch.randn(shape)
    if kind == "self":
        key = value = x
    else:
        kshape = (n, source) if batch_first else (source, n)
        key = torch.randn(*kshape, 24 if kind == "kdim" else 32)
        value = torch.randn(*kshape, 16 if kind == "kdim" else 32)
    padding = torch.zeros(n, source, dtype=torch.bool)
    padding[0, -3:] = True
    mask = torch.rand(length, source) > 0.8
    mask[:, 0] = False  # every query keeps a key
    for kw in (dict(), dict(key_padding_mask=padding), dict(attn_mask=mask), dict(attn_mask=torch.randn(length, source))):
        a, w = ours(x, key, value, need_weights=False, **kw)
        b, _ = theirs(x, key, value, need_weights=False, **kw)
        assert w is None
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_causal_hint_and_unbatched():
    ours, theirs = pair(batch_first=True)
    x = torch.randn(2, 6, 32)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6)
    a, _ = ours(x, x, x, need_weights=False, attn_mask=causal, is_causal=True)
    b, _ = theirs(x, x, x, need_weights=False, attn_mask=causal, is_causal=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    u = torch.randn(6, 32)
    torch.testing.assert_close(ours(u, u, u, need_weights=False)[0], theirs(u, u, u, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def test_weights_path_and_from_torch():
    ours, theirs = pair()
    x = torch.randn(5, 2, 32)
    a, wa = ours(x, x, x)  # need_weights=True: torch's path, with the weights
    b, wb = theirs(x, x, x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(wa, wb)
    shared = fastarch.nn.MultiheadAttention.from_torch(theirs)
    assert shared.in_proj_weight is theirs.in_proj_weight and shared.out_proj is theirs.out_proj
    torch.testing.assert_close(shared(x, x, x, need_weights=False)[0], b, rtol=1e-5, atol=1e-5)


def test_gradients_flow():
    ours, theirs = pair(batch_first=True)
    ours.train(), theirs.train()
    x = torch.randn(2, 5, 32, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    ours(x, x, x, need_weights=False)[0].square().sum().backward()
    theirs(y, y, y, need_weights=False)[0].square().sum().backward()  # dropout 0: same function
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.in_proj_weight.grad, theirs.in_proj_weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("need_weights", [False, True])
def test_causal_hint_without_a_mask_is_an_error_as_in_torch(need_weights):
    """is_causal only says what attn_mask holds; torch raises without one, and so do we (before
    this check our module ran non-causal attention silently)."""
    ours, theirs = pair(batch_first=True)
    x = torch.randn(2, 6, 32)
    with pytest.raises(RuntimeError, match="is_causal"):
        theirs(x, x, x, need_weights=need_weights, is_causal=True)
    with pytest.raises(RuntimeError, match="need attn_mask if specifying the is_causal hint"):
        ours(x, x, x, need_weights=need_weights, is_causal=True)


def test_which_calls_reach_fastarch(monkeypatch):
    """need_weights=False runs fastarch's attention; torch's default (need_weights=True) cannot,
    since a fused kernel never forms the weights (the docstring says so)."""
    calls = []
    real = fastarch.ops.attention
    monkeypatch.setattr(fastarch.ops, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ours, _ = pair(batch_first=True)
    x = torch.randn(2, 6, 32)
    ours(x, x, x)
    assert calls == []
    ours(x, x, x, need_weights=False)
    assert calls == [1]


@pytest.mark.parametrize("which", ["attn_mask", "key_padding_mask"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float64], ids=["int", "other-float"])
def test_masks_torch_refuses_are_refused_as_torch_refuses_them(which, dtype):
    """An integer mask, or a float mask of another dtype than the inputs': torch's module raises;
    ours hands such calls to torch's forward (it had added the mask's values to the scores)."""
    ours, theirs = pair(batch_first=True)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 5, 32)
    mask = torch.ones((5, 5) if which == "attn_mask" else (2, 5), dtype=dtype)
    errors = []
    for module in (theirs, ours):
        with pytest.raises(Exception) as info:
            module(x, x, x, need_weights=False, **{which: mask})
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]
