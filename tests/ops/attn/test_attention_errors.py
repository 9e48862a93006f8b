"""Bad input to the attention ops: each a clear error naming the argument."""

from __future__ import annotations

import pytest
import torch

import fastarch
from fastarch import ops


def qkv(b=2, h=4, hkv=2, sq=5, sk=7, d=16, dtype=torch.float32):
    return torch.randn(b, h, sq, d, dtype=dtype), torch.randn(b, hkv, sk, d, dtype=dtype), torch.randn(b, hkv, sk, d, dtype=dtype)


q, k, v = qkv()
CASES = {
    "q-3d": (lambda: ops.attention(q[0], k, v), ValueError, r"q must be 4-D \(batch, heads, seq, head_dim\)"),
    "batch-mismatch": (lambda: ops.attention(q, k[:1], v[:1]), ValueError, "same batch size"),
    "heads-not-divisible": (lambda: ops.attention(torch.randn(2, 3, 5, 16), k, v), ValueError, "3 heads must be a multiple of k's and v's 2 heads"),
    "kv-heads-mismatch": (lambda: ops.attention(q, k, v[:, :1]), ValueError, "k and v must have the same number of heads"),
    "kv-seq-mismatch": (lambda: ops.attention(q, k, v[:, :, :3]), ValueError, "k and v must have the same sequence length"),
    "head-dim-mismatch": (lambda: ops.attention(q, k[..., :8], v), ValueError, "q and k must have the same head dim"),
    "mixed-dtypes": (lambda: ops.attention(q, k.half(), v), TypeError, "k must have q's dtype torch.float32"),
    "integer-dtype": (lambda: ops.attention(q.long(), k, v), TypeError, "q must be float16, bfloat16, float32 or float64"),
    "mixed-devices": (lambda: ops.attention(q, k.to("meta"), v), ValueError, "k must be on q's device cpu"),
    "mask-shape": (lambda: ops.attention(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool)), ValueError, r"attn_mask of shape \(5, 6\) does not broadcast to"),
    "mask-dtype": (lambda: ops.attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.float16)), TypeError, "attn_mask must be bool or have q's dtype"),
    "kpm-shape": (lambda: ops.attention(q, k, v, key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, r"key_padding_mask must be bool of shape \(batch, Sk\) = \(2, 7\)"),
    "kpm-dtype": (lambda: ops.attention(q, k, v, key_padding_mask=torch.ones(2, 7)), ValueError, "key_padding_mask must be bool"),
    "window": (lambda: ops.attention(q, k, v, window=-3), ValueError, r"window must be an int in \[0, 2\*\*63\).*got -3"),
    "window-pair": (lambda: ops.attention(q, k, v, window=(1, 2, 3)), ValueError, "window must be an int >= 0 or a pair"),
    "dropout": (lambda: ops.attention(q, k, v, dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]"),
    "dropout-negative": (lambda: ops.attention(q, k, v, dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\]"),
    "scale": (lambda: ops.attention(q, k, v, scale=float("nan")), ValueError, "scale must be a finite float"),
    "cu-missing": (lambda: ops.attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32)), ValueError, "need both cu_seqlens_q and cu_seqlens_k"),
    "cu-dtype": (lambda: ops.attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_seqlens_q=torch.tensor([0, 5]), cu_seqlens_k=torch.tensor([0, 7])), ValueError, "cu_seqlens_q must be a 1-D int32 tensor"),
    "cu-values": (lambda: ops.attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_seqlens_q=torch.tensor([0, 4], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32)), ValueError, "must rise from 0 to the packed length 5"),
    "head-dim-zero": (lambda: ops.attention(*qkv(d=0)), ValueError, "q's head dim must be at least 1"),
    "mask-device": (lambda: ops.attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool, device="meta")), ValueError, "attn_mask must be on q's device cpu"),
    "cu-count": (lambda: ops.attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32)), ValueError, "must hold the same number of sequences"),
    "not-a-tensor": (lambda: ops.attention([1.0], k, v), TypeError, "q must be a torch.Tensor"),
    "unknown-backend": (lambda: ops.attention(q, k, v, backend="flash"), ValueError, "backend must be one of"),
    "decode-seqlens": (lambda: ops.attention_decode(q[:, :, :1], k, v, torch.tensor([3, 9], dtype=torch.int32)), ValueError, "cache_seqlens must be between 0 and the cache's 7 slots"),
    "decode-seqlens-dtype": (lambda: ops.attention_decode(q[:, :, :1], k, v, torch.tensor([3, 4])), ValueError, "cache_seqlens must be int32 of shape"),
    "decode-window-pair": (lambda: ops.attention_decode(q[:, :, :1], k, v, torch.tensor([3, 4], dtype=torch.int32), window=(2, 0)), ValueError, r"window must be an int \(keys to the left of each new token\)"),
    "append-kv-cache-dtypes": (lambda: ops.append_kv(k.clone(), v.half(), k[:, :, :1], v[:, :, :1].half(), torch.zeros(2, dtype=torch.int32)), TypeError, "v_cache must have k_cache's dtype"),
    "decode-cache-dtype": (lambda: ops.attention_decode(q[:, :, :1], k.half(), v, torch.tensor([3, 4], dtype=torch.int32)), TypeError, "k_cache must have q's dtype"),
    "max-seqlen-too-small": (lambda: ops.attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32), max_seqlen_k=6), ValueError, "max_seqlen_k is 6, but cu_seqlens_k holds a sequence of 7"),
    "max-seqlen-negative": (lambda: ops.attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32), max_seqlen_q=-1), ValueError, "max_seqlen_q must be an int >= 0"),
    "append-kv-too-long": (lambda: ops.append_kv(k.clone(), v.clone(), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16), torch.zeros(2, dtype=torch.int32)), ValueError, "k_new's 8 tokens do not fit the cache's 7 slots"),
    "append-kv-seqlens-device": (lambda: ops.append_kv(k.clone(), v.clone(), k[:, :, :1], v[:, :, :1], torch.zeros(2, dtype=torch.int32, device="meta")), ValueError, "cache_seqlens must be on k_cache's device cpu"),
    # an expanded cache: one write would land in every slot that shares the element
    "append-kv-expanded-cache": (lambda: ops.append_kv(torch.zeros(1, 2, 1, 16).expand(2, 2, 7, 16), v.clone(), k[:, :, :1], v[:, :, :1], torch.zeros(2, dtype=torch.int32)), ValueError, "k_cache must not hold elements that share memory"),
    "append-kv-leaf-cache": (lambda: ops.append_kv(k.clone(), v.clone().requires_grad_(), k[:, :, :1], v[:, :, :1], torch.zeros(2, dtype=torch.int32)), ValueError, "v_cache is a leaf tensor that requires grad"),
    "max-seqlen-unpacked": (lambda: ops.attention(q, k, v, max_seqlen_q=-7), ValueError, "max_seqlen_q and max_seqlen_k go with packed sequences"),
    "causal-string": (lambda: ops.attention(q, k, v, causal="no"), TypeError, "causal must be a bool, got 'no'"),
    "causal-tensor": (lambda: ops.attention(q, k, v, causal=torch.tensor([1, 0])), TypeError, "causal must be a bool"),
    "decode-causal-string": (lambda: ops.attention_decode(q[:, :, :1], k, v, torch.tensor([3, 4], dtype=torch.int32), causal="yes"), TypeError, "causal must be a bool"),
    "generator-type": (lambda: ops.attention(q, k, v, dropout_p=0.1, generator="x"), TypeError, "generator must be a torch.Generator or None, got str"),
    "scale-past-float": (lambda: ops.attention(q, k, v, scale=10**400), ValueError, "scale must be a finite float"),
    "window-past-int64": (lambda: ops.attention(q, k, v, window=2**64), ValueError, r"window must be an int in \[0, 2\*\*63\)"),
    "window-pair-past-int64": (lambda: ops.attention(q, k, v, window=(2**63, 0)), ValueError, "window must be an int >= 0 or a pair"),
    # the kernels give the mask no gradient: a mask that wants one is refused, not ignored
    "mask-requires-grad": (lambda: ops.attention(q, k, v, attn_mask=torch.zeros(5, 7, requires_grad=True)), ValueError, r"attn_mask requires grad.*attn_mask.detach\(\)"),
}


