"""append_kv on every backend: the caches after the write equal what the reference (plain
indexing) writes, bit for bit (a copy), for every dtype, several appended lengths, caches
that are views of larger buffers, values' head dim != keys'; slots beyond the cache are an
error."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import backend_rows  # tests/backend_rows.py
from fastarch import ops
from fastarch.ops.attn.args import AttentionProblem
from fastarch.ops.attn.reference import append_kv_ref

BACKENDS = backend_rows.rows("append_kv")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def caches(b, hkv, s_max, d, dv, dtype, device, strided):
    g = torch.Generator().manual_seed(1)
    if strided:  # (B, S_max, Hkv, D) memory viewed as (B, Hkv, S_max, D), inside a wider buffer
        k = torch.randn(b, s_max, hkv, d + 5, generator=g)[..., :d].transpose(1, 2)
        v = torch.randn(b, s_max, hkv, dv + 3, generator=g)[..., :dv].transpose(1, 2)
    else:
        k, v = torch.randn(b, hkv, s_max, d, generator=g), torch.randn(b, hkv, s_max, dv, generator=g)
    return k.to(dtype).to(device), v.to(dtype).to(device)


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("new", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_matches_the_reference(backend, device, dtype, new, strided):
    k_cache, v_cache = caches(3, 2, 20, 16, 24, dtype, device, strided)
    k_new = torch.randn(3, 2, new, 16).to(dtype).to(device)
    v_new = torch.randn(3, 2, new, 24).to(dtype).to(device).transpose(2, 3).contiguous().transpose(2, 3)[..., :24]
    backend_rows.require("append_kv", backend, AttentionProblem.of(k_new, k_cache, v_cache, decode=True))
    lens = torch.tensor([0, 7, 20 - new], dtype=torch.int32, device=device)  # the last fills the cache
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    append_kv_ref(expected_k, expected_v, k_new, v_new, lens)
    ops.append_kv(k_cache, v_cache, k_new, v_new, lens, backend=backend)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    assert torch.equal(k_cache[1, :, 7 : 7 + new], k_new[1])  # (the reference itself)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_slots_beyond_the_cache_are_an_error(backend, device):
    k_cache, v_cache = caches(2, 2, 10, 4, 4, torch.float32, device, False)
    k_new, v_new = torch.randn(2, 2, 3, 4, device=device), torch.randn(2, 2, 3, 4, device=device)
    backend_rows.require("append_kv", backend, AttentionProblem.of(k_new, k_cache, v_cache, decode=True))
    before = k_cache.clone()
    if device == "cpu":
        with pytest.raises(ValueError, match="cache_seqlens must be between 0 and 7: the cache's 10 slots less the 3 new"):
            ops.append_kv(k_cache, v_cache, k_new, v_new, torch.tensor([0, 8], dtype=torch.int32), backend=backend)
        assert torch.equal(k_cache, before), "nothing is written when the call is refused"
    else:
        # a device-side assert (the host does not wait for the GPU to read the lengths); it leaves
        # the CUDA context unusable, so it runs in a process of its own
        code = (
            "import torch, fastarch\n"
            "k, v = torch.zeros(2, 2, 10, 4, device='cuda'), torch.zeros(2, 2, 10, 4, device='cuda')\n"
            "new = torch.randn(2, 2, 3, 4, device='cuda')\n"
            "lens = torch.tensor([0, 8], dtype=torch.int32, device='cuda')\n"
            f"fastarch.ops.append_kv(k, v, new, new, lens, backend={backend!r})\n"
            "torch.cuda.synchronize()\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.returncode != 0 and "assert" in out.stderr.lower(), out.stderr[-2000:]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_lengths(backend, device):
    """cache_seqlens as a strided view (every other element of a longer tensor)."""
    k_cache, v_cache = caches(2, 2, 10, 8, 8, torch.float32, device, False)
    k_new, v_new = torch.randn(2, 2, 1, 8, device=device), torch.randn(2, 2, 1, 8, device=device)
    backend_rows.require("append_kv", backend, AttentionProblem.of(k_new, k_cache, v_cache, decode=True))
    lens = torch.tensor([4, 99, 6, 99], dtype=torch.int32, device=device)[::2]
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    append_kv_ref(expected_k, expected_v, k_new, v_new, lens.contiguous())
    ops.append_kv(k_cache, v_cache, k_new, v_new, lens, backend=backend)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_caches_of_different_dtypes_are_refused():
    """k and v caches share a dtype (a kernel copies both with one element size)."""
    k_cache, v_cache = torch.zeros(2, 2, 10, 4), torch.zeros(2, 2, 10, 4, dtype=torch.bfloat16)
    new_k, new_v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4).bfloat16()
    with pytest.raises(TypeError, match="v_cache must have k_cache's dtype torch.float32"):
        ops.append_kv(k_cache, v_cache, new_k, new_v, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="v_cache must have k_cache's dtype"):
        torch.ops.fastarch._append_kv(k_cache, v_cache, new_k, new_v, torch.zeros(2, dtype=torch.int32))


def test_kernel_op_refuses_bad_lengths_itself():
    """Called directly (torch.ops.fastarch._append_kv), the CPU kernel checks the lengths too."""
    k_cache, v_cache = torch.zeros(2, 2, 10, 4), torch.zeros(2, 2, 10, 4)
    k_new = torch.randn(2, 2, 3, 4)
    with pytest.raises(RuntimeError, match=r"cache_seqlens\[1\] = 8 leaves no room for 3 tokens"):
        torch.ops.fastarch._append_kv(k_cache, v_cache, k_new, k_new, torch.tensor([0, 8], dtype=torch.int32))
