"""Every entry of the Triton attention kernels' tile tables, forced one at a time, on a GPU.

The autotuner may pick any entry of a table for a head dim (the fastest on that GPU, for that
shape), so each must compute the same function: the table tests (test_attention.py) see only
the entries the autotuner happened to choose. Shapes are not multiples of any tile, causal
and full, grouped-query heads; the checks are test_attention's (error vs the fp64 truth within
a factor of the same-dtype error plus the floor). GPU only: in the interpreter the tiles are
fixed (INTERPRET_TILES) and there is no autotuner.
"""

from __future__ import annotations

import pytest
import torch

from test_attention import GPU, compare, make_qkv

common = pytest.importorskip("fastarch.kernels.attn.common")
from fastarch.kernels.attn import backward, decode, forward  # noqa: E402

KERNELS = {  # kernel name -> (its table, the pass that runs it)
    "_attn_fwd_kernel": (forward._FWD_CONFIGS, "fwd"),
    "_attn_bwd_dkdv_kernel": (backward._DKDV_CONFIGS, "bwd"),
    "_attn_bwd_dq_kernel": (backward._DQ_CONFIGS, "bwd"),
    "_decode_split_kernel": (decode._DECODE_CONFIGS, "decode"),
}
CASES = [
    pytest.param(name, d, entry, marks=GPU, id=f"{name.strip('_')}-d{d}-{'x'.join(map(str, entry))}")
    for name, (table, _) in KERNELS.items()
    for d, entries in table.items()
    for entry in entries
]


@pytest.fixture
def forced(monkeypatch):
    """Forces a kernel's tiles; clears every autotuner's cached choice before and after."""
    autotuners = [forward._fwd_kernel, backward._dkdv_kernel, backward._dq_kernel, decode._decode_kernel]

    def force(name, entry):
        monkeypatch.setitem(common.FORCED_TILES, name, entry)
        monkeypatch.setattr(common, "AUTOTUNE", False)  # the other kernels: their first entry, untuned
        for a in autotuners:
            a.cache.clear()

    yield force
    for a in autotuners:
        a.cache.clear()


@pytest.mark.parametrize("name,d,entry", CASES)
def test_every_tile_entry(name, d, entry, forced):
    forced(name, entry)
    table, kind = KERNELS[name]
    dtype = torch.float16
    if kind == "decode":
        from fastarch import ops
        from fastarch.ops.attn.reference import attention_forward_ref
        from test_attention import FORWARD_FACTOR, check, kernel_args

        g = torch.Generator().manual_seed(1)
        k_cache, v_cache = (torch.randn(2, 2, 700, d, generator=g).to(dtype).cuda() for _ in range(2))
        q = torch.randn(2, 8, 1, d, generator=g).to(dtype).cuda()
        seqlens = torch.tensor([700, 333], dtype=torch.int32, device="cuda")
        out = ops.attention_decode(q, k_cache, v_cache, seqlens, backend="triton")
        scale = q.shape[-1] ** -0.5  # one split (the direct path) gives the same answer
        single, _ = decode.attention_decode(q, k_cache, v_cache, seqlens, True, scale, -1, num_splits=1)
        torch.testing.assert_close(single, out, rtol=0, atol=2e-3)  # fp32 sums in another order: 1-2 fp16 ulps at 1
        for b in range(2):
            n = int(seqlens[b])
            seq = (q[b : b + 1], k_cache[b : b + 1, :, :n], v_cache[b : b + 1, :, :n])
            args = kernel_args(*seq, causal=True)
            truth, _ = attention_forward_ref(*(t.double() for t in seq), args)
            base, _ = attention_forward_ref(*seq, args, upcast=False)
            check(f"decode sequence {b}", out[b : b + 1], base, truth, dtype, FORWARD_FACTOR)
        return
    for causal in (False, True):
        q, k, v = make_qkv(2, 4, 2, 301, 437, d, dtype, "cuda")
        compare("triton", q, k, v, dtype, grads=kind == "bwd", causal=causal)
