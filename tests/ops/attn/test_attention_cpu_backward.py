"""The C++ CPU attention backward (fastarch::_attention_bwd) beyond the shared table of
test_attention.py: shapes that cross many tiles, grouped-query sums, dropout gradients that
agree with the forward's mask, queries and keys that see nothing, strided and packed layouts,
thread-count independence, and the portable (non-AVX-512) path.

Numerics as in test_attention.py: our error against an fp64 reference must stay within
GRAD_FACTOR x the error of the same computation in the inputs' dtype, plus a floor."""

from __future__ import annotations

import math

import pytest
import torch

import backend_rows  # tests/backend_rows.py
from attention_tolerance import floor  # tests/ops/attn/attention_tolerance.py
from fastarch import _extension
from fastarch.ops.attn import cpp
from fastarch.ops.attn.args import AttentionArgs
from fastarch.ops.attn.reference import attention_backward_ref, attention_forward_ref


GRAD_FACTOR = 3.0
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _isa(name: str) -> None:
    from fastarch import _C

    _C._set_cpu_isa(name)


@pytest.fixture(params=["avx512_bf16", "avx2", "generic"])
def isa(request):
    """The builds of the kernel: AVX-512 + BF16 (when the CPU and the build have it) and the
    portable one's two (AVX2, and the baseline)."""
    info = _extension.build_info()
    if request.param == "avx512_bf16" and not (info.get("cpu_has_avx512_bf16") and "avx512" in info.get("cpu_kernels", [])):
        pytest.skip("the AVX-512 backward needs AVX512-BF16 and a build with the AVX-512 kernels")
    backend_rows.set_cpu_isa(request.param)
    yield request.param
    _isa(backend_rows.DEFAULT_ISA)


def make(b, h, hkv, sq, sk, d, dtype, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, sk, dv or d, generator=g, dtype=torch.float64)
    dout = torch.randn(b, h, sq, dv or d, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q, k, v, dout))


