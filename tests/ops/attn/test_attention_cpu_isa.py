"""The CPU attention kernels on each of their instruction-set paths: "avx512_bf16" (the
*_avx512.cpp kernels with vdpbf16ps, on x86 CPUs that have AVX-512 and AVX512-BF16; level
avx512, without AVX512-BF16, runs the same forward for fp32/fp16 and the portable backward:
tests/ops/attn/test_cpu_isa_levels.py), "avx2" (the portable C++ kernels built for AVX2 + FMA: x86
CPUs without AVX-512) and "generic" (the same built for the baseline: aarch64, older x86), each
forced with fastarch._C._set_cpu_isa. A path this
build or CPU cannot run is skipped with the reason. (The amx level's brgemm forward:
test_attention_cpu_brgemm.py.)

Numerics as test_attention.py judges them (its compare(): out, lse and the three gradients
against an fp64 reference, within FACTOR x the error of the same computation in the inputs'
dtype plus a floor), over dtypes, shapes (Sq != Sk, 1x1, odd head dims, head dims up to 512,
values' head dim != keys'), its FEATURES table, packed sequences, dropout and decode; then
the NaN contract (the lead's notes/nan.md), with the expected NaN pattern derived from which
queries see which keys.
"""

from __future__ import annotations

import math

import pytest
import torch

import backend_rows  # tests/backend_rows.py

from fastarch import _extension, ops
from fastarch.ops.attn import cpp as attention_kernels
from fastarch.ops.attn.reference import attention_decode_ref, attention_forward_ref, dropout_keep
from test_attention import FEATURES, FORWARD_FACTOR, LSE_TOL, check, compare, kernel_args, make_qkv

