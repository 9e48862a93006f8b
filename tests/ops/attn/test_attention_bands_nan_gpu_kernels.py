"""The GPU attention kernels at the edges of their bands, and with NaN inputs: Triton
(kernels/attn/; without a GPU in Triton's CPU interpreter, on small shapes) and CUDA
(csrc/cuda/attn/attention_*.cuh; gpu-marked rows).

Bands: a tile of queries (of keys, in the dK/dV kernel) can lie wholly outside the causal or
sliding-window band (Sq > Sk under causal, Sk = 1, window (0, 0), a window's right side): its
loops over the other side must then be empty, never run over negative or past-the-end
offsets. test_band_ranges checks Triton's _band against brute-force visibility;
test_band_table runs forward and backward on such shapes against the fp64 reference.

NaN (the contract every backend follows): a NaN score that query i sees (NaN in q_i, in a key
it sees, or a NaN attn_mask entry where it looks) makes out_i NaN in every column and lse_i
NaN; a NaN in column c of a value that query i sees makes out_i[c] NaN; a key that query i
does not see contributes nothing (masked NaN in q or k never reaches out_i; a masked value's
NaN may or may not); a query that sees no key gets out 0 and lse -inf, even with a NaN q. In
the backward a gradient element that depends on a NaN is NaN; elements that depend on none
are finite. These tests state the pattern from the contract itself, not from the reference.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import backend_rows  # tests/backend_rows.py
from attention_tolerance import floor  # tests/ops/attn/attention_tolerance.py
from fastarch import ops
from fastarch.ops.attn.api import _attention, _attention_backward
from fastarch.ops.attn.args import AttentionArgs
from fastarch.ops.attn.reference import attention_backward_ref, attention_decode_ref, attention_forward_ref

try:
    import triton
    import triton.language as tl

    from fastarch.kernels.attn.common import _band
except ImportError:  # the CUDA rows still run
    triton = None

HAS_CUDA = torch.cuda.is_available()
GPU = pytest.mark.gpu
TRITON = pytest.mark.skipif(triton is None, reason="triton is not installed")
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

FORWARD_FACTOR = 2.0
GRAD_FACTOR = 3.0
LSE_TOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}

# (backend, device, dtypes, head dim): Triton small enough for its interpreter; CUDA in the
# dtypes and a head dim its kernels are compiled for.
BACKENDS = [
    pytest.param("triton", TRITON_DEVICE, (torch.float16, torch.float32), 32, marks=TRITON, id="triton"),
    pytest.param("cuda", "cuda", (torch.float16, torch.bfloat16), 64, marks=GPU, id="cuda"),
]


def _name(dtype: torch.dtype) -> str:
    return str(dtype)[6:]


def _randn(shape, g, dtype, device):
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def _err(a, ref, where=None) -> float:
    d = a.double() - ref.double()
    if where is not None:
        d = d[where]
    return d.abs().max().item() if d.numel() else 0.0


def _check(name, ours, base, truth, dtype, factor, where=None, extra=0.0):
    """|ours - truth| <= factor x |same-dtype reference - truth| + a floor of a few roundings
    (as tests/ops/test_attention.py) + extra, over the elements ``where`` (all by default)."""
    sel = (lambda t: t[where]) if where is not None else (lambda t: t)
    assert torch.isfinite(sel(ours)).all(), f"{name}: not finite"
    e_ours, e_base = _err(ours, truth, where), _err(base, truth, where)
    bound = factor * e_base + floor(sel(truth), dtype, grad=name in ("dq", "dk", "dv")) + extra
    assert e_ours <= bound, (f"{name}: error {e_ours:.3g} > {factor} x same-dtype error {e_base:.3g} + floor + extra"
                             f" = {bound:.3g}")


# ----------------------------------------------------------------------------- 1. bands


if triton is not None:

    @triton.jit
    def _band_probe(ARGS, OUT, n, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK: tl.constexpr,
                    CHUNK: tl.constexpr):
        """_band of case c: ARGS[c] = (first, last, size, diag, left, right) -> OUT[c] = (lo,
        full_lo, full_hi, hi)."""
        c = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
        ok = c < n
        first = tl.load(ARGS + c * 6, mask=ok, other=0)
        last = tl.load(ARGS + c * 6 + 1, mask=ok, other=0)
        size = tl.load(ARGS + c * 6 + 2, mask=ok, other=0)
        diag = tl.load(ARGS + c * 6 + 3, mask=ok, other=0)
        left = tl.load(ARGS + c * 6 + 4, mask=ok, other=0)
        right = tl.load(ARGS + c * 6 + 5, mask=ok, other=0)
        lo, full_lo, full_hi, hi = _band(first, last, size, diag, left, right, HAS_LEFT, HAS_RIGHT, BLOCK)
        zero = tl.zeros([CHUNK], dtype=tl.int32)  # lo and full_lo are the constant 0 without HAS_LEFT
        tl.store(OUT + c * 4, lo + zero, mask=ok)
        tl.store(OUT + c * 4 + 1, full_lo + zero, mask=ok)
        tl.store(OUT + c * 4 + 2, full_hi + zero, mask=ok)
        tl.store(OUT + c * 4 + 3, hi + zero, mask=ok)


@TRITON
@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("has_left,has_right", [(True, True), (True, False), (False, True), (False, False)])
def test_band_ranges(has_left, has_right, block):
    """For every tile of `rows` rows (queries, or keys in the dK/dV kernel, which calls _band
    with the band transposed: the same form) against `size` columns, diag = size - rows:
    0 <= lo <= full_lo <= full_hi <= hi <= size; [lo, hi) holds every column a row of the tile
    sees, lo at the first one's block and hi just past the last one; the unmasked
    [full_lo, full_hi) is whole blocks that every row sees, all of them (or empty); a tile that sees no
    column gets four equal ends (every loop empty)."""
    sizes = [1, 16, 65, 113, 200, 256, 300]
    cases = []
    for rows, size, tile in itertools.product(sizes, sizes, (16, 64)):
        for first in range(0, rows, tile):
            last = min(first + tile, rows) - 1
            for left, right in itertools.product((0, 3, 64, 1000), (0, 7, 64, 1000)):
                cases.append((first, last, size, size - rows, left, right))
    args = torch.tensor(cases, dtype=torch.int32, device=TRITON_DEVICE)
    out = torch.empty((len(cases), 4), dtype=torch.int32, device=TRITON_DEVICE)
    chunk = 1024
    _band_probe[(triton.cdiv(len(cases), chunk),)](args, out, len(cases), HAS_LEFT=has_left, HAS_RIGHT=has_right,
                                                     BLOCK=block, CHUNK=chunk)
    for (first, last, size, diag, left, right), (lo, full_lo, full_hi, hi) in zip(cases, out.cpu().tolist()):
        what = f"rows {first}..{last}, size {size}, diag {diag}, left {left}, right {right}: {lo, full_lo, full_hi, hi}"
        i = np.arange(first, last + 1)[:, None]
        j = np.arange(size)[None, :]
        sees = np.ones((len(i), size), dtype=bool)
        if has_left:
            sees &= j >= i + diag - left
        if has_right:
            sees &= j <= i + diag + right
        seen = np.flatnonzero(sees.any(0))
        assert 0 <= lo <= full_lo <= full_hi <= hi <= size, what
        if len(seen) == 0:
            assert lo == full_lo == full_hi == hi, what
            continue
        assert lo == seen[0] // block * block and hi == seen[-1] + 1, what
        assert full_lo == full_hi or (full_lo % block == 0 and full_hi % block == 0), what
        whole = [b for b in range(size // block) if sees[:, b * block : (b + 1) * block].all()]
        assert sees[:, full_lo:full_hi].all() and (full_hi - full_lo) // block == len(whole), what


SIZES = [1, 16, 113, 200, 256, 300]
# In the interpreter (~0.5-1 s a row), fewer: fp32 leaves out 200 (ragged for every tile, as
# 113 and 300 are); fp16 also 256 (whole tiles), keeping Sk = 1, Sq > Sk, Sq < Sk and ragged
# tiles. The band arithmetic does not depend on the dtype; the GPU runs every size.
INTERPRETER_SIZES = {torch.float32: [1, 16, 113, 256, 300], torch.float16: [1, 16, 113, 300]}
WINDOWS = [(0, 0), (5, -1), (-1, 0), (3, 7), (0, -1)]
# the failures FlashAttention's test_flash_attn_causal (local, swapped lengths) found:
# (Sq, Sk, causal, window); the last one in the dK/dV kernel
REPORTED = [(200, 1, True, (0, 0)), (256, 128, False, (0, 0)), (300, 200, True, (5, -1)), (16, 300, False, (0, 0))]


def _bands():
    """(causal, window) pairs of the table with distinct bands: causal closes the right side at
    the diagonal, so e.g. causal with (0, -1) is causal with (0, 0)."""
    seen = set()
    for causal, (left, right) in itertools.product((False, True), WINDOWS):
        effective = (left, min(right, 0) if right >= 0 else 0) if causal else (left, right)
        if effective not in seen:
            seen.add(effective)
            yield causal, (left, right)


def _table():
    """backend x dtype x (Sq, Sk) x band, and the REPORTED rows. Triton's interpreter runs half
    (backend_rows.interpreter_keeps with n = 2): each (Sq, Sk, band) of the sizes both dtypes
    run in one of the two dtypes."""
    for bp in BACKENDS:
        backend, device, dtypes, d = bp.values
        for i, dtype in enumerate(dtypes):
            sizes = INTERPRETER_SIZES[dtype] if device == "cpu" else SIZES
            cases = [(sq, sk, *band) for sq, sk in itertools.product(sizes, sizes)
                     for j, band in enumerate(_bands())
                     if backend_rows.interpreter_keeps(backend, device, i, SIZES.index(sq), SIZES.index(sk), j, n=2)]
            for sq, sk, causal, window in REPORTED + cases:
                yield pytest.param(
                    backend, device, dtype, d, sq, sk, causal, window, marks=bp.marks,
                    id=f"{backend}-{_name(dtype)}-{sq}x{sk}-{'causal' if causal else 'full'}-w{window[0]},{window[1]}",
                )


def _delta_rounding(q, k, dout, truth_out, truth_lse, vis, scale, dtype) -> tuple[float, float]:
    """Twice the largest change in dq and dk that comes from delta = rowsum(dO * out) being
    computed (as in every FlashAttention-style backward) from out rounded to the dtype:
    dS_ij = P_ij (dP_ij - delta_i) moves by -P_ij err_i, err_i = sum_c dO_ic (round(out_ic) -
    out_ic), and dq_i = scale sum_j dS_ij k_j, dk_j = scale sum_i dS_ij q_i with it. The
    same-dtype reference does not measure it: where a query sees one key, its P is exactly 1
    and its dS exactly 0; the kernel's dS is then a few roundings of dO V^T."""
    out = truth_out.double()
    err = (dout.double() * (out.to(dtype).double() - out)).sum(-1)  # (B, H, Sq)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    w = torch.where(vis, torch.exp(s - truth_lse[..., None]), 0.0) * err[..., None]
    dq = scale * torch.einsum("bhqk,bhkd->bhqd", w, k.double())
    dk = scale * torch.einsum("bhqk,bhqd->bhkd", w, q.double())
    return 2 * dq.abs().max().item(), 2 * dk.abs().max().item()


