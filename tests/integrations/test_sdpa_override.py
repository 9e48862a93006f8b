"""fastarch.sdpa_override(): torch.nn.functional.scaled_dot_product_attention runs fastarch inside
the block and is torch's again after it (also when the block raises; blocks nest); calls
fastarch does not run go to torch's own function, with torch's results and torch's errors;
a function compiled inside the block gives the right answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dropin_tolerance import assert_close  # tests/integrations/dropin_tolerance.py

import fastarch
from fastarch import override

TORCH_SDPA = F.scaled_dot_product_attention


def _qkv(dtype=torch.float32, b=2, h=4, hkv=4, sq=37, sk=53, d=24):
    return (torch.randn(b, h, sq, d, dtype=dtype), torch.randn(b, hkv, sk, d, dtype=dtype),
            torch.randn(b, hkv, sk, d, dtype=dtype))


def test_patches_and_restores():
    assert F.scaled_dot_product_attention is TORCH_SDPA
    with fastarch.sdpa_override():
        assert F.scaled_dot_product_attention is override.scaled_dot_product_attention
        with fastarch.sdpa_override():
            assert F.scaled_dot_product_attention is override.scaled_dot_product_attention
        assert F.scaled_dot_product_attention is override.scaled_dot_product_attention
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_restores_when_the_block_raises():
    with pytest.raises(KeyError):
        with fastarch.sdpa_override():
            raise KeyError("inside")
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_restores_what_was_there_before():
    def other(*args, **kwargs):
        return TORCH_SDPA(*args, **kwargs)

    F.scaled_dot_product_attention = other
    try:
        with fastarch.sdpa_override():
            pass
        assert F.scaled_dot_product_attention is other
    finally:
        F.scaled_dot_product_attention = TORCH_SDPA


CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "causal-square": dict(is_causal=True, sk=37),
    "bool-mask": dict(mask="bool"),
    "float-mask": dict(mask="float"),
    "gqa": dict(hkv=2, enable_gqa=True),
    "scale": dict(scale=0.3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_runs_fastarch_with_torch_semantics(case, dtype):
    c = dict(CASES[case])
    mask_kind = c.pop("mask", None)
    kw = {k: c.pop(k) for k in ("is_causal", "enable_gqa", "scale") if k in c}
    q, k, v = _qkv(dtype, **c)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(q.shape[0], 1, q.shape[2], k.shape[2]) > 0.3
        mask[..., 0] = True  # every query sees a key (torch gives NaN for a row that sees none)
    elif mask_kind == "float":
        mask = torch.randn(q.shape[2], k.shape[2]).to(dtype)
    calls = []
    real = fastarch.ops.scaled_dot_product_attention
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(override.ops, "scaled_dot_product_attention", lambda *a: calls.append(1) or real(*a))
        with fastarch.sdpa_override():
            ours = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
    assert calls, "fastarch did not run"
    theirs = TORCH_SDPA(q, k, v, attn_mask=mask, **kw)
    exact = TORCH_SDPA(q.double(), k.double(), v.double(), attn_mask=mask if mask is None or mask.dtype == torch.bool
                       else mask.double(), **kw)
    assert_close(ours, theirs, exact)


def _runs_torch(*args, **kwargs):
    """The override's result for a call it should leave to torch: bit-identical to torch's."""
    with fastarch.sdpa_override():
        ours = F.scaled_dot_product_attention(*args, **kwargs)
    torch.testing.assert_close(ours, TORCH_SDPA(*args, **kwargs), rtol=0, atol=0)


def test_fp64_goes_to_torch():
    _runs_torch(*_qkv(torch.float64))


def test_mask_needing_a_gradient_goes_to_torch():
    q, k, v = _qkv()
    bias = torch.randn(q.shape[2], k.shape[2], requires_grad=True)
    with fastarch.sdpa_override():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out.sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def test_float_mask_of_another_dtype_goes_to_torch():
    q, k, v = _qkv(torch.bfloat16)
    _runs_torch(q, k, v, attn_mask=torch.zeros(q.shape[2], k.shape[2]))


@pytest.mark.parametrize(
    "make",
    [
        lambda q, k, v: dict(query=q, key=k[..., :5], value=v),  # head dims differ
        lambda q, k, v: dict(query=q, key=k, value=v, attn_mask=torch.ones(3, 3, dtype=torch.bool)),
        lambda q, k, v: dict(query=q, key=k, value=v, is_causal=True, attn_mask=torch.ones(37, 53, dtype=torch.bool)),
        lambda q, k, v: dict(query=q, key=k[:, :3], value=v[:, :3]),  # heads without enable_gqa
        lambda q, k, v: dict(query=q, key=k, value=v.double()),
    ],
)
def test_torch_errors_stay_torch_errors(make):
    """What torch refuses, the override refuses with torch's own error; what a torch release
    accepts (2.11 takes is_causal with a mask, later ones refuse it) it answers as torch does."""
    q, k, v = _qkv()
    kwargs = make(q, k, v)
    try:
        theirs = TORCH_SDPA(**kwargs)
    except RuntimeError as error:
        with fastarch.sdpa_override(), pytest.raises(type(error)) as ours:
            F.scaled_dot_product_attention(**kwargs)
        assert str(ours.value) == str(error)
    else:
        with fastarch.sdpa_override():
            assert torch.equal(F.scaled_dot_product_attention(**kwargs), theirs)


def test_compiled_inside_the_block():
    torch._dynamo.reset()

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    q, k, v = _qkv(sk=37)
    with fastarch.sdpa_override():
        compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
        ours = compiled(q, k, v)
    torch.testing.assert_close(ours, attend(q, k, v), rtol=2e-5, atol=2e-5)
    # outside the block the same compiled function must not keep running the override's code
    torch.testing.assert_close(compiled(q, k, v), attend(q, k, v), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sq,hkv", [(1, 2), (5, 4), (40, 1)])
def test_attention_direct_is_the_op(device, dtype, sq, hkv):
    """attention_direct (the drop-in paths' call of the kernel without the op's Python) gives
    fastarch.ops.attention's bits on the same backend, a NaN included; it declines (None: the
    op runs) with autograd and for what the op would check or refuse."""
    torch.manual_seed(0)
    q, k, v = (t.to(device) for t in _qkv(dtype, h=4, hkv=hkv, sq=sq, sk=29, d=16))
    q[0, 1, 0, 3] = float("nan")
    backend = override.backend_for("attention", (device, dtype, 16, 16, 4, hkv) + (False,) * 6)
    with torch.no_grad():
        for scale in (None, 0.3):
            got = override.attention_direct(q, k, v, scale, None)
            want = fastarch.ops.attention(q, k, v, scale=scale, backend=backend)
            assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
            assert got[0, 1, 0].isnan().all() and not got[1].isnan().any()
        strided = torch.randn(*q.shape[:-1], 32, dtype=dtype, device=device)[..., ::2]  # last dim not contiguous
        three_heads = torch.randn(2, 3, 29, 16, dtype=dtype, device=device)  # 4 query heads do not share 3 key heads
        for args in [(q[:, :, :0], k, v), (q, k[:, :, :0], v[:, :, :0]), (strided, k, v), (q, k, v.double()),
                     (q[0], k[0], v[0]), (q, three_heads, three_heads), (q, k[:1], v[:1])]:
            assert override.attention_direct(*args, 0.3, None) is None, [tuple(a.shape) for a in args]
        assert override.attention_direct(q, k, v, float("inf"), None) is None
    assert override.attention_direct(q.requires_grad_(), k, v, 0.3, None) is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_attention_direct_is_the_op(device, dtype):
    """attention_direct on packed sequences (the unpadded encoder's: its own offsets, an empty
    sequence among them) gives fastarch.ops.attention's bits with the same offsets; it declines
    offsets of another dtype or device and a packed key axis of another length."""
    torch.manual_seed(0)
    lengths = [5, 0, 11, 1]
    cu = torch.tensor([0, 5, 5, 16, 17], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(17, h, 16, dtype=dtype, device=device) for h in (4, 2, 2))
    q[6, 1, 3] = float("nan")  # a query of the third sequence
    backend = override.backend_for("attention", (device, dtype, 16, 16, 4, 2, False, False, True, False, False, False))
    with torch.no_grad():
        got = override.attention_direct(q, k, v, 0.25, None, cu, max(lengths))
        want = fastarch.ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths),
                                      max_seqlen_k=max(lengths), scale=0.25, backend=backend)
        assert got.shape == (17, 4, 16) and torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
        assert got[6, 1].isnan().all() and not got[:5].isnan().any()
        for bad in [(cu.long(), 11), (cu.cpu() if device != "cpu" else cu.float(), 11), (cu, 0)]:
            assert override.attention_direct(q, k, v, 0.25, None, *bad) is None
        assert override.attention_direct(q, k[:16], v[:16], 0.25, None, cu, 11) is None