def test_mask_requiring_grad_runs_without_grad_mode():
    """Without grad mode nothing is dropped: the mask runs as a constant."""
    mask = torch.randn(5, 7, requires_grad=True)
    with torch.no_grad():
        out = ops.attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ops.attention(q, k, v, attn_mask=mask.detach()), rtol=0, atol=0)


@pytest.mark.parametrize("flag", [True, False, 1, 0])
def test_causal_takes_bools_and_zero_one(flag):
    torch.testing.assert_close(ops.attention(q, k, v, causal=flag), ops.attention(q, k, v, causal=bool(flag)), rtol=0, atol=0)

k4, v4 = torch.randn(2, 4, 7, 16), torch.randn(2, 4, 7, 16)

# scaled_dot_product_attention stands in for torch's: its errors are RuntimeErrors, as torch's
# are (the same calls raise a RuntimeError in torch.nn.functional), and name query/key/value.
SDPA_CASES = {
    "causal-and-mask": (dict(attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True), q, q, q, "attn_mask must be None when is_causal=True"),
    "head-dim-mismatch": ({}, q, k4[..., :8], v4, "query and key must have the same head dim"),
    "dtype-mismatch": ({}, q, k4.double(), v4, "key must have query's dtype"),
    "heads-without-gqa": ({}, torch.randn(2, 4, 5, 16), torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16), "batch dims of query, key and value must broadcast"),
    "heads-gqa-not-divisible": (dict(enable_gqa=True), torch.randn(2, 4, 5, 16), torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16), "query's 4 heads must be a multiple"),
    "batch-mismatch": ({}, q, torch.randn(3, 4, 7, 16), torch.randn(3, 4, 7, 16), "must broadcast"),
    "mask-shape": (dict(attn_mask=torch.ones(5, 6, dtype=torch.bool)), q, k4, v4, "attn_mask of shape"),
    "dropout": (dict(dropout_p=1.5), q, q, q, r"dropout_p must be in \[0, 1\]"),
    "one-dim": ({}, torch.randn(16), torch.randn(16), torch.randn(16), "query must have at least 2 dims"),
    "integer": ({}, q.int(), q.int(), q.int(), "query must be float16"),
    "mask-dtype": (dict(attn_mask=torch.ones(5, 5, dtype=torch.int32)), q, q, q, "attn_mask must be bool or have query's dtype"),
}


@pytest.mark.parametrize("name", list(SDPA_CASES))
def test_sdpa_bad_input_raises_what_torch_raises(name):
    kwargs, query, key, value, pattern = SDPA_CASES[name]
    with pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(query, key, value, **kwargs)
    with pytest.raises(RuntimeError, match=pattern):
        ops.scaled_dot_product_attention(query, key, value, **kwargs)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name):
    call, error, pattern = CASES[name]
    with pytest.raises(error, match=pattern):
        call()


def test_forced_backend_lists_reasons():
    with pytest.raises(fastarch.NoBackendError) as info:
        ops.attention(q.double(), k.double(), v.double(), backend="cuda")
    text = str(info.value)
    assert "fastarch.attention: backend 'cuda' cannot run" in text and "reference: supported" in text
