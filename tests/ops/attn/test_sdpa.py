"""fastarch.ops.scaled_dot_product_attention against torch.nn.functional's: what torch accepts
we accept and compute the same (fp32 inputs: both compute in fp32 from the same values, so
they agree to a few fp32 ulps: rtol/atol 1e-5), and the documented differences hold."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastarch import ops

TOL = dict(rtol=1e-5, atol=1e-5)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def both(q, k, v, grads=True, **kw):
    """(ours, torch's) outputs and, with grads, the gradients of q, k, v under one dout."""
    results = []
    for fn in (ops.scaled_dot_product_attention, F.scaled_dot_product_attention):
        qs, ks, vs = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
        out = fn(qs, ks, vs, **kw)
        if grads:
            out.backward(randn(*out.shape, seed=9))
        results.append((out.detach(), *((qs.grad, ks.grad, vs.grad) if grads else ())))
    return results


def assert_same(ours, theirs):
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **TOL, equal_nan=True)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(is_causal=True), dict(scale=0.3), dict(attn_mask="bool"), dict(attn_mask="float")],
    ids=["plain", "causal", "scale", "bool-mask", "float-mask"],
)
@pytest.mark.parametrize("sq,sk", [(9, 13), (13, 9), (16, 16)])
def test_matches_torch(kwargs, sq, sk):
    q, k, v = randn(2, 4, sq, 16, seed=1), randn(2, 4, sk, 16, seed=2), randn(2, 4, sk, 16, seed=3)
    kw = dict(kwargs)
    if kw.get("attn_mask") == "bool":
        kw["attn_mask"] = torch.rand(sq, sk, generator=torch.Generator().manual_seed(4)) > 0.3
        kw["attn_mask"][:, 0] = True  # every query sees a key (torch gives NaN where none, we give 0)
    elif kw.get("attn_mask") == "float":
        kw["attn_mask"] = randn(2, 1, sq, sk, seed=5)
    assert_same(*both(q, k, v, **kw))


@pytest.mark.parametrize(
    "shapes,kw",
    [
        (((2, 3, 4, 10, 16), (1, 3, 4, 12, 16), (1, 3, 4, 12, 16)), {}),  # broadcast batch dims
        (((2, 4, 10, 16), (2, 1, 12, 16), (2, 1, 12, 16)), {}),  # broadcast heads (no enable_gqa)
        (((3, 2, 8, 10, 16), (3, 2, 2, 12, 16), (3, 2, 2, 12, 16)), dict(enable_gqa=True, is_causal=True)),
        (((2, 8, 5, 16), (2, 2, 7, 16), (2, 2, 7, 24)), dict(enable_gqa=True)),  # values' dim differs
        (((3, 5, 16), (3, 7, 16), (3, 7, 16)), {}),  # 3-D
        (((5, 16), (7, 16), (7, 16)), {}),  # 2-D
        (((5, 16), (2, 7, 16), (2, 7, 16)), {}),  # the query broadcast against batched keys
        (((2, 2, 10, 600), (2, 2, 12, 600), (2, 2, 12, 600)), {}),  # head dim above every kernel's
        (((2, 0, 10, 16), (2, 0, 12, 16), (2, 0, 12, 16)), {}),  # zero heads
        (((2, 2, 0, 16), (2, 2, 12, 16), (2, 2, 12, 16)), {}),  # zero queries
        (((2, 2, 10, 16), (2, 2, 0, 16), (2, 2, 0, 16)), {}),  # zero keys: zeros, as torch
        (((2, 2, 2, 10, 16), (2, 2, 2, 12, 16), (2, 2, 2, 12, 16)), dict(attn_mask=(2, 1, 1, 10, 12))),  # 5-D mask
        (((2, 3, 4, 10, 16), (2, 3, 4, 12, 16), (2, 3, 4, 12, 16)), dict(attn_mask=(3, 4, 10, 12))),  # 4-D mask, 5-D q
        (((2, 3, 4, 10, 16), (2, 3, 4, 12, 16), (2, 3, 4, 12, 16)), dict(attn_mask=(3, 1, 10, 12))),
    ],
    ids=["batch-broadcast", "head-broadcast", "gqa-5d-causal", "gqa-dv", "3d", "2d", "2d-query", "d600",
         "zero-heads", "zero-queries", "zero-keys", "mask-5d", "mask-4d-batch-3d", "mask-4d-heads-1"],
)
def test_accepts_what_torch_accepts(shapes, kw):
    q, k, v = (randn(*s, seed=i) for i, s in enumerate(shapes))
    kw = dict(kw)
    if "attn_mask" in kw:
        kw["attn_mask"] = randn(*kw["attn_mask"], seed=7)
    assert_same(*both(q, k, v, grads=q.numel() > 0, **kw))


def test_refuses_what_torch_refuses():
    """A mask that broadcasts against the flattened batch but not against the batch dims."""
    q, k, v = randn(2, 3, 4, 10, 16), randn(2, 3, 4, 12, 16), randn(2, 3, 4, 12, 16)
    mask = randn(6, 1, 10, 12)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.raises(RuntimeError, match="attn_mask of shape"):
        ops.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_dropout_one_gives_zeros_and_zero_gradients():
    q, k, v = randn(2, 2, 10, 16, seed=1), randn(2, 2, 12, 16, seed=2), randn(2, 2, 12, 16, seed=3)
    ours, theirs = both(q, k, v, dropout_p=1.0)
    assert_same(ours, theirs)
    assert all((t == 0).all() for t in ours)


def test_dropout_keeps_the_expected_fraction():
    """Our mask differs from torch's (another generator and hash), the distribution is the same:
    with v the identity, out holds the kept probabilities rescaled by 1 / (1 - p)."""
    torch.manual_seed(3)
    q = torch.zeros(1, 2, 64, 32)
    v = torch.eye(256, 32)[None, None].expand(1, 2, 256, 32)
    out = ops.scaled_dot_product_attention(q, randn(1, 2, 256, 32), v, dropout_p=0.25)
    kept = (out > 0).float().mean().item()
    assert abs(kept - 0.75) < 0.05
    torch.testing.assert_close(out[out > 0], torch.full_like(out[out > 0], 1 / (256 * 0.75)), rtol=1e-5, atol=0)


def test_gqa_hint():
    q, k, v = randn(2, 8, 5, 16), randn(2, 2, 7, 16), randn(2, 2, 7, 16)
    with pytest.raises(RuntimeError, match="pass enable_gqa=True"):
        ops.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_close_to_torch_fp32(dtype):
    """In half precision both round differently; ours must be as close to the fp32 result as
    torch's own computation in that dtype (2x its error, plus two roundings at the output's scale)."""
    q, k, v = randn(2, 4, 70, 64, seed=1), randn(2, 4, 90, 64, seed=2), randn(2, 4, 90, 64, seed=3)
    truth = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ours = ops.scaled_dot_product_attention(*(t.to(dtype) for t in (q, k, v)), is_causal=True).float()
    theirs = F.scaled_dot_product_attention(*(t.to(dtype) for t in (q, k, v)), is_causal=True).float()
    bound = 2 * (theirs - truth).abs().max() + 2 * torch.finfo(dtype).eps * truth.abs().max()
    assert (ours - truth).abs().max() <= bound
