"""Text generation for every decoder family: a static key/value cache, the decoding loop
(greedy and sampling), and TextGenerator (model + tokenizer, str in, str out).

    ids = generate(model, input_ids, attention_mask, max_new_tokens=32)        # like transformers
    gen = TextGenerator.from_pretrained("path/to/checkpoint")
    print(gen.generate("Once upon a time", max_new_tokens=40, do_sample=True, top_p=0.9, seed=0))

The decoder protocol
--------------------
A decoder model (GPT-2 here; LLaMA, StarCoder, the decoder of T5 later) implements:

    model.max_positions: int | None     # longest sequence its positions allow (None: no bound)
    model.eos_token_id: int | list[int] | None   # config.json's, the default stop token
    model.vocab_size: int               # the logits' last dim (the repetition penalty's table)
    model.new_cache(batch, max_len, *, dtype=None, device=None) -> KVCache
        # KVCache(n_layers, batch, kv_heads, max_len, head_dim, ...): allocated once, never grown
    model.forward(input_ids, attention_mask=None, *, cache=None, last_only=False) -> logits

and forward behaves in three ways:
- cache None: a causal forward over a padded batch (training, scoring). input_ids (B, S);
  attention_mask (B, S), 1 = a real token, padding on either side; positions count each row's
  real tokens from 0 (transformers' cumsum of the mask). Logits (B, S, V), zeros at padding.
  pack_prompts gives the packed layout (no compute on padding) and the positions.
- an empty cache (cache.filled == 0): the same, the prefill, and it also writes each row's keys
  and values into slots 0 .. len-1 of every layer (KVCache.write_packed) and sets the lengths
  (KVCache.prefilled).
- a filled cache: input_ids (B, n) are the next n tokens of every row (attention_mask None):
  position cache.seqlens[b] + i; each layer appends (KVCache.append: fastarch.ops.append_kv)
  and attends with fastarch.ops.attention_decode over KVCache.seqlens_after(n); then
  KVCache.advance(n). Logits (B, n, V).
last_only=True returns only each row's last real token's logits, (B, 1, V) (what generation
needs: the vocabulary projection of the whole prompt is skipped).

On a GPU the one-token step is captured in a CUDA graph and replayed for each new token
(cuda_graph_step.py; FASTARCH_CUDA_GRAPHS=0 runs it eagerly): the step must then read nothing
from the device on the host, which the protocol above allows.
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastarch import ops
from fastarch.finite import finite_number
from fastarch.models.cuda_graph_step import CudaGraphStep
from fastarch.models.packing import Packing, pack, unpack, unpad

# ----------------------------------------------------------------------------- packing


class PackedPrompts(NamedTuple):
    """A padded batch of prompts with its real tokens packed (packing.py's Packing: nothing is
    computed on padding), and what a decoder needs beyond it.

    positions: (total,) int64, each real token's position among its row's real tokens (0, 1,
    ...: transformers' cumsum of the mask), which is also its cache slot.
    lengths: (batch,) int32, each row's real tokens.
    """

    packing: Packing
    positions: Tensor
    lengths: Tensor

    def last(self, x: Tensor) -> Tensor:
        """x: (total, ...) packed -> (B, ...), each row's last real token (zeros for an empty row)."""
        batch = self.packing.batch
        if x.shape[0] == 0:
            return x.new_zeros((batch, *x.shape[1:]))
        picked = x.index_select(0, (self.packing.cu_seqlens[1:].long() - 1).clamp(min=0))
        keep = (self.lengths > 0).view(-1, *([1] * (x.dim() - 1)))
        return picked * keep.to(picked.dtype)


def pack_prompts(input_ids: Tensor, attention_mask: Tensor | None) -> PackedPrompts:
    """The PackedPrompts of a (B, S) batch; attention_mask (B, S) bool or integer, nonzero = a
    real token, padding on either side (None: every token is real, and the device is not read)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
    B, S = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        packing = Packing(torch.arange(B * S, device=device),
                          torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=device), S, B, S)
        return PackedPrompts(packing, torch.arange(S, device=device).repeat(B),
                             torch.full((B,), S, dtype=torch.int32, device=device))
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    attention_mask = attention_mask.to(device)
    packing = unpad(attention_mask)
    positions = pack((attention_mask != 0).cumsum(1) - 1, packing)
    return PackedPrompts(packing, positions, packing.cu_seqlens.diff())


# ----------------------------------------------------------------------------- the cache


class KVCache:
    """Static key/value cache: per layer k and v of (batch, kv_heads, max_len, head_dim),
    allocated once; tokens are written in place (fastarch.ops.append_kv), never reallocated.

    seqlens: int32 (batch,) on the device, the filled slots of each row, kept by the cache's
    methods (do not write it). filled: a host-side bound on them (the longest row), so that
    overflowing the cache is caught without reading the device: 0 <= seqlens <= filled holds
    by construction, so the ops that take the lengths are told they fit (seqlens_checked) and
    no layer reads or asserts them.
    """

    def __init__(
        self, n_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, *,
        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None, v_head_dim: int | None = None,
    ) -> None:
        if max_len < 1 or batch < 1:
            raise ValueError(f"a KVCache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        v_dim = head_dim if v_head_dim is None else v_head_dim
        self.k = [torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(batch, kv_heads, max_len, v_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.filled = 0
        self.batch, self.max_len = batch, max_len

    def reset(self) -> None:
        """Empties the cache for a new batch (the memory is kept)."""
        self.seqlens.zero_()
        self.filled = 0

    def check_room(self, n: int, max_positions: int | None = None) -> None:
        """Room for n more tokens per row, in the cache and (when given) in the model's
        max_positions."""
        if self.filled + n > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} tokens per row; {self.filled} + {n} new ones do not fit")
        if max_positions is not None and self.filled + n > max_positions:
            raise ValueError(f"{self.filled} + {n} tokens exceed the model's {max_positions} positions")

    def write_packed(self, layer: int, k: Tensor, v: Tensor, prompts: PackedPrompts) -> None:
        """Prefill: the packed keys/values (total, kv_heads, head_dim) of an empty cache's rows
        into slots 0 .. len-1 of each row (slots past a row's length are scratch that later
        appends overwrite)."""
        if self.filled:
            raise ValueError("write_packed fills an empty cache (call reset() first)")
        B, S = prompts.packing.batch, prompts.packing.seqlen
        if k.shape[0] == B * S:  # no padding: row b's tokens are packed rows b S .. b S + S - 1, in order
            k_rows, v_rows = k.unflatten(0, (B, S)), v.unflatten(0, (B, S))
        else:  # left-justify each row: the token at position p goes to slot p
            dest = prompts.packing.indices.div(S, rounding_mode="floor") * S + prompts.positions
            k_rows = k.new_zeros(B * S, *k.shape[1:]).index_copy_(0, dest, k).unflatten(0, (B, S))
            v_rows = v.new_zeros(B * S, *v.shape[1:]).index_copy_(0, dest, v).unflatten(0, (B, S))
        ops.append_kv(self.k[layer], self.v[layer], k_rows.transpose(1, 2), v_rows.transpose(1, 2), self.seqlens)

    def prefilled(self, prompts: PackedPrompts) -> None:
        """After every layer's write_packed: the rows now hold their prompts."""
        self.seqlens.copy_(prompts.lengths)
        self.filled = prompts.packing.seqlen

    def append(self, layer: int, k_new: Tensor, v_new: Tensor) -> None:
        """k_new, v_new: (batch, kv_heads, n, head_dim), the next n tokens of every row."""
        self.check_room(k_new.shape[2])  # on the host: then seqlens + n <= filled + n fits
        ops.append_kv(self.k[layer], self.v[layer], k_new, v_new, self.seqlens, seqlens_checked=True)

    def seqlens_after(self, n: int) -> Tensor:
        """The lengths once n more tokens are appended (what attention_decode reads)."""
        return self.seqlens + n

    def advance(self, n: int) -> None:
        """After every layer appended n tokens."""
        self.seqlens += n
        self.filled += n


# ----------------------------------------------------------------------------- the loop


def _eos_list(eos_token_id: int | Sequence[int] | None) -> list[int]:
    """eos_token_id as a list of ints (a string is refused: its characters are not ids)."""
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if _is_int(eos_token_id) else eos_token_id
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not all(_is_int(t) and t >= 0 for t in ids):
        raise TypeError(f"eos_token_id must be a token id (an int >= 0), a list of them, or None, got {eos_token_id!r}")
    return [int(t) for t in ids]


def _is_int(x: object) -> bool:
    """An integer that is not a bool (Python's, numpy's, a 0-d integer tensor's item)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")


@dataclass
class SamplingOptions:
    """How the next token is chosen from the logits (transformers' processors, in their order:
    repetition penalty; then, only when sampling, temperature, top-k, top-p, min-p)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def check(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if name == "temperature" or getattr(self, name) is not None:
                _check_number(name, getattr(self, name))
        # (below 1e-30 the scaled logits overflow fp32 and the softmax has no finite probabilities;
        # without sampling the temperature is not used, as in transformers)
        if self.do_sample and not (finite_number(self.temperature) and self.temperature >= 1e-30):
            raise ValueError(f"temperature must be a finite number >= 1e-30, got {self.temperature}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty is not None and not (finite_number(self.repetition_penalty)
                                                        and self.repetition_penalty >= 1e-30):
            raise ValueError(f"repetition_penalty must be a finite number >= 1e-30, got {self.repetition_penalty}")

    def process(self, scores: Tensor, seen: Tensor | None) -> Tensor:
        """scores: (B, V) fp32 logits -> the scores the choice is made from (-inf: excluded).
        seen: (B, V) bool, the tokens of each row so far (for the repetition penalty)."""
        if self.repetition_penalty is not None and seen is not None:
            p = self.repetition_penalty
            scores = torch.where(seen, torch.where(scores < 0, scores * p, scores / p), scores)
        if not self.do_sample:
            return scores
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            # the nucleus: the smallest set of most likely tokens whose probability reaches top_p
            sorted_scores, order = torch.sort(scores, dim=-1)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            drop = cum <= 1 - self.top_p
            drop[:, -1] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        if self.min_p is not None and self.min_p > 0:
            probs = scores.softmax(-1)
            threshold = self.min_p * probs.max(-1, keepdim=True).values
            scores = scores.masked_fill(probs < threshold, float("-inf"))
        return scores

    def choose(self, scores: Tensor, generator: torch.Generator | None) -> Tensor:
        """(B, V) processed scores -> (B,) int64 tokens."""
        if not self.do_sample:
            return scores.argmax(-1)
        return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)


def _check_prompt(input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
    if attention_mask is not None and not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a tensor (1 = a real token, 0 = padding) or None,"
                        f" got {type(attention_mask).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError(
            f"input_ids is empty (shape {tuple(input_ids.shape)}): generation needs a prompt of at least one token"
        )
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        empty = (attention_mask.ne(0).sum(1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"attention_mask: rows {empty} have no real token (every prompt needs at least one)")
    return input_ids.long(), attention_mask


def generate_tokens(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    seed: int | None = None,
    pad_token_id: int | None = None,
    cache: KVCache | None = None,
) -> Iterator[Tensor]:
    """The decoding loop of ``generate`` as an iterator: yields each step's new tokens, (B,)
    int64 on the CPU, pad_token_id in rows that already stopped. Stops after max_new_tokens or
    when every row has stopped (an eos_token_id, or a stop string in its new text). The
    arguments are checked at the call, before the first token."""
    input_ids, attention_mask = _check_prompt(input_ids, attention_mask)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_min_new_tokens(min_new_tokens)
    options = SamplingOptions(do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
    options.check()
    eos = _eos_list(eos_token_id if eos_token_id is not None else getattr(model, "eos_token_id", None))
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if stop_strings is not None and not all(isinstance(t, str) and t for t in stop_strings):
        raise ValueError(f"stop_strings must be a non-empty string or a list of them, got {stop_strings!r}")
    if seed is not None and (not _is_int(seed) or not -(2**63) <= seed < 2**64):
        raise ValueError(f"seed must be an int in [-2**63, 2**64) or None, got {seed!r}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer (tokenizer=...) to read the generated text")
    B, S = input_ids.shape
    total = S + max_new_tokens
    limit = getattr(model, "max_positions", None)
    if limit is not None and total > limit:
        raise ValueError(
            f"the prompt's {S} tokens + max_new_tokens={max_new_tokens} = {total} exceed the model's {limit} positions"
        )
    device = input_ids.device
    if cache is None:
        cache = model.new_cache(B, total, device=device)
    else:
        if cache.batch != B:
            raise ValueError(f"cache was made for batch {cache.batch}, the prompt has {B} rows")
        cache.reset()
        cache.check_room(total)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    seen = None
    if repetition_penalty is not None:
        vocab = model.vocab_size
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.ne(0)
        counts = torch.zeros(B, vocab, dtype=torch.int32, device=device)
        seen = counts.scatter_add_(1, input_ids.clamp(0, vocab - 1), real.int()) > 0  # padding is not seen
    eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    return _decode(model, input_ids, attention_mask, cache, options, generator, seen, eos_t, pad_token_id,
                   stop_strings, tokenizer, max_new_tokens, min_new_tokens)


def check_min_new_tokens(min_new_tokens: object) -> None:
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an int >= 0, got {min_new_tokens!r}")


def nan_rows(scores: Tensor) -> Tensor:
    """(B,) bool: the rows of scores (B, vocab) that hold a NaN. Through the rows' maxima (max
    propagates NaN): one pass and no (B, vocab) mask, 6 us where isnan().any(-1) took 47 us
    of each step at SmolLM2's 49152 tokens (AMD EPYC Zen 5)."""
    return scores.amax(-1).isnan()


def hold_eos(scores: Tensor, eos_t: Tensor | None, step: int, min_new_tokens: int) -> Tensor:
    """scores (B, vocab) with the eos ids at -inf while the step is below min_new_tokens, as
    transformers' min_new_tokens does (before the other options see them)."""
    if eos_t is None or step >= min_new_tokens:
        return scores
    return scores.index_fill(-1, eos_t, float("-inf"))


def _decode(
    model, input_ids, attention_mask, cache, options, generator, seen, eos_t, pad_token_id, stop_strings, tokenizer,
    max_new_tokens, min_new_tokens,
) -> Iterator[Tensor]:
    if max_new_tokens == 0:
        return
    B = input_ids.shape[0]
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    texts: list[list[int]] = [[] for _ in range(B)]
    graphed = CudaGraphStep.for_generation(model, cache, max_new_tokens)  # None: each step eagerly
    with torch.inference_mode():
        logits = model(input_ids, attention_mask, cache=cache, last_only=True)[:, -1]
        for step in range(max_new_tokens):
            scores = logits.float()
            nan = nan_rows(scores)
            token = options.choose(options.process(hold_eos(scores, eos_t, step, min_new_tokens), seen), generator)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            if eos_t is not None:
                finished |= torch.isin(token, eos_t)
            # one read of the device per step: the tokens, which rows stopped, which saw NaN
            host, done, nan = torch.stack([token, finished.long(), nan.long()]).cpu()
            if nan.any():
                rows = nan.nonzero().flatten().tolist()
                raise FloatingPointError(f"the model's logits hold NaN at generation step {step} (rows {rows})")
            if stop_strings:
                for b in range(B):
                    if done[b]:
                        continue
                    texts[b].append(int(host[b]))
                    if any(s in tokenizer.decode(texts[b]) for s in stop_strings):
                        finished[b] = done[b] = True
            yield host
            if step + 1 == max_new_tokens or bool(done.all()):
                return
            if graphed is not None:
                logits = graphed(token)
            else:
                logits = model(token[:, None], cache=cache, last_only=True)[:, -1]


def generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    streamer=None,
    callback: Callable[[Tensor], None] | None = None,
    **options,
) -> Tensor:
    """Generates up to max_new_tokens tokens after each prompt, as transformers' generate.

    input_ids: (B, S) int (or (S,)), attention_mask: (B, S), 1 = a real token; prompts may be
    padded on either side (each row is computed on its real tokens alone, at its own
    positions: a batch gives what each prompt gives alone). Returns (B, S + steps) int64: the
    prompts as given, then the new tokens; a row that stopped earlier (eos_token_id, default
    the model's; or a stop string, with tokenizer) is padded with pad_token_id (default the
    first eos id; eos_token_id=[]: none, not even the model's; min_new_tokens: no eos before that many new
    tokens, as transformers'). Options: do_sample, temperature, top_k, top_p, min_p, repetition_penalty,
    seed (a private generator; None: torch's global one), eos_token_id, pad_token_id,
    stop_strings + tokenizer, cache (a KVCache to reuse). streamer: an object with put(ids) and
    end() (transformers' TextStreamer): given the prompt, then each step's tokens;
    callback(tokens): each step's (B,) new tokens.

    An encoder-decoder model (``model.is_encoder_decoder``, T5) runs its own ``generate`` with
    the same options and returns the decoder's ids, decoder_start_token_id first, as
    transformers' does.
    """
    if getattr(model, "is_encoder_decoder", False):
        if streamer is not None or callback is not None:
            raise ValueError("streamer and callback are not supported for encoder-decoder models")
        return model.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, **options)
    steps = []
    tokens = generate_tokens(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, **options)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for token in tokens:
        steps.append(token)
        if streamer is not None:
            streamer.put(token)
        if callback is not None:
            callback(token)
    if streamer is not None:
        streamer.end()
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    if not steps:
        return ids.long()
    return torch.cat([ids.long(), torch.stack(steps, 1).to(ids.device)], 1)


class CausalLM(nn.Module):
    """The decoder protocol, shared by the decoder families: new_cache, and forward's checks and
    three ways (no cache, an empty cache, a filled cache). A family provides ``max_positions``,
    ``config`` (vocab_size, eos_token_id), ``n_layers``, ``n_kv``, ``head_dim``, ``lm_head``,
    ``_prefill(ids, prompts, cache)`` (packed real tokens -> final hidden states, filling an
    empty cache) and ``_decode(input_ids, cache, last_only)``."""

    @property
    def eos_token_id(self) -> int | list[int] | None:
        return self.config.eos_token_id

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def new_cache(
        self, batch: int, max_len: int, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> KVCache:
        """A KVCache for ``batch`` rows of up to ``max_len`` tokens (at most max_positions), in
        the weights' dtype and device unless given."""
        if max_len > self.max_positions:
            raise ValueError(f"max_len {max_len} exceeds the model's {self.max_positions} positions")
        p = self.lm_head.weight
        if not p.is_floating_point():  # a QuantizedLinear head's blocks: the embeddings' dtype
            p = next(t for t in self.parameters() if t.is_floating_point())
        return KVCache(self.n_layers, batch, self.n_kv, max_len, self.head_dim,
                       dtype=dtype or p.dtype, device=device or p.device)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, cache: KVCache | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """input_ids: (B, S) int; attention_mask: (B, S), 1 = a real token (padding on either
        side). Returns logits (B, S, vocab), zeros at padding; last_only: (B, 1, vocab), each
        row's last real token. With a cache, see the decoder protocol in generate.py: an empty
        cache is filled with the prompt; a filled one takes the next tokens (B, n), no mask."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if cache is not None and cache.filled:
            if attention_mask is not None:
                raise ValueError("attention_mask: the tokens after the prompt are every row's next tokens, give no mask")
            return self._decode(input_ids, cache, last_only)
        S = input_ids.shape[1]
        if S > self.max_positions:
            raise ValueError(f"input_ids has {S} tokens, more than the model's {self.max_positions} positions")
        if cache is not None:
            cache.check_room(S)
            if cache.batch != input_ids.shape[0]:
                raise ValueError(f"cache was made for batch {cache.batch}, input_ids has {input_ids.shape[0]} rows")
        prompts = pack_prompts(input_ids, attention_mask)
        ids = pack(input_ids, prompts.packing)  # the real tokens: padding ids are never read
        self._check_ids(ids)
        x = self._prefill(ids, prompts, cache)
        if cache is not None:
            cache.prefilled(prompts)
        if last_only:
            return self.lm_head(prompts.last(x)).unsqueeze(1)
        return unpack(self.lm_head(x), prompts.packing)

    def _check_ids(self, ids: Tensor) -> None:
        if ids.numel():
            lo, hi = torch.stack(torch.aminmax(ids)).tolist()
            if lo < 0 or hi >= self.config.vocab_size:
                # an id past the embedding table is a device-side assert on a GPU: refuse it here
                raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got ids from {lo} to {hi}")


# ----------------------------------------------------------------------------- text in, text out


class TextGenerator:
    """A decoder model and its tokenizer: text in, text out.

        gen = TextGenerator.from_pretrained("path/to/checkpoint", dtype=torch.bfloat16)
        gen.generate("The capital of France is", max_new_tokens=20)
        for piece in gen.stream("Tell me a story", chat=True, max_new_tokens=200):
            print(piece, end="", flush=True)

    After each generate/stream, ``stats`` holds prompt_tokens, prefill_s, new_tokens, decode_s.
    """

    def __init__(self, model: nn.Module, tokenizer, *, eos_token_id: int | list[int] | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.eos_token_id = eos_token_id
        if self.eos_token_id is None:
            self.eos_token_id = getattr(model, "eos_token_id", None)
        if self.eos_token_id is None:
            self.eos_token_id = tokenizer.eos_token_id
        self.stats: dict[str, float] = {}

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, gguf_file: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None, quantized: bool = False, activations: str = "exact",
    ) -> TextGenerator:
        """The model (fastarch.models.from_pretrained) and transformers' AutoTokenizer of the
        checkpoint directory; the stop tokens from its generation_config.json when present.
        gguf_file (or a ``path`` ending in .gguf): a llama.cpp GGUF file, its tokenizer from the
        file's metadata (fastarch.models.gguf.tokenizer_from_gguf), its stop token the file's;
        quantized: keep its quantized layers as blocks (Q4_0 ... IQ4_XS; from_pretrained's quantized);
        activations="int8": their products on x rounded to int8 (from_pretrained's)."""
        import json
        from pathlib import Path

        from transformers import AutoTokenizer

        from fastarch.models import from_pretrained
        from fastarch.models.llama import gguf_path

        file = gguf_path(path, gguf_file)
        if file is not None:
            from fastarch.models.gguf import tokenizer_from_gguf

            model = from_pretrained(file, dtype=dtype, device=device, quantized=quantized, activations=activations)
            return cls(model, tokenizer_from_gguf(file))
        model = from_pretrained(path, dtype=dtype, device=device, quantized=quantized, activations=activations)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        eos = None
        gen_config = Path(path) / "generation_config.json"
        if gen_config.is_file():
            eos = json.loads(gen_config.read_text()).get("eos_token_id")
        return cls(model, tokenizer, eos_token_id=eos)

    def encode(self, prompt: str | list[dict], *, chat: bool = False) -> Tensor:
        """(1, S) token ids of the prompt; chat: through the tokenizer's chat template (a str
        becomes one user message), ending with the assistant's turn."""
        if chat or not isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError("this tokenizer has no chat template (drop chat=True / --chat)")
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise ValueError("the prompt is empty: generation needs at least one token")
        device = next(self.model.parameters()).device
        return torch.tensor([ids], dtype=torch.long, device=device)

    def stream(self, prompt: str | list[dict], *, chat: bool = False, max_new_tokens: int = 64, **options) -> Iterator[str]:
        """Yields the new text piece by piece as the tokens come (a piece ends on a whole
        character). With stop_strings, the text ends with the first stop string. The arguments
        are checked at the call, before the first piece."""
        ids = self.encode(prompt, chat=chat)
        if options.get("eos_token_id") is None:
            options["eos_token_id"] = self.eos_token_id
        stops = options.get("stop_strings")
        stops = [stops] if isinstance(stops, str) else list(stops or [])
        if stops:
            options["tokenizer"] = self.tokenizer
        eos = set(_eos_list(options["eos_token_id"]))
        self.stats = {"prompt_tokens": ids.shape[1], "prefill_s": 0.0, "new_tokens": 0, "decode_s": 0.0}
        start = time.perf_counter()
        tokens = generate_tokens(self.model, ids, max_new_tokens=max_new_tokens, **options)  # (checks now)
        return self._pieces(tokens, eos, stops, start)

    def _pieces(self, tokens: Iterator[Tensor], eos: set[int], stops: list[str], start: float) -> Iterator[str]:
        """stream's text pieces from generate_tokens' tokens (batch 1), timing them in stats."""
        new: list[int] = []
        said = text = ""
        for token in tokens:
            now = time.perf_counter()
            if not new and not self.stats["new_tokens"]:
                self.stats["prefill_s"] = now - start
            else:
                self.stats["decode_s"] = now - start - self.stats["prefill_s"]
            self.stats["new_tokens"] += 1
            t = int(token[0])
            if t in eos:
                break
            new.append(t)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            cut = min((text.find(s) + len(s) for s in stops if s in text), default=None)
            if cut is not None:
                text = text[:cut]
                break
            if not text.endswith("\ufffd") and len(text) > len(said):  # else a character may be split across tokens
                yield text[len(said):]
                said = text
        if len(text) > len(said):  # what is left, a stop string's end or undecodable bytes
            yield text[len(said):]

    def generate(self, prompt: str | list[dict], *, chat: bool = False, max_new_tokens: int = 64, **options) -> str:
        """The new text after the prompt (without the prompt or the stop token)."""
        return "".join(self.stream(prompt, chat=chat, max_new_tokens=max_new_tokens, **options))


__all__ = ["generate", "generate_tokens", "KVCache", "PackedPrompts", "pack_prompts", "SamplingOptions", "TextGenerator"]