@pytest.mark.parametrize("backend,device,dtype,d,sq,sk,causal,window", list(_table()))
def test_band_table(backend, device, dtype, d, sq, sk, causal, window):
    """out, lse, dq, dk, dv against the fp64 reference (the same-dtype reference's error as the
    yardstick); queries that see no key: out exactly 0, lse -inf, dq 0; keys that no query
    sees: dk = dv = 0."""
    g = torch.Generator().manual_seed(sq * 1000 + sk)
    q, k, v = (_randn((1, 2, s, d), g, dtype, device) for s in (sq, sk, sk))
    args = _args(None, None, None, None, causal, 1 / math.sqrt(d), window[0], window[1], 0.0, None)
    out, lse = _attention(q, k, v, *args.fields(), backend)
    truth, truth_lse = attention_forward_ref(q.double(), k.double(), v.double(), args)
    base, _ = attention_forward_ref(q, k, v, args, upcast=False)
    _check("out", out, base, truth, dtype, FORWARD_FACTOR)
    seen = torch.isfinite(truth_lse)
    assert torch.equal(torch.isneginf(lse), ~seen), "lse: -inf exactly for the queries that see no key"
    assert (out[~seen] == 0).all(), "a query that sees no key must give zeros"
    if seen.any():
        lse_tol = LSE_TOL[dtype] + 1e-6 * truth_lse[seen].abs().max().item()
        assert _err(lse, truth_lse, seen) <= lse_tol, "lse"

    dout = _randn(out.shape, g, dtype, device)
    grads = _attention_backward(dout, q, k, v, out, lse, *args.fields(), backend)
    truths = attention_backward_ref(dout.double(), q.double(), k.double(), v.double(), None, None, args)
    bases = attention_backward_ref(dout, q, k, v, None, None, args, upcast=False)
    vis = _visible(sq, sk, causal, *window, device=device)
    delta_dq, delta_dk = _delta_rounding(q, k, dout, truth, truth_lse, vis, 1 / math.sqrt(d), dtype)
    for name, ours, base, truth, extra in zip(("dq", "dk", "dv"), grads, bases, truths, (delta_dq, delta_dk, 0.0)):
        _check(name, ours, base, truth, dtype, GRAD_FACTOR, extra=extra)
    dq, dk, dv = grads
    assert (dq[~seen] == 0).all(), "dq of a query that sees no key"
    unseen_keys = (truths[1] == 0).all(-1) & (truths[2] == 0).all(-1)  # no query sees them
    assert (dk[unseen_keys] == 0).all() and (dv[unseen_keys] == 0).all(), "dk, dv of keys that no query sees"


