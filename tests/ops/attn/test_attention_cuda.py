"""CUDA-specific attention cases beyond the generic table of test_attention.py: what the cuda
backend declines (and why), every compiled head dim and the dims that run on the next one up,
long sequences against torch's SDPA, split-K decoding over a long cache, and input layouts
that take the kernels' copy path (head-dim slices, the packed layout).

Numerics as in test_attention.py: the error against an fp64 (or fp32) reference must stay
within FACTOR x the error of the same computation in the inputs' dtype, plus a floor."""

from __future__ import annotations

import math

import pytest
import torch

from attention_tolerance import floor  # tests/ops/attn/attention_tolerance.py
from fastarch import ops, registry
from fastarch.ops.attn import backends
from fastarch.ops.attn.args import AttentionArgs, AttentionProblem
from fastarch.ops.attn.reference import attention_backward_ref, attention_decode_ref, attention_forward_ref

GPU = pytest.mark.gpu
FACTOR = {"out": 2.0, "grad": 3.0}


def _problem(dtype=torch.float16, d=64, dv=None, device="cuda") -> AttentionProblem:
    return AttentionProblem(device, dtype, d, dv or d, 8, 2)


@pytest.mark.parametrize(
    "problem,reason",
    [
        (_problem(d=59), "head dim 59 is not a multiple of 8"),
        (_problem(d=264), "head dim 264 is not a multiple of 8 up to 256"),
        (_problem(d=64, dv=128), "values' head dim 128 differs"),
        (_problem(dtype=torch.float32), "dtype torch.float32 is not supported"),
        (_problem(device="cpu"), "input is on cpu"),
    ],
    ids=["d59", "d264", "dv-differs", "fp32", "cpu"],
)
def test_supports_declines_with_a_reason(problem, reason):
    why = backends.cuda_supports(problem)
    assert why is not None and reason in why, why


@pytest.mark.parametrize("d", [8, 16, 32, 64, 128, 256])
def test_supports_takes_multiples_of_8(d):
    assert backends.cuda_supports(_problem(d=d, device="cpu")) is not None  # device first
    why = backends.cuda_supports(_problem(d=d))
    assert why is None or (d > 128 and "shared memory" in why), why  # (a GPU with too little of it)


def _err(a, ref) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def _check(name, ours, base, truth, dtype, factor):
    assert torch.isfinite(ours).all(), f"{name}: not finite"
    e, eb = _err(ours, truth), _err(base, truth)
    bound = factor * eb + floor(truth, dtype, grad=name in ("dq", "dk", "dv"))
    assert e <= bound, f"{name}: error {e:.3g} > {factor} x same-dtype error {eb:.3g} + floor = {bound:.3g}"


def _qkv(b, h, hkv, sq, sk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(*shape, generator=g).to(dtype).cuda()
        for shape in ((b, h, sq, d), (b, hkv, sk, d), (b, hkv, sk, d))
    )


def _forward_backward(q, k, v, **kw):
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = ops.attention(qs, ks, vs, backend="cuda", **kw)
    dout = torch.randn_like(out)
    out.backward(dout)
    return out, (qs.grad, ks.grad, vs.grad), dout


def _reference(q, k, v, dout, causal, upcast):
    """out, (dq, dk, dv) of the reference: in fp64 (upcast from fp64 inputs), or entirely
    in the inputs' dtype (upcast=False: PyTorch's error in that dtype, the yardstick)."""
    args = AttentionArgs(causal=causal, scale=1 / math.sqrt(q.shape[-1]))
    out, lse = attention_forward_ref(q, k, v, args, upcast=upcast)
    return out, attention_backward_ref(dout, q, k, v, out, lse, args, upcast=upcast)


