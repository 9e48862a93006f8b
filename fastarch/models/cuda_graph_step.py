"""A decoder's one-token decode step captured in a CUDA graph, so that each new token on a GPU
costs one graph launch instead of a few hundred kernel launches from Python.

    step = CudaGraphStep.for_generation(model, cache, new_tokens)   # None: run the step eagerly
    logits = step(tokens)                                           # tokens (B,) -> (B, vocab)

The decoders' step needs no value from the device on the host (the cache bounds its lengths on
the host, KVCache.filled; the kernels read the lengths on the device and size their grids by
the cache's fixed capacity), so the step's work is the same kernels at every length. The first
call runs the step eagerly (Triton compiles and tunes, cuBLAS sets up) and then captures the
next one; the second call replays the graph and also runs the step eagerly on the same cache
state, and keeps the graph only if both give the same logits (else it warns and runs eagerly
from then on). Each replay appends the row's key/value and advances the cache's lengths on the
device, as the eager step does; the host side (the cache's room and its host bound) is kept
here. FASTARCH_CUDA_GRAPHS=0 turns it off.

A diffusion sampler's model calls are graphed by fastarch.cuda_graphs.GraphedCall (any module's
repeated calls), which fastarch.models.schedulers.sample uses.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from fastarch.cuda_graphs import enabled

MIN_NEW_TOKENS = 8
"""Fewer new tokens than this: the capture (a few eager steps' time) does not pay for itself."""


class CudaGraphStep:
    """model's decode step of one token per row against cache (a filled KVCache), captured."""

    def __init__(self, model: nn.Module, cache) -> None:
        self.model, self.cache = model, cache
        device = cache.seqlens.device
        self.ids = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None  # the graph's output buffer
        self.checked = False
        self.failed = False

    @classmethod
    def for_generation(cls, model: nn.Module, cache, new_tokens: int) -> CudaGraphStep | None:
        """A step for a generation of new_tokens tokens on a CUDA cache, or None (eager)."""
        if cache.seqlens.device.type != "cuda" or new_tokens < MIN_NEW_TOKENS or not enabled():
            return None
        if torch.cuda.is_current_stream_capturing():  # inside someone else's capture
            return None
        return cls(model, cache)

    def _eager(self) -> Tensor:
        return self.model(self.ids, cache=self.cache, last_only=True)[:, -1]

    def __call__(self, tokens: Tensor) -> Tensor:
        """tokens (B,) -> the next logits (B, vocab); the cache advances by one token."""
        self.ids.copy_(tokens.view(-1, 1))
        if self.failed:
            return self._eager()
        if self.graph is None:
            logits = self._eager()  # the warm-up: a real step
            self._capture()
            return logits
        cache = self.cache
        cache.check_room(1, getattr(self.model, "max_positions", None))
        if not self.checked:
            return self._check()
        self.graph.replay()
        cache.filled += 1  # the graph advanced the lengths on the device
        return self.logits[:, -1]

    def _capture(self) -> None:
        cache = self.cache
        filled = cache.filled
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # on torch's capture stream; recorded, not run
                self.logits = self.model(self.ids, cache=cache, last_only=True)
        except Exception as e:  # noqa: BLE001  (anything the capture refuses: run eagerly)
            self._give_up(f"the capture failed ({type(e).__name__}: {e})")
        else:
            self.graph = graph
        finally:
            cache.filled = filled  # the capture ran the step's host side once

    def _check(self) -> Tensor:
        """The first replay against the eager step on the same cache state."""
        cache = self.cache
        seqlens, filled = cache.seqlens.clone(), cache.filled
        eager = self._eager().clone()
        cache.seqlens.copy_(seqlens)  # the replay rewrites the same slots
        cache.filled = filled
        self.graph.replay()
        cache.filled += 1
        self.checked = True
        replayed = self.logits[:, -1]
        if not torch.equal(replayed, eager):
            self._give_up("its first replay differed from the eager step")
            return eager
        return replayed

    def _give_up(self, why: str) -> None:
        self.failed, self.graph, self.logits = True, None, None
        warnings.warn(f"fastarch: decoding without a CUDA graph: {why}", RuntimeWarning, stacklevel=3)