FAR_BELOW = {  # name -> (Sq, Sk, causal, window, left padding): tiles some rows see nothing of
    "window": (70, 150, False, (10, -1), 0),
    "window-both-sq>sk": (150, 70, False, (10, 5), 0),
    "left-padded": (70, 150, False, (-1, -1), 40),
}


@pytest.mark.parametrize("case", list(FAR_BELOW))
@pytest.mark.parametrize("backend,device,dtype,d", [
    pytest.param(*bp.values[:2], dtype, bp.values[3], marks=bp.marks, id=f"{bp.id}-{_name(dtype)}")
    for bp in BACKENDS for dtype in bp.values[2]])
def test_scores_far_below_zero(backend, device, dtype, d, case):
    """Softmax does not depend on the scores' level: queries whose every score is about -200
    (natural units), on rows that meet a key tile they see nothing of before the keys they see
    (the running max must stay -inf there, not become a stand-in 0 against which exp2 of every
    score underflows: zeros and lse -inf, in fp32 too; with fp16 probabilities already at -17)."""
    sq, sk, causal, window, padded = FAR_BELOW[case]
    g = torch.Generator().manual_seed(7)
    q = torch.zeros(1, 2, sq, d, dtype=torch.float64)
    q[..., 0] = 1.0
    k = torch.randn(1, 2, sk, d, generator=g, dtype=torch.float64)
    k[..., 0] = -25.0 + 0.25 * torch.randn(1, 2, sk, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, sk, d, generator=g, dtype=torch.float64)
    q, k, v = (t.to(dtype).to(device) for t in (q, k, v))
    kpm = None
    if padded:
        kpm = torch.arange(sk, device=device)[None, :] >= padded
    args = _args(None, kpm, None, None, causal, 8.0, window[0], window[1], 0.0, None)
    out, lse = _attention(q, k, v, *args.fields(), backend)
    truth, truth_lse = attention_forward_ref(q.double(), k.double(), v.double(), args)
    base, _ = attention_forward_ref(q, k, v, args, upcast=False)
    seen = torch.isfinite(truth_lse)
    assert truth_lse[seen].max() < -150, "the case must keep every score far below 0"
    _check("out", out, base, truth, dtype, FORWARD_FACTOR)
    assert torch.equal(torch.isneginf(lse), ~seen)
    assert _err(lse, truth_lse, seen) <= LSE_TOL[dtype] + 1e-6 * truth_lse[seen].abs().max().item()
    dout = _randn(out.shape, g, dtype, device)
    grads = _attention_backward(dout, q, k, v, out, lse, *args.fields(), backend)
    truths = attention_backward_ref(dout.double(), q.double(), k.double(), v.double(), None, None, args)
    bases = attention_backward_ref(dout, q, k, v, None, None, args, upcast=False)
    vis = _visible(sq, sk, causal, *window, device=device)
    if kpm is not None:
        vis = vis & kpm[:, None, None, :]
    extras = _delta_rounding(q, k, dout, truth, truth_lse, vis, 8.0, dtype)
    for name, ours, b, t, extra in zip(("dq", "dk", "dv"), grads, bases, truths, (*extras, 0.0)):
        _check(name, ours, b, t, dtype, GRAD_FACTOR, extra=extra)