def args(q, causal=False, window=(-1, -1), attn_mask=None, kpm=None, cu=(None, None), dropout_p=0.0, seed=None,
         scale=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return AttentionArgs(attn_mask, kpm, cu[0], cu[1], 0, 0, causal, scale, window[0], window[1], dropout_p, seed)


def forward(q, k, v, a):
    """out and lse as the backward gets them: from the reference, in q's dtype (fp32 lse)."""
    return attention_forward_ref(q, k, v, a)


def backward(dout, q, k, v, a):
    out, lse = forward(q, k, v, a)
    return cpp.backward(dout, q, k, v, out, lse, a)


def check_grads(dout, q, k, v, a, grads):
    truth = attention_backward_ref(dout.double(), q.double(), k.double(), v.double(), None, None, a)
    base = attention_backward_ref(dout, q, k, v, None, None, a, upcast=False)
    for name, ours, b, t in zip(("dq", "dk", "dv"), grads, base, truth):
        assert ours.shape == t.shape and ours.dtype == q.dtype, name
        assert torch.isfinite(ours).all(), f"{name}: not finite"
        e = (ours.double() - t).abs().max().item()
        eb = (b.double() - t).abs().max().item()
        bound = GRAD_FACTOR * eb + floor(t, q.dtype, grad=True)
        assert e <= bound, f"{name}: error {e:.3g} > {GRAD_FACTOR} x same-dtype error {eb:.3g} + floor = {bound:.3g}"


# ----------------------------------------------------------------------------- numerics

LARGE = {  # name -> (B, H, Hkv, Sq, Sk, D, Dv, features): many query and key tiles each
    "full-gqa": (1, 4, 1, 700, 900, 64, 64, {}),
    "causal-sq<sk": (1, 4, 2, 333, 1030, 64, 64, dict(causal=True)),
    "causal-sq>sk": (2, 2, 2, 517, 260, 32, 32, dict(causal=True)),
    "window-dv": (1, 6, 3, 640, 640, 80, 48, dict(window=(100, 20))),
    "window-right-only": (1, 2, 1, 300, 450, 59, 59, dict(window=(-1, 70))),
    "d256": (1, 2, 2, 200, 300, 256, 256, dict(causal=True)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", list(LARGE))
def test_large_shapes(case, dtype):
    b, h, hkv, sq, sk, d, dv, kw = LARGE[case]
    q, k, v, dout = make(b, h, hkv, sq, sk, d, dtype, dv=dv)
    a = args(q, **kw)
    check_grads(dout, q, k, v, a, backward(dout, q, k, v, a))


FEATURES = {
    "causal-dropout": dict(causal=True, dropout_p=0.3, seed=torch.tensor(2**32 - 3)),
    "kpm-window": dict(window=(12, 12)),
    "float-mask-bcast": dict(),
    "scale": dict(scale=0.05),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_features_both_isas(isa, feature, dtype):
    q, k, v, dout = make(2, 4, 2, 77, 150, 40, dtype)
    kw = dict(FEATURES[feature])
    if feature == "kpm-window":
        kw["kpm"] = torch.arange(150)[None, :] < torch.tensor([[150], [90]])
    if feature == "float-mask-bcast":  # (Sk,): strides 0 on B, H and Sq
        kw["attn_mask"] = torch.randn(150, generator=torch.Generator().manual_seed(4)).to(dtype)
    a = args(q, **kw)
    check_grads(dout, q, k, v, a, backward(dout, q, k, v, a))


def test_varlen_packed_layout(isa):
    """Packed sequences in the (total, H, D) layout viewed as (1, H, total, D), with a sequence
    of no queries; rows outside every sequence get zero gradients."""
    lens_q, lens_k = [70, 0, 1, 130, 9], [65, 4, 3, 200, 9]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    tq, tk = sum(lens_q) + 3, sum(lens_k) + 5  # trailing rows belong to no sequence
    q, k, v, dout = make(1, 4, 2, tq, tk, 64, torch.float32)
    q, k, v, dout = (t[0].transpose(0, 1).contiguous().transpose(0, 1)[None] for t in (q, k, v, dout))
    for causal in (False, True):
        a = args(q, causal=causal, cu=(cu_q, cu_k))
        out, lse = attention_forward_ref(q, k, v, a)
        dq, dk, dv = cpp.backward(dout, q, k, v, out, lse, a)
        truth = attention_backward_ref(dout.double(), q.double(), k.double(), v.double(), None, None, a)
        for ours, t in zip((dq, dk, dv), truth):
            torch.testing.assert_close(ours.double(), t, rtol=2e-4, atol=2e-5)
        assert (dq[:, :, -3:] == 0).all() and (dk[:, :, -5:] == 0).all() and (dv[:, :, -5:] == 0).all()
        assert dq.stride() == q.stride(), "gradients keep the inputs' layout"


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_gqa_sums_over_the_group(dtype):
    """dk/dv of a kv head are the sums of what its query heads would give it alone."""
    q, k, v, dout = make(1, 8, 2, 150, 170, 64, dtype)
    a = args(q, causal=True)
    dq, dk, dv = backward(dout, q, k, v, a)
    ke, ve = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
    dq_e, dk_e, dv_e = backward(dout, q, ke, ve, a)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(dq.float(), dq_e.float(), **tol)  # summed in another order
    torch.testing.assert_close(dk.float(), dk_e.float().view(1, 2, 4, 170, 64).sum(2), **tol)
    torch.testing.assert_close(dv.float(), dv_e.float().view(1, 2, 4, 170, 64).sum(2), **tol)


def test_dropout_gradient_matches_the_forward_mask(isa):
    """With v = identity the forward's output is the dropped-out, rescaled probabilities
    themselves; dv of any v must then be that matrix transposed times dout."""
    q, k, v, dout = make(2, 3, 3, 50, 64, 64, torch.float32)
    a = args(q, causal=True, dropout_p=0.4, seed=torch.tensor(77))
    eye = torch.eye(64)[None, None].expand(2, 3, 64, 64).contiguous()
    p_dropped, _ = cpp.forward(q, k, eye, a)  # (B, H, Sq, Sk)
    out, lse = cpp.forward(q, k, v, a)
    seen = torch.ones(50, 64, dtype=torch.bool).tril(64 - 50)
    kept = (p_dropped[..., seen] > 0).float().mean().item()
    assert 0.5 < kept < 0.7
    _, _, dv = cpp.backward(dout, q, k, v, out, lse, a)
    torch.testing.assert_close(dv, p_dropped.transpose(-1, -2) @ dout, rtol=1e-5, atol=1e-5)


def test_queries_and_keys_that_see_nothing_get_zero_gradients(isa):
    q, k, v, dout = make(2, 2, 2, 40, 30, 32, torch.bfloat16)
    kpm = torch.ones(2, 30, dtype=torch.bool)
    kpm[1] = False  # batch 1: no query sees a key
    kpm[0, 20:] = False  # batch 0: keys 20.. are padding
    a = args(q, causal=True, kpm=kpm)  # causal with Sq > Sk: queries 0..9 see no key either
    dq, dk, dv = backward(dout, q, k, v, a)
    for t in (dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert (dq[0, :, :10] == 0).all()
    assert (dk[0, :, 20:] == 0).all() and (dv[0, :, 20:] == 0).all()
    assert dq[0, :, 10:].abs().sum() > 0 and dk[0, :, :20].abs().sum() > 0


def test_strided_inputs_give_the_same_bits():
    """Non-contiguous views (head-major / sequence-major layouts, a transposed dout) are read
    in place: the results are those of contiguous copies, bit for bit."""
    q, k, v, dout = make(2, 4, 2, 90, 110, 64, torch.bfloat16)
    a = args(q, causal=True)
    out, lse = forward(q, k, v, a)
    expected = cpp.backward(dout, q, k, v, out, lse, a)

    def seq_major(t):  # (B, S, H, D) memory viewed as (B, H, S, D)
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    got = cpp.backward(*(seq_major(t) for t in (dout, q, k, v, out)), lse, a)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


def test_thread_count_independent_and_deterministic():
    q, k, v, dout = make(1, 2, 1, 300, 400, 64, torch.float32)  # few kv heads: key chunks split
    a = args(q, causal=True, dropout_p=0.1, seed=torch.tensor(5))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 1):
            torch.set_num_threads(n)
            results.append(backward(dout, q, k, v, a))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


def test_empty_sequences():
    q, k, v, dout = make(1, 2, 2, 0, 7, 16, torch.float32)
    out, lse = torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0)
    dq, dk, dv = cpp.backward(dout, q, k, v, out, lse, args(q))
    assert dq.shape == q.shape and (dk == 0).all() and (dv == 0).all()
    q, k, v, dout = make(1, 2, 2, 5, 0, 16, torch.float32)
    out, lse = torch.zeros(1, 2, 5, 16), torch.full((1, 2, 5), float("-inf"))
    dq, dk, dv = cpp.backward(dout, q, k, v, out, lse, args(q))
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape
