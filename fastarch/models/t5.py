"""T5 on fastarch's kernels: the encoder-decoder of T5, T5 v1.1 and FLAN-T5.

    model = T5.from_pretrained("path/to/t5")                      # a transformers checkpoint
    logits = model(input_ids, attention_mask, decoder_input_ids)   # (B, T, vocab)
    loss, logits = model(input_ids, attention_mask, labels=labels) # training, as transformers
    ids = model.generate(input_ids, attention_mask, max_new_tokens=32)  # decoder_start + new tokens

Pre-norm blocks without biases: x + attn(norm(x)) (and, in the decoder, x + cross_attn(norm(x),
encoder output)), then x + ff(norm(x)); a final norm per stack. The norm is T5's RMS norm
(no mean, no bias: fastarch.ops.rms_norm, the residual adds fused into it with add_rms_norm;
statistics in fp32 like T5LayerNorm's, which then rounds the normalized x to the weight's dtype
before the weight multiply: in bf16 ours rounds once, transformers twice, one ulp apart).
The feed-forward is wo(act(wi(x))) or, for config feed_forward_proj "gated-<act>" (v1.1,
FLAN), wo(act(wi_0(x)) * wi_1(x)).

Positions are not embedded: each stack's first layer owns a table of relative-position
biases (one per head and bucket of key - query distance; bidirectional buckets in the
encoder, unidirectional in the decoder), computed once per forward and added to every
layer's attention scores (fastarch.ops.attention's attn_mask). Scores are not scaled by
1/sqrt(d) (T5 folds that into its initialisation). Cross-attention has no position bias.

Output: the decoder's final norm, times d_model**-0.5 when the head is tied to the embeddings
(config tie_word_embeddings, T5's default; transformers 5 writes it as scale_decoder_outputs),
then the LM head (the shared embedding, or a separate lm_head.weight when the checkpoint has one).

Training: fastarch.ops.attention gives no gradient for attn_mask, so the position-bias
gradient is computed beside it from the saved log-sum-exp (_BiasGrad); with dropout the
attentions that carry a bias run in plain PyTorch (the gradient needs the dropped
probabilities). Loaded in bf16, every weight is bf16 (transformers keeps the feed-forward's
wo in fp32, which makes its residual stream fp32 after the first block; ours stays bf16).

Generation (model.generate) encodes once, computes each decoder layer's cross-attention keys
and values once, and decodes with a static self-attention cache (generate.py's KVCache,
allocated once); the token choice is generate.py's SamplingOptions.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastarch import ops
from fastarch.nn import Linear  # nn.Linear on fastarch.ops.linear: a decode step's weights streamed once
from fastarch.models.generate import KVCache, SamplingOptions, _eos_list, check_min_new_tokens, hold_eos, nan_rows
from fastarch.models.loading import CheckpointError, load_into, read_config, read_weights, without_random_init

# transformers' activation names (config dense_act_fn) -> how the feed-forward applies them
_ACTS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "silu", "swish")


def _act(name: str, x: Tensor) -> Tensor:
    if name == "relu":
        return F.relu(x)
    if name == "gelu":
        return ops.bias_gelu(x, None, "none")
    if name in ("silu", "swish"):
        return F.silu(x)
    return ops.bias_gelu(x, None, "tanh")  # gelu_new and its aliases: the tanh approximation


@dataclass
class T5Config:
    """The hyperparameters, under T5's config.json names."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None  # None: tie_word_embeddings (transformers 5 writes it)
    pad_token_id: int = 0
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int | None = None  # None: pad_token_id (T5's)

    @classmethod
    def from_dict(cls, config: dict) -> T5Config:
        model_type = config.get("model_type", "t5")
        if model_type != "t5":
            raise CheckpointError(f"T5Config reads model_type t5, got {model_type!r}")
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in config.items() if k in names and v is not None})
        if cfg.num_decoder_layers is None:
            cfg.num_decoder_layers = cfg.num_layers
        if cfg.scale_decoder_outputs is None:
            cfg.scale_decoder_outputs = bool(cfg.tie_word_embeddings)
        if cfg.decoder_start_token_id is None:
            cfg.decoder_start_token_id = cfg.pad_token_id
        cfg.check()
        return cfg

    def check(self) -> None:
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or self.act not in _ACTS:
            raise CheckpointError(
                f"config.json: feed_forward_proj {self.feed_forward_proj!r} is not supported"
                f" ('<act>' or 'gated-<act>', act one of {', '.join(_ACTS)})"
            )
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise CheckpointError(f"config.json: {name} must be an int >= 1, got {value!r}")

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def act(self) -> str:
        act = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act  # as transformers reads it


