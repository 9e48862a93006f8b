"""The C++ CPU attention kernels beyond the shared table (tests/ops/test_attention.py): shapes
that run through many tiles, odd head dims, values' head dim != keys', strided views, every
mask kind at once, packed sequences with empty ones, thread-count independence, decode
corner cases, and the kernels' own argument errors. Judged as the shared table judges: the
error against an fp64 reference at most 2x the error of the same computation in the inputs'
dtype plus a floor of a few ulps."""

from __future__ import annotations

import math

import pytest
import torch

from attention_tolerance import floor  # tests/ops/attn/attention_tolerance.py
from fastarch import ops
from fastarch.ops.attn import cpp
from fastarch.ops.attn.api import _attention
from fastarch.ops.attn.args import AttentionArgs
from fastarch.ops.attn.reference import attention_decode_ref, attention_forward_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ids = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def run_cpu(q, k, v, *, causal=False, scale=None, attn_mask=None, kpm=None, cu_q=None, cu_k=None, window=(-1, -1),
            dropout_p=0.0, seed=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    args = AttentionArgs(attn_mask, kpm, cu_q, cu_k, 0, 0, causal, scale, window[0], window[1], dropout_p, seed)
    out, lse = _attention(q, k, v, *args.fields(), "cpu")
    truth, truth_lse = attention_forward_ref(q.double(), k.double(), v.double(), args)
    same_dtype, _ = attention_forward_ref(q, k, v, args, upcast=False)
    return out, lse, truth, truth_lse, same_dtype


def check(q, k, v, **kw):
    out, lse, truth, truth_lse, base = run_cpu(q, k, v, **kw)
    dtype = q.dtype
    assert out.shape == truth.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    e_ours = (out.double() - truth).abs().max().item() if out.numel() else 0.0
    e_base = (base.double() - truth).abs().max().item() if out.numel() else 0.0
    bound = 2 * e_base + floor(truth, dtype)
    assert e_ours <= bound, f"error {e_ours:.3g} > bound {bound:.3g} (same-dtype error {e_base:.3g})"
    seen = torch.isfinite(truth_lse)
    assert torch.equal(torch.isfinite(lse), seen), "lse must be -inf exactly for queries that see no key"
    assert (out[~seen] == 0).all()
    if seen.any():
        assert (lse.double()[seen] - truth_lse[seen]).abs().max() <= 1e-3 + 1e-5 * truth_lse[seen].abs().max()
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sq,sk", [(700, 900), (900, 700), (130, 4000)])
def test_many_tiles(dtype, causal, sq, sk):
    q, k, v = (randn(1, 2, s, 64, dtype=dtype, seed=i) for i, s in enumerate((sq, sk, sk)))
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
@pytest.mark.parametrize("d,dv", [(1, 1), (3, 5), (17, 17), (48, 80), (111, 111), (200, 24), (512, 512)])
def test_head_dims(dtype, d, dv):
    q, k = randn(2, 2, 67, d, dtype=dtype, seed=1), randn(2, 1, 75, d, dtype=dtype, seed=2)
    v = randn(2, 1, 75, dv, dtype=dtype, seed=3)
    out, _ = check(q, k, v, causal=True)
    assert out.shape == (2, 2, 67, dv)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_strided_views_and_output_layout(dtype):
    # (B, S, H, D) storage seen as (B, H, S, D); k and v slices of wider tensors
    q = randn(2, 83, 4, 40, dtype=dtype, seed=1).permute(0, 2, 1, 3)
    k = randn(2, 2, 100, 56, dtype=dtype, seed=2)[..., 8:48]
    v = randn(2, 2, 100, 40, dtype=dtype, seed=3)[:, :, ::1]
    out, _ = check(q, k, v, causal=True)
    assert out.stride() == q.stride(), "out has q's memory layout"


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_every_mask_at_once(dtype):
    B, H, Hkv, Sq, Sk = 2, 4, 2, 150, 170
    q, k, v = randn(B, H, Sq, 32, dtype=dtype, seed=1), randn(B, Hkv, Sk, 32, dtype=dtype, seed=2), randn(B, Hkv, Sk, 32, dtype=dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    float_mask = torch.randn(1, H, 1, Sk, generator=g).to(dtype).expand(B, H, Sq, Sk)  # stride 0 over b and i
    float_mask = float_mask.masked_fill(torch.rand(1, 1, 1, Sk, generator=g) < 0.1, float("-inf"))
    kpm = torch.rand(B, Sk, generator=g) > 0.2
    check(q, k, v, causal=True, window=(40, 0), attn_mask=float_mask, kpm=kpm, dropout_p=0.3, seed=torch.tensor(77))
    # a mask with a non-unit key stride (a transposed view) and a padding mask with one too
    tmask = torch.randn(B, H, Sk, Sq, generator=g).to(dtype).transpose(2, 3)
    kpm_t = (torch.rand(Sk, B, generator=g) > 0.3).t()
    check(q, k, v, window=(20, 30), attn_mask=tmask, kpm=kpm_t)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_rows_that_see_nothing(dtype):
    q, k, v = randn(1, 2, 200, 64, dtype=dtype, seed=1), randn(1, 2, 70, 64, dtype=dtype, seed=2), randn(1, 2, 70, 64, dtype=dtype, seed=3)
    out, lse = check(q, k, v, causal=True)  # bottom-right: the first 130 queries see no key
    assert (out[:, :, :130] == 0).all() and torch.isneginf(lse[:, :, :130]).all()
    kpm = torch.zeros(1, 70, dtype=torch.bool)
    out, lse = check(q, k, v, kpm=kpm)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("scale", [0.0, -0.2, 2.5])
def test_scales(scale):
    q, k, v = (randn(1, 2, 90, 32, dtype=torch.float32, seed=i) for i in range(3))
    check(q, k, v, scale=scale, causal=True)


def _packed(lens_q, lens_k, dtype):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q = randn(sum(lens_q), 4, 64, dtype=dtype, seed=1).permute(1, 0, 2)[None]
    k = randn(sum(lens_k), 2, 64, dtype=dtype, seed=2).permute(1, 0, 2)[None]
    v = randn(sum(lens_k), 2, 64, dtype=dtype, seed=3).permute(1, 0, 2)[None]
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_varlen_with_empty_sequences(dtype):
    lens_q, lens_k = [0, 70, 1, 130, 5, 0, 4], [3, 90, 0, 130, 200, 0, 1]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, dtype)
    for causal in (False, True):
        out, lse = _attention(q, k, v, None, None, cu_q, cu_k, 0, 0, causal, 0.125, -1, -1, 0.0, None, "cpu")
        for n in range(len(lens_q)):
            if lens_q[n] == 0:
                continue
            rows, keys = slice(cu_q[n], cu_q[n + 1]), slice(cu_k[n], cu_k[n + 1])
            if lens_k[n] == 0:
                assert (out[:, :, rows] == 0).all() and torch.isneginf(lse[:, :, rows]).all()
                continue
            seq = [t[:, :, s] for t, s in ((q, rows), (k, keys), (v, keys))]
            args = AttentionArgs(causal=causal, scale=0.125)
            truth, truth_lse = attention_forward_ref(*(t.double() for t in seq), args)
            base, _ = attention_forward_ref(*seq, args, upcast=False)
            e_ours, e_base = (out[:, :, rows].double() - truth).abs().max().item(), (base.double() - truth).abs().max().item()
            assert e_ours <= 2 * e_base + floor(truth, dtype), (n, e_ours, e_base)
            torch.testing.assert_close(lse[:, :, rows].double(), truth_lse, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_varlen_dropout_window(dtype):
    q, k, v, cu_q, cu_k = _packed([0, 70, 1, 130, 5], [3, 90, 2, 130, 200], dtype)
    check(q, k, v, causal=True, window=(30, -1), cu_q=cu_q, cu_k=cu_k, dropout_p=0.1, seed=torch.tensor(5))


def test_thread_count_independence():
    q, k, v = randn(2, 4, 300, 64, dtype=torch.bfloat16, seed=1), randn(2, 2, 333, 64, dtype=torch.bfloat16, seed=2), randn(2, 2, 333, 64, dtype=torch.bfloat16, seed=3)
    caches = [randn(2, 2, 3000, 64, dtype=torch.float32, seed=s) for s in (4, 5)]
    lens = torch.tensor([3000, 1234], dtype=torch.int32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            a = ops.attention(q, k, v, causal=True, dropout_p=0.2, generator=torch.Generator().manual_seed(1), backend="cpu")
            d = ops.attention_decode(q[:, :, :2].float(), *caches, lens, backend="cpu")
            results.append((a, d))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
@pytest.mark.parametrize(
    "B,H,Hkv,Sq,S,D,Dv",
    [(3, 8, 2, 1, 3000, 64, 64), (2, 6, 1, 4, 500, 59, 59), (1, 4, 4, 7, 40, 32, 48), (2, 2, 1, 1, 9000, 128, 128),
     (1, 2, 2, 3, 100, 256, 256)],
)
@pytest.mark.parametrize("causal,window", [(True, -1), (True, 25), (False, -1)])
def test_decode(dtype, B, H, Hkv, Sq, S, D, Dv, causal, window):
    q = randn(B, H, Sq, D, dtype=dtype, seed=1)
    # caches are slices of wider ones: a row stride that is not the head dim
    k = randn(B, Hkv, S, D + 8, dtype=dtype, seed=2)[..., :D]
    v = randn(B, Hkv, S, Dv, dtype=dtype, seed=3)
    lens = torch.randint(1, S + 1, (B,), generator=torch.Generator().manual_seed(4), dtype=torch.int32)
    lens[0] = S
    scale = 1 / math.sqrt(D)
    out, lse = cpp.decode(q, k, v, lens, causal, scale, window)
    truth, truth_lse = attention_decode_ref(q.double(), k.double(), v.double(), lens, causal, scale, window)
    same, _ = attention_decode_ref(q, k, v, lens, causal, scale, window)
    e_ours, e_base = (out.double() - truth).abs().max().item(), (same.double() - truth).abs().max().item()
    assert e_ours <= 2 * e_base + floor(truth, dtype)
    seen = torch.isfinite(truth_lse)
    assert torch.equal(torch.isfinite(lse), seen) and (out[~seen] == 0).all()
    assert (lse.double()[seen] - truth_lse[seen]).abs().max() <= 1e-4 * max(1.0, truth_lse[seen].abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
@pytest.mark.parametrize("window", [(-1, -1), (25, 0), (0, -1)], ids=["full", "window", "last-key"])
def test_one_query_forward_runs_the_decode_kernel(dtype, window):
    """A forward call with one query per sequence and nothing to mask (a decode step through
    transformers' attention) runs the decode kernel: the same bits as attention_decode with
    every key filled, judged against fp64, and gradients through its lse as any forward's."""
    B, H, Hkv, S, D = 2, 6, 2, 300, 64
    q = randn(B, H, 1, D, dtype=dtype, seed=5)
    k = randn(B, Hkv, S, D + 8, dtype=dtype, seed=6)[..., :D]
    v = randn(B, Hkv, S, D, dtype=dtype, seed=7)
    out, lse = check(q, k, v, window=window)
    lens = torch.full((B,), S, dtype=torch.int32)
    dec_out, dec_lse = cpp.decode(q, k, v, lens, True, 1 / math.sqrt(D), window[0])
    assert torch.equal(out, dec_out) and torch.equal(lse, dec_lse)
    qg, kg, vg = (t.detach().float().requires_grad_() for t in (q, k, v))
    ops.attention(qg, kg, vg, window=window if window != (-1, -1) else None, backend="cpu").sum().backward()
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ops.attention(qr, kr, vr, window=window if window != (-1, -1) else None, backend="reference").sum().backward()
    for ours, truth in ((qg.grad, qr.grad), (kg.grad, kr.grad), (vg.grad, vr.grad)):
        assert (ours.double() - truth).abs().max() <= 1e-5 * max(1.0, truth.abs().max().item())


def test_one_query_forward_nan_stays_in_its_head():
    q, k, v = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 50, 32), torch.randn(1, 2, 50, 32)
    q[0, 1, 0, 3] = float("nan")
    out = ops.attention(q, k, v, backend="cpu")
    assert torch.isnan(out[0, 1]).all() and not torch.isnan(out[0, [0, 2, 3]]).any()


def test_decode_empty_cache():
    q, k, v = torch.randn(2, 4, 1, 64), torch.randn(2, 2, 10, 64), torch.randn(2, 2, 10, 64)
    out, lse = cpp.decode(q, k, v, torch.tensor([0, 3], dtype=torch.int32), True, 0.125, -1)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()


# ----------------------------------------------------------------------------- errors

ERRORS = {
    "fp64": (lambda q: (q.double(), q.double(), q.double()), "q must be float32, float16 or bfloat16"),
    "3-d": (lambda q: (q[0], q, q), r"q must be 4-D"),
    "dtype": (lambda q: (q, q.half(), q), "k must have q's dtype"),
    "last-dim": (lambda q: (q, q.transpose(2, 3).contiguous().transpose(2, 3), q), "k must have a contiguous last dim"),
    "heads": (lambda q: (q, q[:, :3], q[:, :3]), "heads must be a multiple"),
    "head-dim": (lambda q: (q, q[..., :8], q), "q and k must have the same head dim"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_kernel_errors(name):
    q = torch.randn(1, 4, 8, 16)
    make, pattern = ERRORS[name]
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.fastarch._attention_fwd(*make(q), None, None, None, None, 0, 0, False, 0.25, -1, -1, 0.0, 0)


def test_decode_kernel_errors():
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 10, 16)
    with pytest.raises(RuntimeError, match="cache_seqlens must be between 0 and the cache's 10 slots"):
        torch.ops.fastarch._attention_decode(q, k, k, torch.tensor([3, 11], dtype=torch.int32), True, 0.25, -1)
    with pytest.raises(RuntimeError, match="cache_seqlens must be an int32 CPU tensor"):
        torch.ops.fastarch._attention_decode(q, k, k, torch.tensor([3, 4]), True, 0.25, -1)
