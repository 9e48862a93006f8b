"""Attention in plain PyTorch: the definition of correct, and the backend of last resort.

Kernel-level interface shared by every attention backend (see backends.py; args is an
AttentionArgs, args.py):

    forward(q, k, v, args) -> (out, lse)
    backward(dout, q, k, v, out, lse, args) -> (dq, dk, dv)
    decode(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left) -> (out, lse)
    append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens) -> None (writes the caches)

- q: (B, H, Sq, D); k: (B, Hkv, Sk, D); v: (B, Hkv, Sk, Dv); any strides, last dim contiguous.
  H % Hkv == 0: query head h reads key/value head h // (H // Hkv) (grouped-query attention).
- Variable lengths: with cu_seqlens_q / cu_seqlens_k (int32, (N + 1,), starting at 0), B == 1
  and the sequence axis holds N packed sequences: sequence n is rows cu_seqlens_q[n] to
  cu_seqlens_q[n + 1] of q and cu_seqlens_k[n] to cu_seqlens_k[n + 1] of k and v. Attention
  never crosses sequences.
- Within a (sequence of) Sq queries and Sk keys, query i sees key j when
      causal:            j <= i + (Sk - Sq)                  (bottom-right aligned)
      window_left >= 0:  j >= i + (Sk - Sq) - window_left
      window_right >= 0: j <= i + (Sk - Sq) + window_right
      key_padding_mask:  key_padding_mask[b, j] is True       (bool (B, Sk): True = a real key)
  and attn_mask (float, added to the scaled scores; broadcastable to (B, H, Sq, Sk); -inf
  masks) applies on top. A query that sees no key gets out = 0 and lse = -inf, and passes no
  gradient.
- NaN in, NaN out: a NaN among the scores a query sees (from q, k or attn_mask) makes its out
  row and its lse NaN; a NaN in v[j, c] makes out[i, c] NaN for every query i that sees key j.
  A key a query does not see (a -inf attn_mask entry included) never reaches it through its
  score, and a query that sees no key keeps out = 0 and lse = -inf.
- Softmax statistics are fp32 (fp64 for fp64 inputs); out has q's dtype; lse is (B, H, Sq)
  in the statistics dtype: log(sum_j exp(score_ij)) over the visible keys.
- Dropout (dropout_p > 0): probability p of query i and key j (in the 4-D view above, so
  with variable lengths i and j are packed indices and b = 0) is kept when
      dropout_hash(seed, (b * H + h) * Sq + i, j) >= dropout_p * 2**32
  and the kept ones are scaled by 1 / (1 - dropout_p). Every backend computes this hash, so
  all draw the same mask for the same seed (an int64 scalar tensor on the CPU).

The reference reads packed offsets and cache lengths on the host (on a GPU, a wait for it): it
is the specification and the last fallback, not a fast path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch.ops.attn.args import AttentionArgs

_M32 = 0xFFFFFFFF


def _mix32(h: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values below 2**32.
    The multipliers are odd and below 2**31, so every product fits an int64; kernels compute
    the same with uint32 arithmetic."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x4C7D19F3) & _M32
    return h ^ (h >> 16)


def dropout_hash(seed: int, row: Tensor, col: Tensor) -> Tensor:
    """The uint32 (in an int64 tensor) that decides whether probability (row, col) is kept;
    row = (b * H + h) * Sq + i and col = j, both taken modulo 2**32."""
    return _mix32(_mix32((row + seed) & _M32) ^ (col & _M32))


def dropout_keep(seed: int, rows: Tensor, cols: Tensor, dropout_p: float) -> Tensor:
    """bool (len(rows), len(cols)): which probabilities dropout keeps."""
    threshold = min(int(dropout_p * 2**32), _M32)
    return dropout_hash(seed, rows[:, None], cols[None, :]) >= threshold


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _segments(q: Tensor, k: Tensor, cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None):
    """(batch index, query rows slice, key rows slice) for every sequence."""
    if cu_seqlens_q is None:
        return [(b, slice(0, q.shape[2]), slice(0, k.shape[2])) for b in range(q.shape[0])]
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(0, slice(cq[n], cq[n + 1]), slice(ck[n], ck[n + 1])) for n in range(len(cq) - 1)]


def _visible(i: Tensor, j: Tensor, sq: int, sk: int, causal: bool, window_left: int, window_right: int) -> Tensor:
    """bool: which keys j the queries i of a sequence of sq queries and sk keys see (before
    the masks); i and j broadcast against each other."""
    diag = i + (sk - sq)
    ok = torch.ones(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.bool, device=i.device)
    if causal:
        ok &= j <= diag
    if window_left >= 0:
        ok &= j >= diag - window_left
    if window_right >= 0:
        ok &= j <= diag + window_right
    return ok


# Queries per step of the reference: bounds its memory to BLOCK_Q x Sk scores per head in the
# forward (its autograd backward keeps them all, as a reference may).
BLOCK_Q = 256


def _expand_heads(t: Tensor, heads: int) -> Tensor:
    """(B, Hkv, S, D) -> (B, H, S, D): each key/value head serves H // Hkv query heads."""
    group = heads // t.shape[1]
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def _blocks(q, k, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal, scale, window_left, window_right,
            dropout_p, seed):
    """Yields, for every block of at most BLOCK_Q queries of every sequence: (b, rows, keys,
    p, keep, lse) with p (H, rq, sk) the softmax probabilities before dropout (0 for keys a
    query does not see; all 0 for a query that sees none), keep (H, rq, sk) bool (None without
    dropout) and lse (H, rq). k is already expanded to H heads; all in q's dtype."""
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    mask = attn_mask.expand(B, H, Sq, Sk) if attn_mask is not None else None
    seed_value = int(seed) if seed is not None else 0
    threshold = min(int(dropout_p * 2**32), _M32)
    heads = torch.arange(H, device=q.device)[:, None, None]
    for b, qs, ks in _segments(q, k, cu_seqlens_q, cu_seqlens_k):
        sq, sk = qs.stop - qs.start, ks.stop - ks.start
        if sk == 0:  # no key to see: the queries keep out = 0 and lse = -inf
            continue
        j = torch.arange(sk, device=q.device)
        for start in range(0, sq, BLOCK_Q):
            i = torch.arange(start, min(start + BLOCK_Q, sq), device=q.device)
            rows = slice(qs.start + start, qs.start + start + len(i))
            ok = _visible(i[:, None], j[None, :], sq, sk, causal, window_left, window_right)[None]
            if key_padding_mask is not None:
                ok = ok & key_padding_mask[b, ks][None, None, :]
            s = torch.einsum("hqd,hkd->hqk", q[b, :, rows], k[b, :, ks]) * scale
            if mask is not None:
                block_mask = mask[b, :, rows, ks].to(s.dtype)
                s = s + block_mask
                ok = ok & (block_mask != float("-inf"))  # -inf masks even a NaN score
            s = s.masked_fill(~ok, float("-inf"))
            m = s.amax(-1, keepdim=True)  # NaN when a visible score is NaN
            seen = ~torch.isneginf(m)  # queries that see at least one key (NaN ones too)
            p = torch.exp(s - torch.where(seen, m, torch.zeros_like(m)))
            l = p.sum(-1, keepdim=True)
            # the keys a query does not see stay 0 even in a NaN row (exp(-inf - NaN) is NaN)
            p = (p / torch.where(seen, l, torch.ones_like(l))).masked_fill(~ok, 0.0)
            lse = torch.where(seen, m + torch.log(l), torch.full_like(m, float("-inf")))[..., 0]
            keep = None
            if dropout_p > 0:
                hash_rows = (b * H + heads) * Sq + (qs.start + i)[None, :, None]
                keep = dropout_hash(seed_value, hash_rows, (ks.start + j)[None, None, :]) >= threshold
            yield b, rows, ks, p, keep, lse