# ----------------------------------------------------------------------------- relative positions


def relative_position_bucket(relative: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of each key - query distance: half the buckets (of each sign, when
    bidirectional) hold the exact small distances, the rest grow logarithmically up to
    max_distance, beyond which all distances share the last bucket. A unidirectional
    (decoder) bucket counts only distances to earlier keys; later ones fall in bucket 0."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    # log-spaced buckets; the float formula is transformers' (the truncation decides the bucket)
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < exact, distance, large)


class Attention(nn.Module):
    """q, k, v, o projections (no biases)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.q = Linear(cfg.d_model, inner, bias=False)
        self.k = Linear(cfg.d_model, inner, bias=False)
        self.v = Linear(cfg.d_model, inner, bias=False)
        self.o = Linear(inner, cfg.d_model, bias=False)


class FeedForward(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        if cfg.gated:
            self.wi_0 = Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = Linear(cfg.d_ff, cfg.d_model, bias=False)


class Layer(nn.Module):
    """One block's parameters; cross is None in the encoder. The model runs it (residual adds
    are fused into the next norm, across block boundaries)."""

    def __init__(self, cfg: T5Config, decoder: bool) -> None:
        super().__init__()
        self.attn_norm = nn.Parameter(torch.ones(cfg.d_model))
        self.attn = Attention(cfg)
        if decoder:
            self.cross_norm = nn.Parameter(torch.ones(cfg.d_model))
            self.cross = Attention(cfg)
        else:
            self.cross_norm = self.cross = None
        self.ff_norm = nn.Parameter(torch.ones(cfg.d_model))
        self.ff = FeedForward(cfg)


class Stack(nn.Module):
    def __init__(self, cfg: T5Config, decoder: bool) -> None:
        super().__init__()
        self.decoder = decoder
        n = cfg.num_decoder_layers if decoder else cfg.num_layers
        self.layers = nn.ModuleList(Layer(cfg, decoder) for _ in range(n))
        self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.final_norm = nn.Parameter(torch.ones(cfg.d_model))


class _BiasGrad(torch.autograd.Function):
    """The identity on attention's output whose backward gives the gradient of the additive
    score bias (fastarch.ops.attention, like FlashAttention, returns none for attn_mask):
    dbias = P * (dO V^T - rowsum(dO * O)), P recomputed from the saved log-sum-exp. This
    materializes the (B, H, Sq, Sk) scores, as the bias gradient itself has that shape."""

    @staticmethod
    def forward(ctx, out, bias, q, k, v, lse, key_padding_mask, causal):
        ctx.save_for_backward(out, bias, q, k, v, lse, key_padding_mask)
        ctx.causal = causal
        return out.clone()

    @staticmethod
    def backward(ctx, dout):
        out, bias, q, k, v, lse, kpm = ctx.saved_tensors
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        q, k, v, out, dout_, bias_ = (t.to(acc) for t in (q, k, v, out, dout, bias))
        scores = q @ k.transpose(-1, -2) + bias_
        scores = scores + _mask_bias(kpm, ctx.causal, scores.shape[-2], scores.shape[-1], scores.device).to(acc)
        seen = torch.isfinite(lse)[..., None]  # a query that sees no key has no gradient
        p = torch.where(seen, torch.exp(scores - torch.where(seen, lse[..., None].to(acc), 0)), 0)
        dp = dout_ @ v.transpose(-1, -2)
        ds = p * (dp - (dout_ * out).sum(-1, keepdim=True))
        dbias = ds.sum_to_size(bias.shape).to(bias.dtype)
        return dout, dbias, None, None, None, None, None, None


def _mask_bias(kpm: Tensor | None, causal: bool, sq: int, sk: int, device) -> Tensor:
    """-inf at the keys a query does not see (padding; later positions when causal), 0 elsewhere."""
    bias = torch.zeros((), device=device)
    if kpm is not None:
        bias = bias + torch.zeros(kpm.shape, device=device).masked_fill(~kpm, float("-inf"))[:, None, None, :]
    if causal:  # bottom-right aligned, as fastarch.ops.attention's
        i = torch.arange(sq, device=device)[:, None] + (sk - sq)
        bias = bias + torch.zeros(sq, sk, device=device).masked_fill(torch.arange(sk, device=device) > i, float("-inf"))
    return bias


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, kpm: Tensor | None, causal: bool,
            dropout_p: float) -> Tensor:
    """softmax(q k^T + bias, masked) v, unscaled: q (B, H, Sq, D), k and v (B, H, Sk, D), bias
    broadcastable to (B, H, Sq, Sk) in q's dtype, kpm bool (B, Sk) True = a real key."""
    needs_bias_grad = bias is not None and bias.requires_grad and torch.is_grad_enabled()
    if needs_bias_grad and dropout_p > 0:
        # the bias gradient under dropout needs the dropped probabilities: plain PyTorch
        scores = (q.float() @ k.float().transpose(-1, -2) + bias.float()
                  + _mask_bias(kpm, causal, q.shape[-2], k.shape[-2], q.device))
        p = F.dropout(torch.softmax(scores, -1).nan_to_num(0.0), dropout_p, True)
        return (p @ v.float()).to(q.dtype)
    mask = bias.detach() if bias is not None else None
    out = ops.attention(q, k, v, attn_mask=mask, key_padding_mask=kpm, causal=causal, scale=1.0,
                        dropout_p=dropout_p, return_lse=needs_bias_grad)
    if needs_bias_grad:
        out, lse = out
        out = _BiasGrad.apply(out, bias, q.detach(), k.detach(), v.detach(), lse, kpm, causal)
    return out


