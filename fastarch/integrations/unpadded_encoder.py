"""BERT-style transformers encoders (BertEncoder and the copies transformers keeps of it:
RoBERTa, XLM-RoBERTa, ELECTRA, CamemBERT, ...) run on the real tokens of a padded batch only.

A tokenizer pads each batch to its longest sentence; in a batch of mixed lengths most of the
matmuls, norms and attention then work on padding (61% of the tokens of the drop-in
benchmark's 32 sentences). fastarch.optimize swaps such an encoder for an UnpaddedEncoder that
packs the real tokens along one axis (fastarch/models/packing.py), runs each layer's own
submodules on them (its Linear and LayerNorm layers, swapped or not, with the same
parameters) and attention through fastarch.ops.attention's packed variable-length form, and
scatters the result back: the hidden states of real tokens are the encoder's within a rounding;
those at padding positions are 0 (transformers computes values there from the padding tokens,
which no real token reads; ModernBERT's unpadded path gives 0 as well).

It takes the packed path for an eager inference call (eval mode; under torch.compile the
original encoder runs, as packing reads the mask on the host) with a boolean key-padding mask
(what transformers builds for the "fastarch" and "sdpa" attention implementations) that hides
at least one position, and no cache, cross-attention, recorded outputs (output_hidden_states,
output_attentions) or hooks on its layers; every other call runs the original encoder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastarch import cuda_graphs, ops
from fastarch.models.packing import Packing, pack, unpack, unpad
from fastarch.optimize import _ORIGINAL, tree_call_hooked
from fastarch.override import attention_direct

# keyword arguments of BertEncoder.forward the packed path takes when they are None (tensors,
# caches) or false (flags); position_ids are unused by BERT's layers
_ABSENT_KWARGS = ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values")
_FLAG_KWARGS = ("use_cache", "output_attentions", "output_hidden_states")


def bert_style_reason(encoder: nn.Module) -> str | None:
    """None when ``encoder`` is a BERT-style transformers encoder the packed path runs as
    transformers does, else why not. Recognised by structure: a ``layer`` list of encoder
    layers (not decoders, no cross-attention, no chunked feed-forward) whose self-attention
    has query/key/value linears and absolute positions."""
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return "no list of layers"
    for layer in layers:
        attention = getattr(layer, "attention", None)
        self_attn = getattr(attention, "self", None)
        parts = (getattr(attention, "output", None), getattr(layer, "intermediate", None), getattr(layer, "output", None))
        if self_attn is None or any(p is None for p in parts) or not hasattr(layer, "feed_forward_chunk"):
            return "its layers are not BERT-style (attention.self, attention.output, intermediate, output)"
        if not all(isinstance(getattr(self_attn, n, None), nn.Linear) for n in ("query", "key", "value")):
            return "its self-attention has no query/key/value linear layers"
        if getattr(layer, "is_decoder", False) or getattr(layer, "add_cross_attention", False):
            return "a decoder (causal self-attention or cross-attention)"
        if getattr(self_attn, "is_causal", False):
            return "causal self-attention"
        if getattr(layer, "chunk_size_feed_forward", 0):
            return "a chunked feed-forward (chunk_size_feed_forward)"
        if getattr(self_attn, "position_embedding_type", "absolute") != "absolute":
            return "relative position embeddings in its attention"
    return None


class UnpaddedEncoder(nn.Module):
    """A BERT-style encoder (the original, in ``__dict__``) holding its very ``layer`` list:
    the same modules and parameters, the same state_dict keys."""

    def __init__(self, original: nn.Module, backend: str | None = None) -> None:
        super().__init__()
        self.layer = original.layer
        self.config = getattr(original, "config", None)
        self.__dict__[_ORIGINAL] = original
        self._fastarch_backend = backend
        self.train(original.training)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args, **kwargs):
        """As the original encoder's forward; hidden_states (B, S, C)."""
        real = self._real_tokens(hidden_states, attention_mask, args, kwargs)
        if real is None:
            return self.__dict__[_ORIGINAL](hidden_states, attention_mask, *args, **kwargs)
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        packing = unpad(real)
        x = pack(hidden_states, packing)  # (total, C)
        for layer in self.layer:
            x = self._layer(layer, x, packing)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=unpack(x, packing))

    def _real_tokens(self, hidden_states: object, mask: object, args: tuple, kwargs: dict) -> Tensor | None:
        """The (B, S) bool mask of real tokens when the call can take the packed path, else None."""
        if torch.compiler.is_compiling():  # the packing reads the mask on the host: a graph break
            return None
        if self.training or type(hidden_states) is not Tensor or hidden_states.dim() != 3:
            return None
        known = _ABSENT_KWARGS + _FLAG_KWARGS + ("position_ids",)
        if any(a is not None for a in args) or any(k not in known for k in kwargs):
            return None
        if any(kwargs.get(k) is not None for k in _ABSENT_KWARGS) or any(kwargs.get(k) for k in _FLAG_KWARGS):
            return None
        if type(mask) is not Tensor or mask.dtype != torch.bool or mask.dim() != 4:
            return None  # no padding (None), or an additive / per-query mask: nothing to pack by
        if cuda_graphs.recording():
            return None  # a CUDA graph's capture (fastarch.cuda_graphs) may not read the device
        B, S = hidden_states.shape[:2]
        # hooks on a layer (a user's, or transformers' recording of hidden states) need the layers called
        if mask.shape != (B, 1, S, S) or tree_call_hooked(self.layer):
            return None
        real = mask[:, 0, 0, :]
        # both questions in one read of the device (on a GPU, each read waits for its queue)
        padded, per_key = torch.stack([~real.all(), (mask == real[:, None, None, :]).all()]).tolist()
        if not padded or not per_key:
            return None  # no padding, or a mask that is not the same for every query
        return real

    def _layer(self, layer: nn.Module, x: Tensor, packing: Packing) -> Tensor:
        """One BERT layer on packed rows x (total, C): its own submodules, attention packed."""
        self_attn = layer.attention.self
        H, D = self_attn.num_attention_heads, self_attn.attention_head_size
        q, k, v = (proj(x).view(-1, H, D) for proj in (self_attn.query, self_attn.key, self_attn.value))
        scale = getattr(self_attn, "scaling", D**-0.5)
        # (the packing's offsets are ours: the kernel called directly where it can, without the
        # op's checks of them at every layer)
        context = attention_direct(q, k, v, scale, self._fastarch_backend, packing.cu_seqlens, packing.max_seqlen)
        if context is None:
            context = ops.attention(
                q, k, v, cu_seqlens_q=packing.cu_seqlens, cu_seqlens_k=packing.cu_seqlens,
                max_seqlen_q=packing.max_seqlen, max_seqlen_k=packing.max_seqlen, scale=scale,
                backend=self._fastarch_backend,
            )
        h = layer.attention.output(context.reshape(x.shape[0], H * D), x)
        return layer.feed_forward_chunk(h)