def _forward(q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal, scale, window_left,
             window_right, dropout_p, seed):
    """out (B, H, Sq, Dv) and lse (B, H, Sq), computed in q's dtype."""
    B, H, Sq, _ = q.shape
    k, v = _expand_heads(k, H), _expand_heads(v, H)
    out = q.new_zeros(B, H, Sq, v.shape[-1])
    lse = q.new_full((B, H, Sq), float("-inf"))
    for b, rows, ks, p, keep, block_lse in _blocks(
        q, k, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal, scale, window_left, window_right,
        dropout_p, seed,
    ):
        if keep is not None:
            p = torch.where(keep, p / (1 - dropout_p), torch.zeros_like(p))
        # a query that sees no key gets 0, even where 0 * v is NaN
        sees_none = torch.isneginf(block_lse)[..., None]
        out[b, :, rows] = torch.einsum("hqk,hkd->hqd", p, v[b, :, ks]).masked_fill(sees_none, 0.0)
        lse[b, :, rows] = block_lse
    return out, lse


def _backward(dout, q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal, scale, window_left,
              window_right, dropout_p, seed):
    """dq, dk, dv in q's dtype (k, v with their own Hkv heads): the softmax gradient,
    recomputing the probabilities block by block (as the kernels do)."""
    B, H, Sq, _ = q.shape
    Hkv = k.shape[1]
    ke, ve = _expand_heads(k, H), _expand_heads(v, H)
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(ke)
    dv = torch.zeros_like(ve)
    for b, rows, ks, p, keep, _ in _blocks(
        q, ke, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, causal, scale, window_left, window_right,
        dropout_p, seed,
    ):
        do = dout[b, :, rows]
        dp = torch.einsum("hqd,hkd->hqk", do, ve[b, :, ks])  # d(loss)/d(probabilities after dropout)
        p_used = p
        if keep is not None:
            p_used = torch.where(keep, p / (1 - dropout_p), torch.zeros_like(p))
            dp = torch.where(keep, dp / (1 - dropout_p), torch.zeros_like(dp))
        dv[b, :, ks] += torch.einsum("hqk,hqd->hkd", p_used, do)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # softmax backward
        dq[b, :, rows] = torch.einsum("hqk,hkd->hqd", ds, ke[b, :, ks]) * scale
        dk[b, :, ks] += torch.einsum("hqk,hqd->hkd", ds, q[b, :, rows]) * scale
    group = H // Hkv
    if group > 1:  # each k/v head served `group` query heads: their gradients add up
        dk = dk.view(B, Hkv, group, *dk.shape[2:]).sum(2)
        dv = dv.view(B, Hkv, group, *dv.shape[2:]).sum(2)
    return dq, dk, dv


