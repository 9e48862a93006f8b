"""The attention reference (fastarch/ops/attn/reference.py, the definition every backend is
judged by) against an independent truth: torch's own attention in fp64 — the SDPA math path
with a dense boolean mask built here from the visibility rules, grouped-query heads expanded
by torch — and torch's autograd through it for the gradients. In fp64 both compute the same
sums in other orders: they agree to ~1e-12; 1e-10 leaves room for the softmax of long rows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastarch.ops.attn.args import AttentionArgs
from fastarch.ops.attn.reference import attention_backward_ref, attention_forward_ref, dropout_keep

TOL = dict(rtol=1e-10, atol=1e-10)


def dense_visibility(sq, sk, causal, left, right, kpm):
    """bool (B, 1, Sq, Sk): the rules of the reference's docstring, written out element-wise."""
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    diag = i + (sk - sq)
    ok = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        ok &= j <= diag
    if left >= 0:
        ok &= j >= diag - left
    if right >= 0:
        ok &= j <= diag + right
    ok = ok[None, None]
    if kpm is not None:
        ok = ok & kpm[:, None, None, :]
    return ok


def torch_truth(q, k, v, dout, args: AttentionArgs, kpm=None, keep=None):
    """out and (dq, dk, dv) by torch in fp64: SDPA's math path for the plain case, or the
    softmax written out (for dropout with the reference's hash-drawn mask), with autograd."""
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    visible = dense_visibility(q.shape[2], k.shape[2], args.causal, args.window_left, args.window_right, kpm)
    bias = torch.zeros(visible.shape, dtype=q.dtype).masked_fill(~visible, float("-inf"))
    if args.attn_mask is not None:
        bias = bias + args.attn_mask
    group = q.shape[1] // k.shape[1]
    # a query that sees no key: torch gives NaN, the reference 0 (and no gradient); its scores
    # are left unmasked (finite) and its output replaced by 0 below
    seen = visible.expand(q.shape[0], q.shape[1], -1, -1).any(-1, keepdim=True)
    bias = torch.where(seen, bias, torch.zeros_like(bias))
    if keep is None:
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias, scale=args.scale, enable_gqa=group > 1)
    else:
        ke, ve = ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1)
        p = torch.softmax(qs @ ke.transpose(-1, -2) * args.scale + bias, dim=-1)
        out = (p * keep / (1 - args.dropout_p)) @ ve
    out = torch.where(seen, out, torch.zeros_like(out))
    out.backward(dout)
    return out.detach(), (qs.grad, ks.grad, vs.grad)


CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "causal-window": dict(causal=True, window_left=5),
    "window-both": dict(window_left=3, window_right=2),
    "right-window-sq-gt-sk": dict(window_left=0, window_right=0),
    "key-padding": dict(kpm=True),
    "float-mask": dict(mask=True),
    "causal-padding-mask": dict(causal=True, kpm=True, mask=True),
    "dropout": dict(dropout_p=0.3),
    "dropout-causal": dict(causal=True, dropout_p=0.5),
}


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("sq,sk", [(11, 17), (17, 11), (16, 16)])
@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_torch_in_fp64(case, sq, sk, gqa):
    opts = CASES[case]
    g = torch.Generator().manual_seed(sq * 100 + sk)
    b, h, hkv, d = 2, 4, 2 if gqa else 4, 8
    q = torch.randn(b, h, sq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, sk, d + 3, generator=g, dtype=torch.float64)
    dout = torch.randn(b, h, sq, d + 3, generator=g, dtype=torch.float64)
    kpm = None
    if opts.get("kpm"):
        kpm = torch.arange(sk)[None, :] < torch.tensor([[sk - 4], [1]])  # sequence 1: one real key
    mask = torch.randn(b, 1, sq, sk, generator=g, dtype=torch.float64) if opts.get("mask") else None
    seed = torch.tensor(1234) if opts.get("dropout_p") else None
    args = AttentionArgs(
        attn_mask=mask.expand(b, h, sq, sk) if mask is not None else None, key_padding_mask=kpm,
        causal=opts.get("causal", False), scale=1 / math.sqrt(d), window_left=opts.get("window_left", -1),
        window_right=opts.get("window_right", -1), dropout_p=opts.get("dropout_p", 0.0), seed=seed,
    )
    keep = None
    if seed is not None:  # the mask is the reference's specification (its hash), the rest torch's
        rows = (torch.arange(b)[:, None, None] * h + torch.arange(h)[None, :, None]) * sq + torch.arange(sq)
        keep = dropout_keep(1234, rows.reshape(-1), torch.arange(sk), args.dropout_p).view(b, h, sq, sk)
    truth_out, truth_grads = torch_truth(q, k, v, dout, args, kpm=kpm, keep=keep)
    out, lse = attention_forward_ref(q, k, v, args)
    torch.testing.assert_close(out, truth_out, **TOL)
    grads = attention_backward_ref(dout, q, k, v, out, lse, args)
    for name, ours, theirs in zip(("dq", "dk", "dv"), grads, truth_grads):
        torch.testing.assert_close(ours, theirs, **TOL, msg=lambda m: f"{name}: {m}")
    # lse: log-sum-exp of the visible scaled scores, -inf where none is visible
    visible = dense_visibility(sq, sk, args.causal, args.window_left, args.window_right, kpm)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(h // hkv, 1)) * args.scale
    if mask is not None:
        scores = scores + mask
    expected_lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)
    torch.testing.assert_close(lse, expected_lse, **TOL)


def test_varlen_reference_is_attention_per_sequence():
    """Packed sequences: each is attention over its own rows only (torch's truth per sequence)."""
    g = torch.Generator().manual_seed(3)
    lens_q, lens_k = [3, 0, 6, 2], [4, 2, 6, 0]
    cu_q = torch.tensor([0, 3, 3, 9, 11], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 12, 12], dtype=torch.int32)
    q = torch.randn(1, 2, 11, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64)
    for causal in (False, True):
        args = AttentionArgs(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal, scale=0.3)
        out, _ = attention_forward_ref(q, k, v, args)
        for n in range(4):
            rows = slice(int(cu_q[n]), int(cu_q[n + 1]))
            keys = slice(int(cu_k[n]), int(cu_k[n + 1]))
            if lens_q[n] == 0:
                continue
            if lens_k[n] == 0:
                assert (out[:, :, rows] == 0).all()
                continue
            truth, _ = torch_truth(q[:, :, rows], k[:, :, keys], v[:, :, keys], torch.zeros_like(out[:, :, rows]),
                                   AttentionArgs(causal=causal, scale=0.3))
            torch.testing.assert_close(out[:, :, rows], truth, **TOL)
