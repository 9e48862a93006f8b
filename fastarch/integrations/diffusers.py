"""fastarch as a diffusers attention processor::

    from fastarch.integrations.diffusers import FastarchAttnProcessor
    unet.set_attn_processor(FastarchAttnProcessor())     # or fastarch.optimize(unet)

FastarchAttnProcessor computes what diffusers' AttnProcessor2_0 computes for its Attention
module (self- and cross-attention, the spatial and group norms, q/k norms, the additive
attention mask diffusers prepares, the residual and output rescaling) with the attention
itself on fastarch.ops.attention where a fastarch kernel backend can run it, and hands every
other call to the processor it replaced (or AttnProcessor2_0).
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import Tensor

from fastarch import ops
from fastarch.override import _sdpa_backend


class FastarchAttnProcessor:
    """A diffusers attention processor on fastarch. previous: the processor to run where
    fastarch cannot (and for fastarch.restore); default AttnProcessor2_0. backend: force a
    fastarch backend (default automatic)."""

    def __init__(self, previous: object | None = None, backend: str | None = None) -> None:
        self.previous = previous if previous is not None else AttnProcessor2_0()
        self.backend = backend

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        if args or kwargs or unsupported_reason(attn):
            return self.previous(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image = hidden_states.dim() == 4
        if image:  # (B, C, H, W) -> (B, H * W, C)
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, source = context.shape[:2]
        if attention_mask is not None:
            # (B or B * heads, 1 or Sq, Sk) additive -> (B, heads, 1 or Sq, Sk), as diffusers prepares it
            attention_mask = attn.prepare_attention_mask(attention_mask, source, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        chosen = _sdpa_backend(q, k, v, attention_mask, 0.0, False, None, False, self.backend)
        if chosen:
            out = ops.attention(q, k, v, attn_mask=attention_mask, backend=chosen)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # projection, dropout
        if image:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def unsupported_reason(attn: Attention) -> str | None:
    """Why FastarchAttnProcessor would hand ``attn``'s calls to the previous processor, or None."""
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        return "added key/value projections (AttnAddedKVProcessor's layout)"
    if getattr(attn, "to_out", None) is None or len(attn.to_out) != 2:
        return "no (projection, dropout) output"
    head_dim = attn.to_k.out_features // attn.heads
    if not math.isclose(attn.scale, head_dim**-0.5, rel_tol=1e-6):
        # AttnProcessor2_0 ignores attn.scale and AttnProcessor applies it: leave that to diffusers
        return f"attn.scale {attn.scale} is not 1/sqrt(head_dim)"
    return None


_REPLACEABLE = (AttnProcessor2_0, AttnProcessor)


def optimize_model(model: torch.nn.Module, report, backend: str | None) -> None:
    """fastarch.optimize's diffusers part: FastarchAttnProcessor on every Attention module whose
    processor is diffusers' default (AttnProcessor2_0 or AttnProcessor)."""
    for path, m in model.named_modules():
        if not isinstance(m, Attention):
            continue
        processor = m.processor
        if isinstance(processor, FastarchAttnProcessor):
            report.add(path, "Attention", True, "processor already FastarchAttnProcessor")
        elif type(processor) not in _REPLACEABLE:
            report.add(path, "Attention", False, f"processor {type(processor).__name__} is not diffusers' default")
        elif why := unsupported_reason(m):
            report.add(path, "Attention", False, why)
        else:
            m.set_processor(FastarchAttnProcessor(processor, backend))
            report.add(path, "Attention", True, f"processor {type(processor).__name__} -> FastarchAttnProcessor")


def restore_model(model: torch.nn.Module) -> None:
    """Undo optimize_model: each Attention module gets back the processor object it had."""
    for m in model.modules():
        if isinstance(m, Attention) and isinstance(m.processor, FastarchAttnProcessor):
            m.set_processor(m.processor.previous)
