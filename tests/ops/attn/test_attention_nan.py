"""NaN in, NaN out: the NaN contract of the attention ops, on every backend that runs here.

One NaN goes into one place (a q row, a k row, a v row, a dout row, a float attn_mask entry;
also a k row that an attn_mask -inf hides from half the queries, a q row whose query sees no
key, a cache slot of attention_decode); each row of the table then checks, for out, lse, dq,
dk and dv, that the NaNs are where the contract puts them:

- must: NaN is required. A query that sees a NaN score (from q, a visible k, a visible mask
  entry) has out and lse NaN in full; a NaN v[j, c] makes out[i, c] NaN for each query that
  sees key j; a gradient element is NaN when it depends on a NaN (dq_i for such a query or a
  NaN dout_i, dk_j / dv_j for the keys it sees).
- allowed: NaN may be there; everything else must stay finite. Where the contract is exact
  (the forward for NaN in q, k or the mask, with or without causal: a masked score is -inf,
  so a query that does not see the NaN stays finite; NaN in v without masks), allowed ==
  must. Elsewhere a kernel may multiply the p = 0 (or dS = 0) of a masked pair (i, j) by the
  NaN in v_j, k_j, q_i or dout_i (0 * NaN = NaN), which carries it to other queries or keys
  of its tile (the reference's dense products, to all of them): the allowed set is then the
  (batch, head) slice that holds the NaN, only its column when only that one can be reached.
- A query that sees no key keeps out = 0 and lse = -inf even when its q is NaN.

Backends: every one registered for "attention" / "attention_decode" that can run here (the
cuda rows are gpu-marked; Triton runs in its CPU interpreter without a GPU, on small shapes).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

import backend_rows  # tests/backend_rows.py
from fastarch import ops
from fastarch.ops.attn.args import AttentionArgs, AttentionProblem
from fastarch.ops.attn.backends import CUDA_DTYPES

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
NAN = float("nan")
QK_COL, V_COL = 3, 5  # the column of q / k, and of v / dout, that holds the NaN


def _rows(op: str) -> list:
    return backend_rows.rows(op)


def _skip_unless_supported(op: str, backend: str, q, k, v, decode: bool = False, **features) -> None:
    backend_rows.require(op, backend, AttentionProblem.of(q, k, v, AttentionArgs(**features), decode=decode))


def _shape(backend: str, device: str) -> tuple[int, int]:
    """(S, D): the CPU kernels' tiles are 72 x 64 (forward) and 64 x 64 (backward): 150
    queries and keys cross three of each, with partial and full tiles; the interpreter and
    the reference get a small problem."""
    if backend == "cpu":
        return 150, 48
    return (150, 64) if device == "cuda" else (40, 32)


def _check(name: str, got: torch.Tensor, must: torch.Tensor, allowed: torch.Tensor) -> None:
    nan = torch.isnan(got)
    missing = must & ~nan
    extra = nan & ~allowed
    assert not missing.any(), f"{name}: {int(missing.sum())} elements must be NaN, e.g. at {missing.nonzero()[0].tolist()}"
    assert not extra.any(), f"{name}: {int(extra.sum())} elements must be finite, e.g. at {extra.nonzero()[0].tolist()}"
    assert not torch.isinf(got).any(), f"{name}: infinite elements"


# ----------------------------------------------------------------------------- attention

POSITIONS = ["none", "q", "k", "k0", "v", "dout", "mask", "k_masked", "q_unseen", "v_unseen"]
# none: no NaN anywhere; k0: NaN in key 0, the only key query 0 sees with causal (its other
# scores of the tile are -inf); mask: NaN in a float attn_mask entry that the query sees (and,
# with causal, one that it does not); k_masked: NaN in a key that attn_mask -inf hides from
# the even queries; q_unseen: NaN in the q of a query that attn_mask hides every key from;
# v_unseen: NaN in a v row, and a query that attn_mask hides every key from (its out stays 0:
# the NaN times its p = 0 must not reach it).


@dataclass
class Case:
    B: int
    H: int
    Hkv: int
    S: int
    D: int
    hq: int  # the query head of the NaN (q, dout, mask)
    hk: int  # the kv head of the NaN (k, v), = hq's
    iq: int  # the query of the NaN
    jk: int  # the key of the NaN

    @property
    def heads(self) -> list[int]:
        """The query heads that read kv head hk."""
        g = self.H // self.Hkv
        return list(range(self.hk * g, (self.hk + 1) * g))


def _inputs(position: str, causal: bool, gqa: bool, S: int, D: int, dtype, device):
    B, Hkv = 2, 2
    H = 4 if gqa else 2
    hq = H - 1
    c = Case(B, H, Hkv, S, D, hq, hq // (H // Hkv), S // 2 + 1, 0 if position == "k0" else S // 2 + 3)
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(B, h, S, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv, H))
    vis = torch.ones(S, S, dtype=torch.bool)  # (query, key): the same for every batch and head
    if causal:
        vis = torch.tril(vis)
    mask = None
    if position in ("mask", "k_masked", "q_unseen", "v_unseen"):
        mask = 0.5 * torch.randn(B, H, S, S, generator=g, dtype=torch.float64)
    if position in ("q", "q_unseen"):
        q[1, c.hq, c.iq, QK_COL] = NAN
    elif position in ("k", "k0", "k_masked"):
        k[1, c.hk, c.jk, QK_COL] = NAN
    elif position in ("v", "v_unseen"):
        v[1, c.hk, c.jk, V_COL] = NAN
    elif position == "dout":
        dout[1, c.hq, c.iq, V_COL] = NAN
    elif position == "mask":
        mask[1, c.hq, c.iq, c.iq - 4] = NAN  # a key the query sees
        if causal:
            mask[1, c.hq, 2, S - 1] = NAN  # one that causal hides: ignored
    if position == "k_masked":
        mask[:, :, 0::2, c.jk] = float("-inf")
        vis[0::2, c.jk] = False
    if position in ("q_unseen", "v_unseen"):
        mask[:, :, c.iq, :] = float("-inf")
        vis[c.iq, :] = False
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return c, vis, to(q), to(k), to(v), to(dout), None if mask is None else to(mask)


def _expected(position: str, c: Case, vis: torch.Tensor):
    """{name: (must, allowed)} for out, lse, dq, dk, dv (bool, the tensors' shapes)."""
    B, H, Hkv, S, D = c.B, c.H, c.Hkv, c.S, c.D
    nowhere = lambda *shape: torch.zeros(*shape, dtype=torch.bool)  # noqa: E731
    out, lse, dq = nowhere(B, H, S, D), nowhere(B, H, S), nowhere(B, H, S, D)
    dk, dv = nowhere(B, Hkv, S, D), nowhere(B, Hkv, S, D)
    out_ok, dq_ok, dk_ok, dv_ok = out.clone(), dq.clone(), dk.clone(), dv.clone()
    G = c.heads
    if position in ("q", "dout", "mask"):
        # one query: (1, hq, iq), which sees keys vis[iq]
        if position != "dout":
            out[1, c.hq, c.iq] = True
            lse[1, c.hq, c.iq] = True
        dq[1, c.hq, c.iq] = True
        dk[1, c.hk, vis[c.iq]] = True
        if position == "dout":
            dv[1, c.hk, vis[c.iq], V_COL] = True
            dv_ok[1, c.hk, :, V_COL] = True
        else:
            dv[1, c.hk, vis[c.iq]] = True
            dv_ok[1, c.hk] = True
        out_ok, dq_ok = out.clone(), dq.clone()
        dk_ok[1, c.hk] = True
    elif position in ("k", "k0", "k_masked", "v", "v_unseen"):
        # the queries (1, h in G, i) that see key jk, and the keys they see
        seers = vis[:, c.jk]
        keys = vis[seers].any(0)
        for h in G:
            if position in ("v", "v_unseen"):
                out[1, h, seers, V_COL] = True
                out_ok[1, h, :, V_COL] = True
            else:
                out[1, h, seers] = True
                lse[1, h, seers] = True
            dq[1, h, seers] = True
            dq_ok[1, h] = True
        if position not in ("v", "v_unseen"):
            out_ok = out.clone()
        dk[1, c.hk, keys] = True
        dk_ok[1, c.hk] = True
        if position not in ("v", "v_unseen"):  # dv = P^T dO does not read v
            dv[1, c.hk, keys] = True
            dv_ok[1, c.hk] = True
    elif position == "q_unseen":
        dk_ok[1, c.hk] = True  # dk = dS^T Q: dS = 0 times the NaN q
    return {"out": (out, out_ok), "lse": (lse, lse), "dq": (dq, dq_ok), "dk": (dk, dk_ok), "dv": (dv, dv_ok)}


def _table(op: str, positions: list[str]) -> list:
    """backend x dtype x position x causal x GQA; Triton's interpreter runs a Latin-square third
    (backend_rows.interpreter_keeps: each dtype meets each position, with and without causal
    and GQA)."""
    params = []
    for bp in _rows(op):
        backend, device = bp.values
        for (i, dtype), (j, position), causal, gqa in itertools.product(enumerate(DTYPES), enumerate(positions),
                                                                        (False, True), (False, True)):
            if backend == "cuda" and dtype not in CUDA_DTYPES:  # (fp32 is Triton's on a GPU)
                continue
            if backend_rows.interpreter_keeps(backend, device, i, j, causal, gqa):
                params.append(pytest.param(
                    backend, device, dtype, position, causal, gqa, marks=bp.marks,
                    id=f"{bp.id}-{DTYPE_IDS[dtype]}-{position}-{'causal' if causal else 'full'}-{'gqa' if gqa else 'mha'}"))
    return params


@pytest.mark.parametrize("backend,device,dtype,position,causal,gqa", _table("attention", POSITIONS))
def test_attention_nan(backend, device, dtype, position, causal, gqa):
    S, D = _shape(backend, device)
    c, vis, q, k, v, dout, mask = _inputs(position, causal, gqa, S, D, dtype, device)
    _skip_unless_supported("attention", backend, q, k, v, attn_mask=mask)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = ops.attention(q, k, v, causal=causal, attn_mask=mask, return_lse=True, backend=backend)
    out.backward(dout)
    expected = _expected(position, c, vis)
    got = {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    for name, (must, allowed) in expected.items():
        t = got[name].detach().cpu()
        if name == "lse":  # a query that sees no key: -inf, checked below
            t = t.masked_fill(~vis.any(1), 0.0)
        _check(name, t, must, allowed)
    unseen = ~vis.any(1)
    if unseen.any():
        assert (lse.detach().cpu()[:, :, unseen] == float("-inf")).all()
        assert (out.detach().cpu()[:, :, unseen] == 0).all()


# ----------------------------------------------------------------------------- decode

DECODE_POSITIONS = ["none", "q", "k_last", "k_mid", "v_last", "beyond"]
# k_last / v_last: the last filled slot of sequence 1, which causal shows only to the last
# new query; k_mid: slot 10; beyond: k and v slots past the filled ones (never read).


@pytest.mark.parametrize("backend,device,dtype,position,causal,gqa", _table("attention_decode", DECODE_POSITIONS))
def test_attention_decode_nan(backend, device, dtype, position, causal, gqa):
    # cpu: 300 slots in chunks of 64; sequence 1 fills 129, so its chunk 2 holds one key and
    # chunks 3, 4 none (a NaN chunk must not be lost when they are combined)
    s_max, n1 = (300, 129) if backend == "cpu" else (48, 21)
    B, Hkv, Sq, D = 2, 2, 3, 32
    H = 4 if gqa else 2
    hq = H - 1
    hk = hq // (H // Hkv)
    heads = list(range(hk * (H // Hkv), (hk + 1) * (H // Hkv)))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Sq, D, generator=g, dtype=torch.float64)
    kc, vc = (torch.randn(B, Hkv, s_max, D, generator=g, dtype=torch.float64) for _ in range(2))
    lens = torch.tensor([s_max, n1], dtype=torch.int32)
    slot = {"k_last": n1 - 1, "v_last": n1 - 1, "k_mid": 10, "beyond": n1 + 5}.get(position)
    if position == "q":
        q[1, hq, Sq - 1, QK_COL] = NAN
    elif position in ("k_last", "k_mid"):
        kc[1, hk, slot, QK_COL] = NAN
    elif position == "v_last":
        vc[1, hk, slot, V_COL] = NAN
    elif position == "beyond":
        kc[1, hk, slot, QK_COL] = NAN
        vc[1, hk, slot, V_COL] = NAN
    q, kc, vc = (t.to(device=device, dtype=dtype) for t in (q, kc, vc))
    _skip_unless_supported("attention_decode", backend, q, kc, vc, decode=True)
    out, lse = ops.attention_decode(q, kc, vc, lens.to(device), causal=causal, return_lse=True, backend=backend)

    out_must = torch.zeros(B, H, Sq, D, dtype=torch.bool)
    lse_must = torch.zeros(B, H, Sq, dtype=torch.bool)
    out_ok = out_must.clone()
    if position == "q":
        out_must[1, hq, Sq - 1] = lse_must[1, hq, Sq - 1] = True
    elif position in ("k_last", "k_mid", "v_last"):
        # new query i sees slots < n1 - (Sq - 1 - i) with causal, < n1 without
        seers = torch.tensor([not causal or slot < n1 - (Sq - 1 - i) for i in range(Sq)])
        for h in heads:
            if position == "v_last":
                out_must[1, h, seers, V_COL] = True
                out_ok[1, h, :, V_COL] = True
            else:
                out_must[1, h, seers] = lse_must[1, h, seers] = True
    if position != "v_last":
        out_ok = out_must.clone()
    _check("out", out.cpu(), out_must, out_ok)
    _check("lse", lse.cpu(), lse_must, lse_must)