def attention_forward_ref(q: Tensor, k: Tensor, v: Tensor, args: AttentionArgs, upcast: bool = True) -> tuple[Tensor, Tensor]:
    """out (B, H, Sq, Dv) in q's dtype and, when Dv == D, q's memory layout; lse (B, H, Sq) in
    the statistics dtype. upcast=False computes everything in q's dtype instead: what the
    tests use as "PyTorch's error in this dtype" (as flash-attention's tests do)."""
    acc = stats_dtype(q.dtype) if upcast else q.dtype
    out, lse = _forward(q.to(acc), k.to(acc), v.to(acc), *_options(args))
    return _laid_out_like(q, out), lse.to(stats_dtype(q.dtype))


def _options(a: AttentionArgs) -> tuple:
    """The arguments of _forward, _backward and _blocks after the tensors they compute with."""
    return (a.attn_mask, a.key_padding_mask, a.cu_seqlens_q, a.cu_seqlens_k, a.causal, a.scale, a.window_left,
            a.window_right, a.dropout_p, a.seed)


def _laid_out_like(t: Tensor, value: Tensor) -> Tensor:
    """value (t's shape) in t's dtype and memory layout, which is what every backend returns."""
    if value.shape != t.shape:
        return value.to(t.dtype)
    return torch.empty_like(t).copy_(value)


def attention_backward_ref(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor | None, lse: Tensor | None, args: AttentionArgs,
    upcast: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (shapes, dtypes and layouts of q, k, v), computed in the statistics dtype
    (or, upcast=False, in q's dtype); out and lse are not needed: the probabilities are
    recomputed."""
    acc = stats_dtype(q.dtype) if upcast else q.dtype
    dq, dk, dv = _backward(dout.to(acc), q.to(acc), k.to(acc), v.to(acc), *_options(args))
    return _laid_out_like(q, dq), _laid_out_like(k, dk), _laid_out_like(v, dv)


def attention_decode_ref(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, causal: bool, scale: float, window_left: int
) -> tuple[Tensor, Tensor]:
    """Attention of a few new queries against a key/value cache.

    q: (B, H, Sq, D); k_cache, v_cache: (B, Hkv, S_max, D); cache_seqlens: int32 (B,), the
    number of valid cache entries of each sequence (the new tokens' keys already appended).
    Sequence b is attention over k_cache[b, :, :cache_seqlens[b]] with the rules above (causal
    aligned bottom-right: the last query sees every valid key). Returns out (B, H, Sq, Dv) and
    lse (B, H, Sq)."""
    outs, lses = [], []
    for b, n in enumerate(cache_seqlens.tolist()):
        n = min(max(n, 0), k_cache.shape[2])  # as the GPU kernels, which do not check it
        o, l = attention_forward_ref(
            q[b : b + 1], k_cache[b : b + 1, :, :n], v_cache[b : b + 1, :, :n],
            AttentionArgs(causal=causal, scale=scale, window_left=window_left),
        )
        outs.append(o)
        lses.append(l)
    return _laid_out_like(q, torch.cat(outs)), torch.cat(lses)


def append_kv_ref(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, cache_seqlens: Tensor) -> None:
    """Writes k_new, v_new (B, Hkv, S_new, D) into the caches (B, Hkv, S_max, D) at slots
    cache_seqlens[b] .. cache_seqlens[b] + S_new of each sequence b (checked by the caller)."""
    batch, _, new, _ = k_new.shape
    positions = cache_seqlens.long()[:, None] + torch.arange(new, device=k_new.device)  # (B, new)
    rows = torch.arange(batch, device=k_new.device)[:, None].expand(batch, new)
    # advanced indexing on dims 0 and 2 puts the indexed dims first: (B, new, Hkv, D)
    k_cache[rows, :, positions] = k_new.transpose(1, 2)
    v_cache[rows, :, positions] = v_new.transpose(1, 2)