_C = _extension._C
pytestmark = pytest.mark.skipif(_C is None, reason=f"fastarch._C is not loaded: {_extension.LOAD_ERROR}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ids = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.fixture(params=["avx512_bf16", "avx2", "generic"])
def isa(request):
    """Forces one path of the CPU kernels for the test; automatic choice again afterwards."""
    try:
        _C._set_cpu_isa(request.param)
    except ValueError as e:  # not compiled in, or the CPU lacks it
        pytest.skip(f"the {request.param} kernels cannot run here: {e}")
    yield request.param
    _C._set_cpu_isa(backend_rows.DEFAULT_ISA)


def runs(isa: str, dtype: torch.dtype) -> None:
    """Every row runs the path it names: the fixture skips avx512_bf16 on a CPU without it."""


# ----------------------------------------------------------------------------- numerics

# (B, H, Hkv, Sq, Sk, D, Dv): single query and key, Sq != Sk both ways (causal with Sq > Sk
# leaves queries that see no key), odd head dims, the largest head dims, Dv != D, grouped-query
# heads, and more than one query and key block.
SHAPES = [
    (1, 2, 1, 1, 1, 64, 64),
    (2, 4, 2, 113, 203, 64, 64),
    (1, 2, 2, 200, 50, 59, 59),
    (1, 4, 1, 67, 75, 111, 111),
    (1, 2, 2, 70, 90, 256, 256),
    (1, 1, 1, 40, 70, 512, 512),
    (1, 2, 1, 50, 60, 48, 80),
    (1, 2, 2, 150, 170, 32, 32),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_shapes(isa, dtype, shape, causal):
    runs(isa, dtype)
    b, h, hkv, sq, sk, d, dv = shape
    q, k, v = make_qkv(b, h, hkv, sq, sk, d, dtype, "cpu", dv=dv)
    compare("cpu", q, k, v, dtype, causal=causal)


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_features(isa, dtype, feature):
    runs(isa, dtype)
    q, k, v = make_qkv(2, 4, 1 if "gqa" in feature else 4, 37, 45, 64, dtype, "cpu", seed=7)
    compare("cpu", q, k, v, dtype, **FEATURES[feature](q, k, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_varlen(isa, dtype):
    runs(isa, dtype)
    lens_q, lens_k = [5, 1, 17, 0, 33, 70], [7, 0, 17, 3, 20, 90]  # a sequence with queries and no key
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    g = torch.Generator().manual_seed(11)
    # the packed layout the public op makes: (total, H, D) viewed as (1, H, total, D)
    q = torch.randn(sum(lens_q), 4, 64, generator=g).to(dtype).permute(1, 0, 2)[None]
    k = torch.randn(sum(lens_k), 2, 64, generator=g).to(dtype).permute(1, 0, 2)[None]
    v = torch.randn(sum(lens_k), 2, 64, generator=g).to(dtype).permute(1, 0, 2)[None]
    for causal in (False, True):
        compare("cpu", q, k, v, dtype, causal=causal, cu_q=cu_q, cu_k=cu_k, window=(20, -1), dropout_p=0.1,
                seed=torch.tensor(3))


def test_dropout_mask_and_reproducibility(isa):
    """With q = 0 (uniform probabilities 1/Sk) and v = identity rows, out holds the kept,
    rescaled probabilities themselves: kept exactly where the reference's hash keeps them."""
    sq, sk, p = 64, 256, 0.25
    q = torch.zeros(1, 2, sq, 32)
    k = torch.randn(1, 2, sk, 32, generator=torch.Generator().manual_seed(1))
    v = torch.eye(sk)[None, None].expand(1, 2, sk, sk).contiguous()
    args = kernel_args(q, k, v, dropout_p=p, seed=torch.tensor(1234))
    out, _ = attention_kernels.forward(q, k, v, args)
    rows = (torch.arange(2)[:, None] * sq + torch.arange(sq)[None, :]).reshape(-1)
    keep = dropout_keep(1234, rows, torch.arange(sk), p).view(1, 2, sq, sk)
    assert torch.equal(out > 0, keep)
    torch.testing.assert_close(out[keep], torch.full_like(out[keep], 1 / (sk * (1 - p))), rtol=1e-6, atol=0)
    again, _ = attention_kernels.forward(q, k, v, args)
    assert torch.equal(out, again)
    other, _ = attention_kernels.forward(q, k, v, kernel_args(q, k, v, dropout_p=p, seed=torch.tensor(1235)))
    assert not torch.equal(out, other)
    # through the public op: the same generator state gives the same mask
    a = ops.attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(5), backend="cpu")
    b = ops.attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(5), backend="cpu")
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
@pytest.mark.parametrize(
    "B,H,Hkv,Sq,S,D,Dv", [(3, 8, 2, 1, 300, 64, 64), (2, 6, 1, 4, 500, 59, 59), (1, 4, 4, 7, 40, 32, 48),
                          (1, 2, 1, 2, 3000, 111, 111), (1, 2, 2, 3, 100, 512, 512)],
)
def test_decode(isa, dtype, B, H, Hkv, Sq, S, D, Dv):
    """attention_decode against the fp64 truth of attention over each sequence's filled cache
    (lengths from 0 to the whole cache; several chunks for the long one)."""
    runs(isa, dtype)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D + 8, generator=g).to(dtype)[..., :D]  # a row stride that is not D
    v = torch.randn(B, Hkv, S, Dv, generator=g).to(dtype)
    lens = torch.randint(0, S + 1, (B,), generator=g, dtype=torch.int32)
    lens[0] = S
    scale = 1 / math.sqrt(D)
    for causal, window in ((True, -1), (True, 25), (False, -1)):
        out, lse = attention_kernels.decode(q, k, v, lens, causal, scale, window)
        truth, truth_lse = attention_decode_ref(q.double(), k.double(), v.double(), lens, causal, scale, window)
        same, _ = attention_decode_ref(q, k, v, lens, causal, scale, window)
        check(f"decode causal={causal} window={window}", out, same, truth, dtype, FORWARD_FACTOR)
        seen = torch.isfinite(truth_lse)
        assert torch.equal(torch.isfinite(lse), seen) and (out[~seen] == 0).all()
        if seen.any():
            assert (lse.double()[seen] - truth_lse[seen]).abs().max() <= LSE_TOL[dtype] + 1e-6 * truth_lse[seen].abs().max()


def test_thread_count_independence(isa):
    q, k, v = make_qkv(2, 4, 2, 150, 170, 64, torch.float32, "cpu")
    dout = torch.randn(2, 4, 150, 64, generator=torch.Generator().manual_seed(2))
    args = kernel_args(q, k, v, causal=True, dropout_p=0.2, seed=torch.tensor(9))
    lens = torch.tensor([170, 99], dtype=torch.int32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            out, lse = attention_kernels.forward(q, k, v, args)
            grads = attention_kernels.backward(dout, q, k, v, out, lse, args)
            dec = attention_kernels.decode(q[:, :, :2], k, v, lens, True, 0.125, -1)
            results.append((out, lse, *grads, *dec))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- NaN contract


def _seen(sq, sk, causal):
    """bool (Sq, Sk): which keys each query sees (bottom-right aligned causal)."""
    i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
    return j <= i + (sk - sq) if causal else torch.ones(sq, sk, dtype=torch.bool)


@pytest.fixture
def nan_isa(isa):
    return isa


B, H, HKV, SQ, SK, D = 2, 4, 2, 90, 150, 32  # two query blocks, three key blocks; 2 query heads per kv head
GROUP = H // HKV


def _inputs(dtype):
    q, k, v = make_qkv(B, H, HKV, SQ, SK, D, dtype, "cpu", seed=4)
    dout = torch.randn(B, H, SQ, D, generator=torch.Generator().manual_seed(5)).to(dtype)
    return q, k, v, dout


def _run(q, k, v, dout, causal):
    args = kernel_args(q, k, v, causal=causal)
    out, lse = attention_kernels.forward(q, k, v, args)
    return (out, lse, *attention_kernels.backward(dout, q, k, v, out, lse, args))


def _assert_nan_rows(name, t, expected):
    """t: (B, heads, S, cols) or (B, heads, S); expected: bool (B, heads, S), rows all NaN there and
    free of NaN elsewhere."""
    isnan = torch.isnan(t)
    rows_all = isnan.all(-1) if t.dim() == 4 else isnan
    rows_any = isnan.any(-1) if t.dim() == 4 else isnan
    assert torch.equal(rows_all, expected) and torch.equal(rows_any, expected), (
        f"{name}: NaN rows {rows_any.nonzero().tolist()[:8]}..., expected {expected.nonzero().tolist()[:8]}..."
    )


def _assert_grad_nan(name, t, required):
    """Gradient rows (B, heads, S, cols): the ``required`` rows all NaN; NaN may also reach
    other rows of the same (batch, head) (0 x NaN inside a tile's products, as in torch's math
    path, which spreads it over the whole slice); every other (batch, head) free of NaN."""
    isnan = torch.isnan(t)
    assert isnan[required].all(), f"{name}: rows that depend on the NaN are not all NaN"
    touched = required.any(-1, keepdim=True).expand_as(required)
    assert not isnan[~touched].any(), f"{name}: NaN outside the (batch, head) slices it belongs to"


def _keys_seen_by(queries, seen):
    """(B, H, Sq) bool of queries -> (B, Hkv, Sk) bool: the keys any of them sees."""
    per_head = (queries.double() @ seen.double()) > 0  # (B, H, Sk)
    return per_head.view(B, HKV, GROUP, SK).any(2)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_nan_in_q(nan_isa, dtype, causal):
    q, k, v, dout = _inputs(dtype)
    q[1, 3, 70, 5] = float("nan")  # query 70 of head 3 (kv head 1) sees keys in either case
    out, lse, dq, dk, dv = _run(q, k, v, dout, causal)
    poisoned = torch.zeros(B, H, SQ, dtype=torch.bool)
    poisoned[1, 3, 70] = True
    for name, t in (("out", out), ("lse", lse), ("dq", dq)):
        _assert_nan_rows(name, t, poisoned)
    keys = _keys_seen_by(poisoned, _seen(SQ, SK, causal))
    _assert_grad_nan("dk", dk, keys)
    _assert_grad_nan("dv", dv, keys)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_nan_in_k(nan_isa, dtype, causal):
    q, k, v, dout = _inputs(dtype)
    k[0, 1, 100, 7] = float("nan")  # key 100 of kv head 1: under causal, queries 40.. see it
    out, lse, dq, dk, dv = _run(q, k, v, dout, causal)
    seen = _seen(SQ, SK, causal)
    poisoned = torch.zeros(B, H, SQ, dtype=torch.bool)
    poisoned[0, GROUP : 2 * GROUP] = seen[:, 100]
    for name, t in (("out", out), ("lse", lse)):
        _assert_nan_rows(name, t, poisoned)
    _assert_grad_nan("dq", dq, poisoned)
    keys = _keys_seen_by(poisoned, seen)
    _assert_grad_nan("dk", dk, keys)
    _assert_grad_nan("dv", dv, keys)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_nan_in_v(isa, dtype, causal):
    """The forward: NaN in that column of every query that sees the key, out finite elsewhere
    in other heads and batches, lse finite (v does not enter it)."""
    q, k, v, dout = _inputs(dtype)
    v[1, 0, 120, 9] = float("nan")
    args = kernel_args(q, k, v, causal=causal)
    out, lse = attention_kernels.forward(q, k, v, args)
    assert not torch.isnan(lse).any()
    sees = _seen(SQ, SK, causal)[:, 120]
    assert torch.isnan(out[1, :GROUP, sees, 9]).all()
    other = torch.ones(B, H, dtype=torch.bool)
    other[1, :GROUP] = False
    assert not torch.isnan(out[other]).any()
    if not causal:  # every query sees the key: NaN in exactly that column
        assert not torch.isnan(out[1, :GROUP, :, torch.arange(D) != 9]).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_nan_in_dout(nan_isa, dtype):
    q, k, v, dout = _inputs(dtype)
    dout[0, 0, 30] = float("nan")  # a whole row; causal: query 30 sees keys 0..90
    out, lse, dq, dk, dv = _run(q, k, v, dout, True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    poisoned = torch.zeros(B, H, SQ, dtype=torch.bool)
    poisoned[0, 0, 30] = True
    _assert_nan_rows("dq", dq, poisoned)
    keys = _keys_seen_by(poisoned, _seen(SQ, SK, True))
    _assert_grad_nan("dk", dk, keys)
    _assert_grad_nan("dv", dv, keys)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids.get)
def test_nan_query_that_sees_no_key(nan_isa, dtype):
    """Causal with Sq > Sk: the first Sq - Sk queries see no key; a NaN in one of them changes
    nothing (out 0, lse -inf, no gradient anywhere)."""
    q, k, v = make_qkv(1, 2, 1, 80, 50, 32, dtype, "cpu", seed=6)
    dout = torch.randn(1, 2, 80, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    q[0, 1, 10] = float("nan")
    out, lse, dq, dk, dv = _run(q, k, v, dout, True)
    assert (out[0, :, :30] == 0).all() and torch.isneginf(lse[0, :, :30]).all()
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()
    assert (dq[0, :, :30] == 0).all()


def test_fp32_close_to_the_truth(isa):
    """Both paths compute in fp32 throughout: against the fp64 truth, a few ulps."""
    q, k, v = make_qkv(1, 2, 2, 130, 200, 64, torch.float32, "cpu", seed=8)
    args = kernel_args(q, k, v, causal=True)
    out, lse = attention_kernels.forward(q, k, v, args)
    truth, truth_lse = attention_forward_ref(q.double(), k.double(), v.double(), args)
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=2e-6)
    torch.testing.assert_close(lse.double(), truth_lse, rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------- bf16 masks at the top of the range

# Logits in units of log2 e (the bf16/fp16 kernels' exponents) overflow fp32 past 2.36e38 in
# natural units, and bf16 holds 48 finite values beyond: torch.finfo(bf16).min among them,
# which Hugging Face fills masked positions with.
HUGE_BF16_MASKS = {"finfo.min": torch.finfo(torch.bfloat16).min, "-3e38": -3e38, "+3e38": 3e38}


def check_huge_bf16_mask(value: float) -> None:
    """bf16 masks of `value` (beyond FLT_MAX / log2 e) on a whole row, on one key of a row, and
    on one key of every row of a batch: out as the fp64 reference's (a row all at one huge value
    averages its keys, where its logits overflowing into -inf gave zeros and +inf NaN; a key
    at -3e38 is hidden, one at +3e38 takes the row); lse finite (-inf only for a query that sees
    no key), that of a row with an ordinary logit as the reference's, that of a row all beyond
    2.36e38 saturated there."""
    B, H, SQ, SK, D = 2, 2, 20, 150, 64
    q, k, v = make_qkv(B, H, H, SQ, SK, D, torch.bfloat16, "cpu", seed=11)
    mask = torch.zeros(B, 1, SQ, SK, dtype=torch.bfloat16)
    mask[0, :, 3, :] = value  # the whole row
    mask[0, :, 5, 7] = value  # one key of a row
    mask[1, :, :, 130] = value  # one key (in the second key block) of every row
    args = kernel_args(q, k, v, attn_mask=mask)
    out, lse = attention_kernels.forward(q, k, v, args)
    truth, truth_lse = attention_forward_ref(q.double(), k.double(), v.double(), args)
    base, _ = attention_forward_ref(q, k, v, args, upcast=False)
    check("out", out, base, truth, torch.bfloat16, FORWARD_FACTOR)
    assert torch.isfinite(lse).all()
    huge = truth_lse.abs() > 2.3e38
    assert huge.any() and (lse[huge].abs() > 2.3e38).all()
    lse_tol = LSE_TOL[torch.bfloat16] + 1e-6 * truth_lse[~huge].abs().max()
    assert (lse.double()[~huge] - truth_lse[~huge]).abs().max() <= lse_tol


@pytest.mark.parametrize("value", HUGE_BF16_MASKS.values(), ids=HUGE_BF16_MASKS.keys())
def test_bf16_masks_beyond_the_log2_range(isa, value):
    check_huge_bf16_mask(value)
