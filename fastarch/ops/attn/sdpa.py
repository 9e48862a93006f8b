"""``scaled_dot_product_attention``: torch.nn.functional's, on fastarch's kernels."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastarch.ops.attn import checks
from fastarch.ops.attn.api import attention

# who checks the arguments, in the errors' words (one object for every call)
_CALLER = checks.Caller("scaled_dot_product_attention", "query", "key", "value", torch_errors=True)


def _batch_shape(c: checks.Caller, *shapes: tuple[int, ...], hint: str = "") -> tuple[int, ...]:
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        raise c.value_error(
            f"the batch dims of {c.q}, {c.k} and {c.v} must broadcast, got {', '.join(str(tuple(s)) for s in shapes)}"
            + hint
        ) from None


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, on fastarch's kernels.

    Same signature and semantics: query (..., L, E), key (..., S, E), value (..., S, Ev); the
    leading dims broadcast against each other (with enable_gqa, dim -3 holds the heads, the
    query's a multiple of the key's); is_causal is top-left aligned; a bool attn_mask is True
    where attention is allowed; dropout_p = 1 gives zeros. Errors are RuntimeErrors, as
    torch's. Differences: dropout draws its mask from torch's default CPU generator with
    fastarch's hash (a different mask than torch's, the same distribution); a query whose keys
    are all masked gets zeros where torch gives NaN; scale must be finite; key and value must
    have the same length (torch's CPU kernel does not check it).
    """
    c = _CALLER
    for name, t in (("query", query), ("key", key), ("value", value)):
        checks.tensor(c, t, name)
        if t.dim() < 2:
            raise c.value_error(f"{name} must have at least 2 dims (..., seq, dim), got shape {tuple(t.shape)}")
    if is_causal and attn_mask is not None:
        raise c.value_error("attn_mask must be None when is_causal=True (as in torch)")
    checks.check_dropout(c, dropout_p)
    if scale is not None:
        checks.check_scale(c, scale)
    L, E = query.shape[-2:]
    S = key.shape[-2]
    lead_q, lead_k, lead_v = query.shape[:-2], key.shape[:-2], value.shape[:-2]
    if enable_gqa and len(lead_q) >= 1 and len(lead_k) >= 1 and len(lead_v) >= 1:
        batch = _batch_shape(c, lead_q[:-1], lead_k[:-1], lead_v[:-1])
        heads_q, heads_kv = lead_q[-1], lead_k[-1]
        if lead_v[-1] != heads_kv:
            raise c.value_error(f"key and value must have the same number of heads, got {heads_kv} and {lead_v[-1]}")
        out_lead = (*batch, heads_q)
    else:
        grouped = len(lead_q) > 0 and len(lead_k) > 0 and lead_k[-1] > 0 and lead_q[-1] % lead_k[-1] == 0
        hint = "; pass enable_gqa=True for grouped-query attention" if grouped else ""
        out_lead = _batch_shape(c, lead_q, lead_k, lead_v, hint=hint)
        batch, heads_q = out_lead[:-1], (out_lead[-1] if out_lead else 1)
        heads_kv = heads_q
    n = math.prod(batch)

    def four_d(t: Tensor, heads: int) -> Tensor:
        t = t.expand(*batch, heads, *t.shape[-2:]) if t.shape[:-2] != (*batch, heads) else t
        return t.reshape(n, heads, *t.shape[-2:])

    q, k, v = four_d(query, heads_q), four_d(key, heads_kv), four_d(value, heads_kv)
    checks.check_qkv(c, q, k, v, packed=False)
    if attn_mask is not None:
        checks.tensor(c, attn_mask, "attn_mask")
        if attn_mask.dim() > 4 or len(batch) > 1:  # broadcast against every batch dim, then flatten them
            try:
                attn_mask = attn_mask.expand(*batch, heads_q, L, S)
            except RuntimeError:
                raise c.value_error(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to"
                                    f" {(*batch, heads_q, L, S)}") from None
            attn_mask = attn_mask.reshape(n, heads_q, L, S)
        attn_mask = checks.attn_mask(c, attn_mask, q, (n, heads_q, L, S))
    if not is_causal or L <= S:
        # top-left causal over S >= L keys is bottom-right causal over the first L keys
        k_used, v_used = (k[:, :, :L], v[:, :, :L]) if is_causal and L < S else (k, v)
        out = attention(q, k_used, v_used, causal=is_causal, scale=scale, attn_mask=attn_mask, dropout_p=dropout_p)
    else:
        # L > S: the first S queries are causal (a square), the rest see every key
        head = attention(q[:, :, :S], k, v, causal=True, scale=scale, dropout_p=dropout_p)
        tail = attention(q[:, :, S:], k, v, causal=False, scale=scale, dropout_p=dropout_p)
        out = torch.cat([head, tail], dim=2)
    return out.reshape(*out_lead, L, value.shape[-1])