# ----------------------------------------------------------------------------- the model


class T5(nn.Module):
    """T5ForConditionalGeneration: encoder ids + decoder ids -> next-token logits."""

    # fastarch.models.generate(model, ...) hands an encoder-decoder to its own generate
    is_encoder_decoder = True

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, decoder=False)
        self.decoder = Stack(cfg, decoder=True)
        self.lm_head: nn.Linear | None = None  # None: the shared embedding (from_pretrained adds one if saved)
        self.n_head, self.head_dim = cfg.num_heads, cfg.d_kv

    @property
    def eos_token_id(self) -> int | list[int] | None:
        return self.config.eos_token_id

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    # ------------------------------------------------------------------ pieces

    def _check_ids(self, ids: Tensor, name: str, mask: Tensor | None = None, mask_name: str = "") -> None:
        if not isinstance(ids, Tensor):
            raise TypeError(f"{name} must be a tensor of token ids, got {type(ids).__name__}")
        if ids.dim() != 2:
            raise ValueError(f"{name} must be (batch, seqlen), got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got {ids.dtype}")
        if ids.numel():
            lo, hi = torch.stack(torch.aminmax(ids)).tolist()
            if lo < 0 or hi >= self.config.vocab_size:
                # an id past the embedding table is a device-side assert on a GPU: refuse it here
                raise ValueError(f"{name} must lie in [0, {self.config.vocab_size}), got ids from {lo} to {hi}")
        if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(ids.shape)):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"{mask_name} must have the shape of {name}, {tuple(ids.shape)}, got {shape}")

    def position_bias(self, stack: Stack, sq: int, sk: int, offset: int = 0) -> Tensor:
        """(1, H, sq, sk) bias of queries at positions offset .. offset+sq-1 over keys 0 .. sk-1."""
        device = stack.relative_attention_bias.weight.device
        relative = torch.arange(sk, device=device)[None, :] - (torch.arange(sq, device=device)[:, None] + offset)
        cfg = self.config
        buckets = relative_position_bucket(relative, not stack.decoder, cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
        return stack.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def _heads(self, x: Tensor) -> Tensor:
        """(B, S, H*D) -> (B, H, S, D)."""
        return x.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)

    def _merge(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2).flatten(2)

    def _ff(self, layer: Layer, y: Tensor) -> Tensor:
        ff, act = layer.ff, self.config.act
        h = _act(act, ff.wi_0(y)) * ff.wi_1(y) if self.config.gated else _act(act, ff.wi(y))
        return ff.wo(self._dropout(h))

    def _dropout(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.config.dropout_rate, self.training)

    def _run(self, stack: Stack, x: Tensor, self_attend, cross_attend=None) -> Tensor:
        """The blocks of a stack on embeddings x (B, S, C): self_attend(i, layer, y) and
        cross_attend(i, layer, y) give the attentions' outputs (B, S, C) before o. Returns
        the final norm's output."""
        eps = self.config.layer_norm_epsilon
        h = self._dropout(x)
        y = ops.rms_norm(h, stack.layers[0].attn_norm, eps)
        for i, layer in enumerate(stack.layers):
            nxt = stack.layers[i + 1].attn_norm if i + 1 < len(stack.layers) else stack.final_norm
            a = self._dropout(layer.attn.o(self_attend(i, layer, y)))
            if layer.cross is not None:
                y, h = ops.add_rms_norm(a, h, layer.cross_norm, eps)
                a = self._dropout(layer.cross.o(cross_attend(i, layer, y)))
            y, h = ops.add_rms_norm(a, h, layer.ff_norm, eps)
            y, h = ops.add_rms_norm(self._dropout(self._ff(layer, y)), h, nxt, eps)
        return self._dropout(y)

    def _attn_dropout(self) -> float:
        return self.config.dropout_rate if self.training else 0.0

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The encoder's output (B, S, d_model). attention_mask (B, S): 1 = a real token
        (padding on either side is never attended to)."""
        self._check_ids(input_ids, "input_ids", attention_mask, "attention_mask")
        kpm = None if attention_mask is None else attention_mask.to(input_ids.device) != 0
        if kpm is not None and kpm.numel():
            empty = (~kpm.any(1)).nonzero().flatten().tolist()
            if empty:  # its decoder would attend to no encoder token at all
                raise ValueError(f"attention_mask: rows {empty} have no real token (every input needs at least one)")
        x = self.shared(input_ids)
        S = input_ids.shape[1]
        bias = self.position_bias(self.encoder, S, S).to(x.dtype)

        def attend(i: int, layer: Layer, y: Tensor) -> Tensor:
            q, k, v = (self._heads(p(y)) for p in (layer.attn.q, layer.attn.k, layer.attn.v))
            return self._merge(_attend(q, k, v, bias, kpm, False, self._attn_dropout()))

        return self._run(self.encoder, x, attend)

    def _cross_kv(self, layer: Layer, encoder_out: Tensor) -> tuple[Tensor, Tensor]:
        return self._heads(layer.cross.k(encoder_out)), self._heads(layer.cross.v(encoder_out))

    def _logits(self, y: Tensor) -> Tensor:
        if self.config.scale_decoder_outputs:
            y = y * self.config.d_model**-0.5
        return ops.linear(y, (self.lm_head or self.shared).weight)

    def decode(self, decoder_input_ids: Tensor, encoder_out: Tensor, attention_mask: Tensor | None = None,
               decoder_attention_mask: Tensor | None = None) -> Tensor:
        """Logits (B, T, vocab) of the decoder over its whole input (causal) against the
        encoder output (B, S, C); attention_mask is the encoder's, decoder_attention_mask
        (B, T) marks the decoder's real tokens (padding keys are never attended to)."""
        self._check_ids(decoder_input_ids, "decoder_input_ids", decoder_attention_mask, "decoder_attention_mask")
        B, T = decoder_input_ids.shape
        if encoder_out.dim() != 3 or encoder_out.shape[0] != B:
            raise ValueError(f"encoder_out must be (batch {B}, seqlen, d_model), got {tuple(encoder_out.shape)}")
        kpm_enc = None if attention_mask is None else attention_mask.to(encoder_out.device) != 0
        kpm_dec = None if decoder_attention_mask is None else decoder_attention_mask.to(encoder_out.device) != 0
        x = self.shared(decoder_input_ids)
        bias = self.position_bias(self.decoder, T, T).to(x.dtype)
        dropout = self._attn_dropout()

        def attend(i: int, layer: Layer, y: Tensor) -> Tensor:
            q, k, v = (self._heads(p(y)) for p in (layer.attn.q, layer.attn.k, layer.attn.v))
            return self._merge(_attend(q, k, v, bias, kpm_dec, True, dropout))

        def cross(i: int, layer: Layer, y: Tensor) -> Tensor:
            k, v = self._cross_kv(layer, encoder_out)
            return self._merge(_attend(self._heads(layer.cross.q(y)), k, v, None, kpm_enc, False, dropout))

        return self._logits(self._run(self.decoder, x, attend, cross))

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None, *, labels: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """input_ids (B, S) with attention_mask (B, S), 1 = a real token; decoder_input_ids
        (B, T). Returns logits (B, T, vocab). With labels (B, T) instead of (or with)
        decoder_input_ids: (loss, logits), the mean cross-entropy over labels != -100, the
        decoder input being the labels shifted right after decoder_start_token_id (as
        transformers)."""
        if labels is not None:
            self._check_labels(labels)
            if decoder_input_ids is None:
                decoder_input_ids = self.shift_right(labels)
        if decoder_input_ids is None:
            raise ValueError("T5 needs decoder_input_ids (or labels)")
        encoder_out = self.encode(input_ids, attention_mask)
        logits = self.decode(decoder_input_ids, encoder_out, attention_mask, decoder_attention_mask)
        if labels is None:
            return logits
        if labels.shape != decoder_input_ids.shape:
            raise ValueError(f"labels must have decoder_input_ids' shape {tuple(decoder_input_ids.shape)},"
                             f" got {tuple(labels.shape)}")
        flat = logits.flatten(0, 1)
        flat = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat  # the loss in fp32 at least
        loss = F.cross_entropy(flat, labels.to(logits.device).flatten(), ignore_index=-100)
        return loss, logits

    def _check_labels(self, labels: Tensor) -> None:
        if not isinstance(labels, Tensor) or labels.dim() != 2 or labels.dtype.is_floating_point:
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"labels must be (batch, seqlen) integer token ids (-100: ignored), got {shape}")
        bad = (labels != -100) & ((labels < 0) | (labels >= self.config.vocab_size))
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, {self.config.vocab_size}) or be -100")

    def shift_right(self, labels: Tensor) -> Tensor:
        """The decoder input for labels: decoder_start_token_id, then labels[:, :-1] (-100 as pad)."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], 1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int,
        do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
        min_p: float | None = None, repetition_penalty: float | None = None,
        eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
        decoder_start_token_id: int | None = None, seed: int | None = None, min_new_tokens: int = 0,
    ) -> Tensor:
        """The decoder's tokens as transformers' generate returns them: (B, 1 + steps) int64,
        decoder_start_token_id then up to max_new_tokens new tokens; a row that stopped
        (eos_token_id, default the config's; [] for none) is padded with pad_token_id
        (default the config's), and generation ends when every row has stopped (no eos before
        min_new_tokens new tokens). The token
        choice is generate.py's (greedy by default; do_sample, temperature, top_k, top_p,
        min_p, repetition_penalty over the decoder's tokens; seed: a private generator)."""
        if isinstance(input_ids, Tensor) and input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
            attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
        self._check_ids(input_ids, "input_ids", attention_mask, "attention_mask")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): generation needs a prompt")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        options = SamplingOptions(do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
        options.check()
        check_min_new_tokens(min_new_tokens)
        cfg = self.config
        eos = _eos_list(eos_token_id if eos_token_id is not None else cfg.eos_token_id)
        pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
        start = cfg.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < cfg.vocab_size:
            # (an IndexError in the embedding otherwise; a device-side assert on a GPU)
            raise ValueError(f"decoder_start_token_id must be a token id in [0, {cfg.vocab_size}), got {start!r}")
        B, device = input_ids.shape[0], input_ids.device
        out = torch.full((B, 1), start, dtype=torch.long, device=device)
        if max_new_tokens == 0:
            return out
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        seen = None
        if repetition_penalty is not None:
            seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
            seen[:, start] = True
        eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None

        encoder_out = self.encode(input_ids, attention_mask)
        kpm = None if attention_mask is None else attention_mask.to(device) != 0
        cross_kv = [self._cross_kv(layer, encoder_out) for layer in self.decoder.layers]
        p = self.shared.weight
        cache = KVCache(len(self.decoder.layers), B, self.n_head, max_new_tokens, self.head_dim, dtype=p.dtype,
                        device=device)
        bias_all = self.position_bias(self.decoder, max_new_tokens, max_new_tokens).to(p.dtype)

        steps = [out[:, 0]]
        token = out[:, 0]
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            scores = self._decode_step(token[:, None], cache, cross_kv, kpm, bias_all)[:, -1].float()
            nan = nan_rows(scores)
            token = options.choose(options.process(hold_eos(scores, eos_t, step, min_new_tokens), seen), generator)
            token = torch.where(finished, torch.full_like(token, pad), token)
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            if eos_t is not None:
                finished |= torch.isin(token, eos_t)
            steps.append(token)
            # one read of the device per step: which rows saw NaN, whether all stopped
            nan_host, all_done = torch.cat([nan, finished.all()[None]]).cpu().split([B, 1])
            if nan_host.any():
                rows = nan_host.nonzero().flatten().tolist()
                raise FloatingPointError(f"the model's logits hold NaN at generation step {step} (rows {rows})")
            if all_done.item():
                break
        return torch.stack(steps, 1)

    def _decode_step(self, ids: Tensor, cache: KVCache, cross_kv: list[tuple[Tensor, Tensor]], kpm: Tensor | None,
                     bias_all: Tensor) -> Tensor:
        """The next n tokens (B, n) of every row (all rows at the same position) -> logits."""
        n = ids.shape[1]
        cache.check_room(n)
        past = cache.filled
        total = past + n
        bias = bias_all[:, :, past:total, :total].contiguous()

        def attend(i: int, layer: Layer, y: Tensor) -> Tensor:
            q, k, v = (self._heads(p(y)) for p in (layer.attn.q, layer.attn.k, layer.attn.v))
            cache.append(i, k, v)
            k_all, v_all = cache.k[i][:, :, :total], cache.v[i][:, :, :total]
            return self._merge(ops.attention(q, k_all, v_all, attn_mask=bias, causal=True, scale=1.0))

        def cross(i: int, layer: Layer, y: Tensor) -> Tensor:
            k, v = cross_kv[i]
            return self._merge(ops.attention(self._heads(layer.cross.q(y)), k, v, key_padding_mask=kpm, scale=1.0))

        y = self._run(self.decoder, self.shared(ids), attend, cross)
        cache.advance(n)
        return self._logits(y)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> T5:
        """The model of a transformers T5ForConditionalGeneration checkpoint directory, in eval mode."""
        cfg = T5Config.from_dict(read_config(path))
        with without_random_init():  # load_into fills every parameter
            model = cls(cfg)
        weights = read_weights(path)
        head = weights.get("lm_head.weight")
        shared = weights.get("shared.weight", weights.get("encoder.embed_tokens.weight"))
        if head is not None and not (shared is not None and torch.equal(head, shared)):
            # a head of its own (T5 v1.1, FLAN-T5); one equal to the embeddings is a saved tie
            model.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        has_shared = "shared.weight" in weights

        def name_of(ckpt_name: str) -> str | None:
            if ckpt_name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
                # copies of shared.weight (tied in transformers)
                return None if has_shared or ckpt_name.startswith("decoder") else "shared.weight"
            if ckpt_name == "lm_head.weight":
                return "lm_head.weight" if model.lm_head is not None else None
            return _model_name(ckpt_name)

        return load_into(model, weights, name_of, dtype=dtype, device=device)


