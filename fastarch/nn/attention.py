"""MultiheadAttention: torch.nn.MultiheadAttention (same arguments, parameters and state_dict)
running fastarch.ops.attention when no attention weights are asked for."""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import ops
from fastarch.nn._source import check_source
from fastarch.nn.linear import linear


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for torch.nn.MultiheadAttention.

    forward(..., need_weights=False) runs fastarch's fused attention and returns
    (output, None). need_weights=True — torch's default, so a plain ``mha(q, k, v)`` — must
    return the attention weights, which a fused kernel never forms: that call, and
    add_bias_kv / add_zero_attn, run torch's own code unchanged. Pass need_weights=False to
    run fastarch. Masks keep torch's conventions: key_padding_mask True (or -inf) marks
    padding; a bool attn_mask is True where attention is NOT allowed; is_causal is a hint that
    attn_mask is the causal mask (without attn_mask it is an error, as in torch). One
    difference: a query whose keys are all masked gets zeros where torch gives NaN.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if is_causal and attn_mask is None:
            # torch's message: is_causal only says what attn_mask holds
            raise RuntimeError(
                "fastarch.nn.MultiheadAttention: need attn_mask if specifying the is_causal hint (as torch;"
                " torch.nn.Transformer.generate_square_subsequent_mask makes it)"
            )
        if (
            need_weights
            or self.bias_k is not None
            or self.add_zero_attn
            or not _torch_mask_form(attn_mask, query)
            or not _torch_mask_form(key_padding_mask, query)
        ):
            return super().forward(
                query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
                average_attn_weights=average_attn_weights, is_causal=is_causal,
            )
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0 if self.batch_first else 1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, _ = query.shape
        q, k, v = self._project(query, key, value)
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = (t.view(n, t.shape[1], heads, head_dim).transpose(1, 2) for t in (q, k, v))  # (N, H, len, hd)
        source = k.shape[2]

        mask, keep = None, None
        if attn_mask is not None:
            if attn_mask.dim() == 3:  # (N * H, L, S)
                attn_mask = attn_mask.view(n, heads, length, source)
            mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                keep = ~key_padding_mask
            else:  # a float padding mask adds to the scores like attn_mask
                padding = key_padding_mask.to(q.dtype).view(n, 1, 1, source)
                if mask is not None and mask.dtype == torch.bool:
                    mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
                mask = padding if mask is None else mask + padding
        causal = bool(is_causal and mask is not None and length == source and mask.dim() == 2)
        if causal:
            mask = None  # is_causal promises that attn_mask is the causal mask: use the kernel's
        out = ops.attention(
            q, k, v, causal=causal, attn_mask=mask, key_padding_mask=keep,
            dropout_p=self.dropout if self.training else 0.0,
        )
        # torch's forward, too, takes out_proj's tensors (not its forward, nor its hooks)
        out = linear(out.transpose(1, 2).reshape(n, length, self.embed_dim), self.out_proj.weight, self.out_proj.bias)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
        return out, None

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The input projections (N, len, E) -> q, k, v, as torch's multi_head_attention_forward,
        on fastarch.ops.linear (on CPUs without AVX-512, PyTorch's 16-bit products have no
        vector path; the op widens them to fp32)."""
        e = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e : 2 * e], b[2 * e :])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if query is key and key is value:  # self-attention: one matmul
                return linear(query, w, b).chunk(3, dim=-1)
            return linear(query, w[:e], bq), linear(key, w[e : 2 * e], bk), linear(value, w[2 * e :], bv)
        return (
            linear(query, self.q_proj_weight, bq),
            linear(key, self.k_proj_weight, bk),
            linear(value, self.v_proj_weight, bv),
        )

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention) -> MultiheadAttention:
        """A fastarch MultiheadAttention sharing ``module``'s parameters (no copy)."""
        check_source(cls, module, torch.nn.MultiheadAttention)
        new = cls(
            module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
            vdim=module.vdim, batch_first=module.batch_first, device="meta",
        )
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k", "bias_v"):
            setattr(new, name, getattr(module, name))
        new.out_proj = module.out_proj
        return new.train(module.training)


def _torch_mask_form(mask: Tensor | None, query: Tensor) -> bool:
    """Whether ``mask`` is None, bool or of the query's float dtype: the forms this module
    runs itself. torch's forward takes the rest (and refuses an integer mask, or a float mask
    of another dtype, with its own message)."""
    return mask is None or (isinstance(mask, Tensor) and mask.dtype in (torch.bool, query.dtype))