# ----------------------------------------------------------------------------- 2. NaN

NAN_DTYPES = {"triton": (torch.float32, torch.float16, torch.bfloat16), "cuda": (torch.float16, torch.bfloat16)}


def _nan_backends():
    for bp in BACKENDS:
        backend, device, _, d = bp.values
        for dtype in NAN_DTYPES[backend]:
            yield pytest.param(backend, device, dtype, d, marks=bp.marks, id=f"{backend}-{_name(dtype)}")


NAN_BACKENDS = list(_nan_backends())


def _visible(sq, sk, causal, left, right, device="cpu"):
    """bool (sq, sk): query i sees key j (the reference's rules, restated)."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    diag = i + sk - sq
    ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        ok &= j <= diag
    if left >= 0:
        ok &= j >= diag - left
    if right >= 0:
        ok &= j <= diag + right
    return ok


def _heads(t, heads):
    """(B, Hkv, ...) -> (B, H, ...): what each query head reads."""
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def _groups(t, kv_heads):
    """(B, H, ...) bool -> (B, Hkv, ...): any over the query heads of each key/value head."""
    return t.view(t.shape[0], kv_heads, -1, *t.shape[2:]).any(2)


def _assert_pattern(name, t, nan=None, finite=None, zero=None, neginf=None):
    """t is NaN at least where `nan`, finite where `finite`, exactly 0 where `zero`, -inf
    where `neginf` (bool masks broadcastable to t; elsewhere anything goes)."""
    t = t.detach().cpu()
    for what, want, has in (("NaN", nan, torch.isnan(t)), ("finite", finite, torch.isfinite(t)),
                            ("0", zero, t == 0), ("-inf", neginf, torch.isneginf(t))):
        if want is None:
            continue
        bad = want.cpu().expand_as(t) & ~has
        assert not bad.any(), f"{name}: {int(bad.sum())} elements should be {what}, e.g. at {bad.nonzero()[0].tolist()}"


def _expected(q, k, v, dout, vis, mask):
    """The contract's pattern for out, lse, dq, dk, dv. vis: bool (B, H, Sq, Sk) (the band, key
    padding and -inf attn_mask entries); mask: the float attn_mask (B, H, Sq, Sk) or None.
    Returns {name: dict(nan=..., finite=..., zero=..., neginf=...)}."""
    B, H, Sq, _ = q.shape
    Hkv = k.shape[1]
    q_nan = q.isnan().any(-1).cpu()  # (B, H, Sq)
    k_nan = _heads(k.isnan().any(-1).cpu(), H)  # (B, H, Sk)
    v_nan = _heads(v.isnan().cpu(), H)  # (B, H, Sk, Dv)
    do_nan = dout.isnan().any(-1).cpu()
    mask_nan = mask.isnan().cpu() if mask is not None else torch.zeros_like(vis)
    nan_score = vis & (q_nan[..., None] | k_nan[..., None, :] | mask_nan)
    nan_row = nan_score.any(-1)  # (B, H, Sq): out_i and lse_i NaN
    seen = vis.any(-1)
    v_nan_seen = (vis[..., None] & v_nan[:, :, None]).any(-2)  # (B, H, Sq, Dv): out_i[c] NaN
    v_nan_col = v_nan.any(-2)[:, :, None, :]  # (B, H, 1, Dv): a column a masked NaN value may reach
    out = dict(nan=nan_row[..., None] | v_nan_seen, finite=~nan_row[..., None] & ~v_nan_col,
               zero=~seen[..., None] & ~v_nan_col)
    lse = dict(nan=nan_row, finite=seen & ~nan_row, neginf=~seen)

    # backward: query rows whose every gradient term is NaN: a NaN score, or a NaN dout or a
    # NaN value that they see (both make dP and delta NaN)
    sees_nan_value = (vis & v_nan.any(-1)[:, :, None, :]).any(-1)
    bad_row = nan_row | (do_nan & seen) | sees_nan_value
    # keys those rows see: dS is NaN there (dK, every column); dV = P^T dO (it does not read v)
    # is NaN in every column where P is (a NaN score), in dO's NaN columns where dO is
    dk_nan = _groups(bad_row[..., None] & vis, Hkv).any(2)[..., None]  # (B, Hkv, Sk, 1)
    dv_nan = _groups(nan_row[..., None] & vis, Hkv).any(2)[..., None] | _groups(
        (vis[..., None] & dout.isnan().cpu()[:, :, :, None, :]).any(2), Hkv)  # (B, Hkv, Sk, Dv)
    # a NaN anywhere in a tile may reach its neighbours through 0 * NaN (a masked entry of P or
    # dS times a NaN operand): an element is required finite only where its head has none
    kv_has = lambda t: t.flatten(2).any(-1)  # noqa: E731  (B, Hkv) from (B, Hkv, ...)
    group_has = lambda t: _groups(t.flatten(2).any(-1)[..., None], Hkv)[..., 0]  # noqa: E731  (B, Hkv) from (B, H, ...)
    k_any, v_any = kv_has(k.isnan().cpu()), kv_has(v.isnan().cpu())
    dq_free = ~_heads(k_any | v_any, H)  # (B, H): dq_i = sum_j dS_ij k_j, dP from v
    dk_free = ~(k_any | v_any | group_has(q.isnan().cpu()) | group_has(dout.isnan().cpu()) | group_has(mask_nan))
    # dV = P^T dO: a NaN value does not reach it, nor a NaN q that no key sees (P = 0 exactly)
    dv_free = ~(k_any | group_has(q_nan & seen) | group_has(dout.isnan().cpu()) | group_has(mask_nan))
    dq = dict(nan=bad_row[..., None], finite=(dq_free[..., None] & ~bad_row)[..., None],
              zero=(dq_free[..., None] & ~seen & ~do_nan)[..., None])
    dk = dict(nan=dk_nan, finite=dk_free[:, :, None, None] & ~dk_nan)
    dv = dict(nan=dv_nan, finite=dv_free[:, :, None, None] & ~dv_nan)
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)


SQ, SK = 70, 150  # two query tiles, several key tiles, ragged ends
NAN_MASKS = {  # name -> (causal, window, key padding)
    "full": (False, (-1, -1), False),
    "causal": (True, (-1, -1), False),
    "window": (False, (20, 5), False),
    "causal-padded": (True, (-1, -1), True),
}
NAN_AT = {  # name -> where the NaN goes: (tensor, batch, head, row, column), None = every column
    "q": ("q", 0, 1, 40, 3),
    "q-row": ("q", 0, 1, 40, None),
    "k": ("k", 0, 0, 100, 7),
    "v": ("v", 0, 0, 100, 3),
    "dout": ("dout", 0, 1, 40, 5),
}


def _nan_inputs(device, dtype, d, sq, sk, gqa, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, hkv = (4, 2) if gqa else (2, 2)
    q = _randn((2, h, sq, d), g, dtype, device)
    k, v = (_randn((2, hkv, sk, d), g, dtype, device) for _ in range(2))
    dout = _randn((2, h, sq, d), g, dtype, device)
    return dict(q=q, k=k, v=v, dout=dout)


def _args(attn_mask, kpm, cu_q, cu_k, causal, scale, window_left, window_right, dropout_p, seed) -> AttentionArgs:
    return AttentionArgs(attn_mask, kpm, cu_q, cu_k, 0, 0, causal, scale, window_left, window_right, dropout_p, seed)


def _run(backend, t, args, backward=True):
    out, lse = _attention(t["q"], t["k"], t["v"], *args.fields(), backend)
    if not backward:
        return dict(out=out, lse=lse)
    dq, dk, dv = _attention_backward(t["dout"], t["q"], t["k"], t["v"], out, lse, *args.fields(), backend)
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)


def _check_nan(results, expected, names=("out", "lse", "dq", "dk", "dv")):
    for name in names:
        _assert_pattern(name, results[name], **expected[name])


def _check_finite_out(out, t, args, dtype, finite):
    """The out elements the contract says are finite match the fp64 reference (which computes
    them without touching the NaN)."""
    truth, _ = attention_forward_ref(*(t[n].double() for n in "qkv"), args)
    base, _ = attention_forward_ref(t["q"], t["k"], t["v"], args, upcast=False)
    where = finite.to(out.device).expand_as(out)
    _check("out", out, base.to(out.device), truth.to(out.device), dtype, FORWARD_FACTOR, where)


def _nan_table():
    """backend x dtype x masks x NaN position; Triton's interpreter runs a Latin-square third
    (backend_rows.interpreter_keeps: each dtype meets each mask and each position)."""
    for bp in NAN_BACKENDS:
        backend, device, dtype, d = bp.values
        for n, ((i, masks), (j, at)) in enumerate(itertools.product(enumerate(NAN_MASKS), enumerate(NAN_AT))):
            if not backend_rows.interpreter_keeps(backend, device, NAN_DTYPES[backend].index(dtype), i, j):
                continue
            gqa = (n + len(str(dtype))) % 2 == 1  # half the rows grouped-query (2 q heads per kv head)
            yield pytest.param(backend, device, dtype, d, masks, at, gqa, marks=bp.marks,
                               id=f"{bp.id}-{masks}-{at}-{'gqa' if gqa else 'mha'}")


@pytest.mark.parametrize("backend,device,dtype,d,masks,at,gqa", list(_nan_table()))
def test_nan_propagation(backend, device, dtype, d, masks, at, gqa):
    """One NaN in q, k, v or dout (batch entry 1 all finite): the contract's pattern in out,
    lse, dq, dk, dv; the finite outputs match the reference."""
    causal, window, padded = NAN_MASKS[masks]
    t = _nan_inputs(device, dtype, d, SQ, SK, gqa)
    name, b, h, row, col = NAN_AT[at]
    t[name][b, h, row, slice(None) if col is None else col] = float("nan")
    kpm = None
    vis = _visible(SQ, SK, causal, *window).expand(2, t["q"].shape[1], SQ, SK)
    if padded:  # padding hides the NaN key of "k"/"v" from every query of batch entry 0
        kpm = torch.ones(2, SK, dtype=torch.bool, device=device)
        kpm[0, 95:110] = False
        vis = vis & kpm.cpu()[:, None, None, :]
    args = _args(None, kpm, None, None, causal, 1 / math.sqrt(d), window[0], window[1], 0.0, None)
    results = _run(backend, t, args)
    expected = _expected(t["q"], t["k"], t["v"], t["dout"], vis, None)
    _check_nan(results, expected)
    _check_finite_out(results["out"], t, args, dtype, expected["out"]["finite"])
    if masks != "full" or at not in ("q", "q-row", "k"):
        return
    # the exact pattern: with no mask the NaN row (q) or every row (k) is NaN, all else finite
    nan_out = expected["out"]["nan"].expand(results["out"].shape)
    assert torch.equal(results["out"].isnan().cpu(), nan_out)


@pytest.mark.parametrize("backend,device,dtype,d", NAN_BACKENDS)
def test_nan_query_that_sees_no_key(backend, device, dtype, d):
    """Sq > Sk under causal: the first Sq - Sk queries see no key. A NaN q there, or a query
    whose attn_mask row is all -inf with a NaN q: out 0, lse -inf, and nothing NaN anywhere
    but where a NaN q multiplies a zero dS (dK) - here dk is checked finite for the other
    batch entry only."""
    sq, sk = 70, 40
    t = _nan_inputs(device, dtype, d, sq, sk, gqa=False, seed=1)
    t["q"][0, 0, 5] = float("nan")  # sees no key (causal: i < 30)
    t["q"][0, 1, 50] = float("nan")  # would see keys, but its attn_mask row is all -inf
    mask = torch.zeros(2, 2, sq, sk, dtype=dtype)
    mask[0, 1, 50] = float("-inf")
    mask = mask.to(device)
    args = _args(mask, None, None, None, True, 1 / math.sqrt(d), -1, -1, 0.0, None)
    results = _run(backend, t, args)
    vis = _visible(sq, sk, True, -1, -1).expand(2, 2, sq, sk) & ~mask.cpu().isneginf()
    assert not vis[0, 0, 5].any() and not vis[0, 1, 50].any()
    expected = _expected(t["q"], t["k"], t["v"], t["dout"], vis, mask)
    _check_nan(results, expected)
    out, lse = results["out"].cpu(), results["lse"].cpu()
    assert (out[0, 0, 5] == 0).all() and (out[0, 1, 50] == 0).all()
    assert torch.isneginf(lse[0, 0, 5]) and torch.isneginf(lse[0, 1, 50])
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    dq, dv = results["dq"].cpu(), results["dv"].cpu()
    assert torch.isfinite(dq).all() and (dq[0, 0, 5] == 0).all() and (dq[0, 1, 50] == 0).all()
    assert torch.isfinite(dv).all(), "dv = P^T dO: P is exactly 0 for a query that sees no key"
    assert torch.isfinite(results["dk"][1]).all()


@pytest.mark.parametrize("backend,device,dtype,d", NAN_BACKENDS)
def test_nan_in_attn_mask(backend, device, dtype, d):
    """A NaN attn_mask entry where query i looks: out_i and lse_i NaN, its gradients NaN; a NaN
    entry where the band hides the key: nothing."""
    t = _nan_inputs(device, dtype, d, SQ, SK, gqa=False, seed=2)
    mask = torch.randn(2, 2, SQ, SK, generator=torch.Generator().manual_seed(3)).to(dtype)
    mask[0, 1, 40, 100] = float("nan")  # visible under causal (j <= i + 80)
    mask[1, 0, 10, 120] = float("nan")  # hidden by causal (j > 10 + 80)
    mask = mask.to(device)
    args = _args(mask, None, None, None, True, 1 / math.sqrt(d), -1, -1, 0.0, None)
    results = _run(backend, t, args)
    vis = _visible(SQ, SK, True, -1, -1).expand(2, 2, SQ, SK)
    expected = _expected(t["q"], t["k"], t["v"], t["dout"], vis, mask)
    _check_nan(results, expected)
    assert torch.isnan(results["out"][0, 1, 40]).all() and torch.isnan(results["lse"][0, 1, 40])
    nan_rows = results["out"].isnan().any(-1).cpu()
    assert nan_rows.sum() == 1, "only query 40 of head 1 of batch entry 0 sees a NaN"
    assert torch.isfinite(results["dq"][1]).all() and torch.isfinite(results["dk"][1]).all()


@pytest.mark.parametrize("backend,device,dtype,d", NAN_BACKENDS)
def test_nan_with_dropout(backend, device, dtype, d):
    """Dropout zeroes probabilities after the row sum: a NaN score whose probability is dropped
    still makes out_i and lse_i NaN (half the rows drop it at p = 0.5)."""
    t = _nan_inputs(device, dtype, d, SQ, SK, gqa=False, seed=4)
    t["k"][0, 0, 100, 2] = float("nan")
    args = _args(None, None, None, None, False, 1 / math.sqrt(d), -1, -1, 0.5, torch.tensor(1234))
    results = _run(backend, t, args, backward=False)
    vis = torch.ones(2, 2, SQ, SK, dtype=torch.bool)
    expected = _expected(t["q"], t["k"], t["v"], t["dout"], vis, None)
    _check_nan(results, expected, names=("out", "lse"))
    assert torch.isnan(results["out"][0, 0]).all() and torch.isfinite(results["out"][0, 1]).all()


# ----------------------------------------------------------------------------- decode

DECODE_CACHE = {"triton": 100, "cuda": 700}  # slots; several splits of the cache either way


@pytest.mark.parametrize("new", [1, 3])
@pytest.mark.parametrize("window", [-1, 20])
@pytest.mark.parametrize("at", ["q", "k", "v", "unfilled"])
@pytest.mark.parametrize("backend,device,dtype,d", NAN_BACKENDS)
def test_decode_nan(backend, device, dtype, d, at, window, new):
    """attention_decode follows the forward's rule over the filled cache slots; NaN in the
    unfilled slots (a cache from torch.empty) never reaches anything."""
    S = DECODE_CACHE[backend]
    B, H, Hkv = 2, 4, 2
    g = torch.Generator().manual_seed(5)
    q = _randn((B, H, new, d), g, dtype, device)
    k_cache, v_cache = (_randn((B, Hkv, S, d), g, dtype, device) for _ in range(2))
    seqlens = torch.tensor([S - 37, S // 2], dtype=torch.int32, device=device)
    n0 = S - 37
    j0 = n0 - 10  # seen by every new token (window 20 included)
    if at == "q":
        q[0, 1, new - 1, 3] = float("nan")
    elif at == "k":
        k_cache[0, 0, j0, 3] = float("nan")
    elif at == "v":
        v_cache[0, 0, j0, 3] = float("nan")
    else:
        k_cache[0, :, n0:] = float("nan")
        v_cache[0, :, n0:] = float("nan")
        k_cache[1, :, S // 2 :] = float("nan")
        v_cache[1, :, S // 2 :] = float("nan")
    out, lse = ops.attention_decode(q, k_cache, v_cache, seqlens, window=None if window < 0 else window,
                                    return_lse=True, backend=backend)
    out, lse = out.cpu(), lse.cpu()
    nan_row = torch.zeros(B, H, new, dtype=torch.bool)
    nan_col = torch.zeros(B, H, new, d, dtype=torch.bool)
    if at == "q":
        nan_row[0, 1, new - 1] = True
    elif at == "k":
        nan_row[0, :2] = True  # query heads 0, 1 read key/value head 0
    elif at == "v":
        nan_col[0, :2, :, 3] = True
    expect_out = nan_row[..., None] | nan_col
    assert torch.equal(out.isnan(), expect_out), "out: NaN exactly where the contract says"
    assert torch.equal(lse.isnan(), nan_row), "lse: NaN exactly for the queries with a NaN score"
    truth, _ = attention_decode_ref(q.double(), k_cache.double(), v_cache.double(), seqlens, True, 1 / math.sqrt(d),
                                    window)
    base, _ = attention_decode_ref(q, k_cache, v_cache, seqlens, True, 1 / math.sqrt(d), window)
    _check("out", out, base.cpu(), truth.cpu(), dtype, FORWARD_FACTOR, ~expect_out)


@pytest.mark.parametrize("backend,device,dtype,d", NAN_BACKENDS)
def test_decode_scores_far_below_zero(backend, device, dtype, d):
    """As test_scores_far_below_zero for attention_decode: 40 new tokens with a window of 5, so
    the late tokens meet cache tiles they see nothing of before their own keys."""
    S, new = DECODE_CACHE[backend], 40
    g = torch.Generator().manual_seed(8)
    q = torch.zeros(2, 4, new, d, dtype=torch.float64)
    q[..., 0] = 1.0
    k_cache = torch.randn(2, 2, S, d, generator=g, dtype=torch.float64)
    k_cache[..., 0] = -25.0 + 0.25 * torch.randn(2, 2, S, generator=g, dtype=torch.float64)
    v_cache = torch.randn(2, 2, S, d, generator=g, dtype=torch.float64)
    q, k_cache, v_cache = (t.to(dtype).to(device) for t in (q, k_cache, v_cache))
    seqlens = torch.tensor([S - 7, 60], dtype=torch.int32, device=device)
    truth, truth_lse = attention_decode_ref(q.double(), k_cache.double(), v_cache.double(), seqlens, True, 8.0, 5)
    base, _ = attention_decode_ref(q, k_cache, v_cache, seqlens, True, 8.0, 5)
    assert truth_lse.max() < -150
    runs = [ops.attention_decode(q, k_cache, v_cache, seqlens, window=5, scale=8.0, return_lse=True, backend=backend)]
    if backend == "triton":  # also one program over the whole cache (the op splits it in 3 here)
        from fastarch.kernels.attn.decode import attention_decode as triton_decode

        runs.append(triton_decode(q, k_cache, v_cache, seqlens, True, 8.0, 5, num_splits=1))
    for out, lse in runs:
        _check("out", out, base, truth, dtype, FORWARD_FACTOR)
        assert _err(lse, truth_lse) <= LSE_TOL[dtype] + 1e-6 * truth_lse.abs().max().item()