# transformers' names inside a block (after "<stack>.block.<i>.layer.") -> ours inside layers.<i>
_ENCODER = {"0.layer_norm": "attn_norm", "0.SelfAttention": "attn", "1.layer_norm": "ff_norm",
            "1.DenseReluDense": "ff"}
_DECODER = {"0.layer_norm": "attn_norm", "0.SelfAttention": "attn", "1.layer_norm": "cross_norm",
            "1.EncDecAttention": "cross", "2.layer_norm": "ff_norm", "2.DenseReluDense": "ff"}
_BLOCK = re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d+\.\w+)\.(.+)")


def _model_name(ckpt_name: str) -> str | None:
    """A checkpoint tensor's name in T5 (None: not used); unknown names pass through for
    load_into to report."""
    if ckpt_name in ("encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"):
        return ckpt_name.split(".")[0] + ".final_norm"
    m = _BLOCK.fullmatch(ckpt_name)
    if m is None:
        return ckpt_name
    stack, layer, module, rest = m.groups()
    if rest == "relative_attention_bias.weight":
        if layer == "0" and module.endswith("SelfAttention"):
            return f"{stack}.relative_attention_bias.weight"
        if layer == "0" and module.endswith("EncDecAttention"):
            return None  # saved by old transformers, never used (cross-attention has no position bias)
        return ckpt_name
    names = _DECODER if stack == "decoder" else _ENCODER
    if module not in names:
        return ckpt_name
    ours = names[module]
    if ours.endswith("norm"):
        return f"{stack}.layers.{layer}.{ours}" if rest == "weight" else ckpt_name
    return f"{stack}.layers.{layer}.{ours}.{rest}"


__all__ = ["T5", "T5Config", "relative_position_bucket"]