# Every compiled head dim (32, 64, 128, 256) and dims that run zero-padded on the next one.
@GPU
@pytest.mark.parametrize("d", [8, 24, 32, 40, 64, 96, 128, 136, 200, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_head_dims(d, dtype):
    q, k, v = _qkv(2, 4, 2, 173, 211, d, dtype, seed=d)
    for causal in (False, True):
        out, grads, dout = _forward_backward(q, k, v, causal=causal)
        truth, t_grads = _reference(q.double(), k.double(), v.double(), dout.double(), causal, True)
        base, b_grads = _reference(q, k, v, dout, causal, False)
        _check("out", out, base, truth, dtype, FACTOR["out"])
        for name, a, b, t in zip(("dq", "dk", "dv"), grads, b_grads, t_grads):
            _check(name, a, b, t, dtype, FACTOR["grad"])


# Long sequences against torch's SDPA (its flash / efficient kernels), judged against SDPA in
# fp32: ours must be as close as SDPA in the same dtype.
@GPU
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
def test_long_sequences_match_sdpa(d, dtype, causal):
    S = 4096
    q, k, v = _qkv(1, 8, 8, S, S, d, dtype, seed=1)
    out, grads, dout = _forward_backward(q, k, v, causal=causal)

    def sdpa(t_dtype):
        qs, ks, vs = (t.detach().clone().to(t_dtype).requires_grad_() for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
        o.backward(dout.to(t_dtype))
        return o, (qs.grad, ks.grad, vs.grad)

    truth, t_grads = sdpa(torch.float32)
    base, b_grads = sdpa(dtype)
    _check("out", out, base, truth, dtype, FACTOR["out"])
    for name, a, b, t in zip(("dq", "dk", "dv"), grads, b_grads, t_grads):
        _check(name, a, b, t, dtype, FACTOR["grad"] * math.sqrt(S / 1024))


@GPU
@pytest.mark.parametrize("d", [64, 128, 256])
def test_decode_long_cache_split_k(d):
    """A long cache and a small batch: decoding splits the cache (split-K) and combines."""
    dtype = torch.float16
    B, H, Hkv, S_max, new = 2, 8, 2, 8192, 1
    g = torch.Generator().manual_seed(4)
    k_cache = torch.randn(B, Hkv, S_max, d, generator=g).to(dtype).cuda()
    v_cache = torch.randn(B, Hkv, S_max, d, generator=g).to(dtype).cuda()
    q = torch.randn(B, H, new, d, generator=g).to(dtype).cuda()
    seqlens = torch.tensor([8000, 37], dtype=torch.int32, device="cuda")
    for window in (None, 1000):
        out, lse = ops.attention_decode(q, k_cache, v_cache, seqlens, window=window, backend="cuda", return_lse=True)
        args = (seqlens.cpu(), True, 1 / math.sqrt(d), -1 if window is None else window)
        truth, t_lse = attention_decode_ref(q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu(), *args)
        base, _ = attention_decode_ref(q.cpu(), k_cache.cpu(), v_cache.cpu(), *args)
        _check("out", out.cpu(), base, truth, dtype, FACTOR["out"])
        assert (lse.cpu().double() - t_lse).abs().max() < 1e-3


@GPU
def test_layouts_strided_and_packed():
    """A head-dim slice of a wider tensor (rows not 16-byte aligned: copied), and the packed
    (total, H, D) layout, whose output keeps q's layout."""
    dtype = torch.float16
    wide = torch.randn(2, 4, 100, 72, dtype=dtype, device="cuda")
    q = wide[..., 4:68]
    k, v = torch.randn(2, 2, 2, 90, 64, dtype=dtype, device="cuda").unbind(0)
    out = ops.attention(q, k, v, causal=True, backend="cuda")
    expected = ops.attention(q.contiguous(), k, v, causal=True, backend="cuda")
    assert torch.equal(out, expected)

    lens = [5, 0, 33, 64]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    qp = torch.randn(sum(lens), 4, 64, dtype=dtype, device="cuda")
    kp, vp = torch.randn(2, sum(lens), 2, 64, dtype=dtype, device="cuda").unbind(0)
    packed = ops.attention(qp, kp, vp, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, backend="cuda")
    assert packed.shape == qp.shape and packed.stride() == qp.stride()
    for n in range(len(lens)):
        a, b = cu[n].item(), cu[n + 1].item()
        if b == a:
            continue
        one = ops.attention(qp[a:b].transpose(0, 1)[None], kp[a:b].transpose(0, 1)[None], vp[a:b].transpose(0, 1)[None],
                            causal=True, backend="cuda")
        torch.testing.assert_close(packed[a:b], one[0].transpose(0, 1), rtol=0, atol=0)


@GPU
def test_forcing_cuda_on_an_unsupported_head_dim_says_why():
    q, k, v = _qkv(1, 2, 2, 16, 16, 59, torch.float16)
    with pytest.raises(registry.NoBackendError, match="head dim 59 is not a multiple of 8"):
        ops.attention(q, k, v, backend="cuda")
