"""The decode cases of ``fastarch bench``: ``attention_decode``, one new query token per
sequence against a key/value cache of S filled slots, shape (B, H, S, D) (H query and H
key/value heads). Memory-bound: the rate is GB/s of minimum traffic (the caches' filled part
read once, q read, out written), against the measured copy bandwidth.

Contenders: ``ours:<backend>`` = ``fastarch.ops.attention_decode``; ``sdpa`` =
``torch.nn.functional.scaled_dot_product_attention`` of the one query over the S cached keys.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import fastarch
from fastarch import registry
from fastarch.bench.timing import Contender, input_sets_needed
from fastarch.ops.attn.args import AttentionProblem

OPS = ("attention_decode",)
DIFFERENTIABLE: set[str] = set()
SHAPE_RANK = 4  # B x H x S x D


def default_shapes(device: str, quick: bool) -> list[tuple[int, ...]]:
    if device == "cuda":
        return [(8, 32, 8192, 128)] if quick else [(8, 32, 8192, 128), (64, 32, 2048, 128), (1, 32, 65536, 128)]
    return [(1, 12, 4096, 64)] if quick else [(1, 12, 4096, 64), (8, 12, 2048, 64), (1, 32, 16384, 128)]


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    backward: bool  # always False: decoding is inference
    device: str

    unit = "GB/s"
    baseline_names = ("sdpa",)

    @classmethod
    def baseline_names_for(cls, device: str) -> tuple[str, ...]:
        return cls.baseline_names

    @property
    def work(self) -> int:
        """Bytes: k and v caches (B·H·S·D each) read, q read and out written (B·H·D each)."""
        B, H, S, D = self.shape
        return (2 * B * H * S * D + 2 * B * H * D) * self.dtype.itemsize

    def backend_that_runs(self, requested: str) -> str:
        _, H, _, D = self.shape
        problem = AttentionProblem(self.device, self.dtype, D, D, H, H, decode=True)
        try:
            return registry.choose("attention_decode", problem, registry.requested_backend(_forced(requested))).name
        except registry.NoBackendError:
            return ""

    def contenders(self, backends: list[str], compile: bool) -> dict[str, Contender]:
        """Each contender cycles through enough caches that a call finds none of its cache in
        the last-level cache (a small cache would otherwise be read from L3, not memory)."""
        B, H, S, D = self.shape
        like = {"dtype": self.dtype, "device": self.device}
        seqlens = torch.full((B,), S, dtype=torch.int32, device=self.device)
        sets = [
            (torch.randn(B, H, 1, D, **like), torch.randn(B, H, S, D, **like), torch.randn(B, H, S, D, **like))
            for _ in range(input_sets_needed(self.work, self.device))
        ]
        fns: dict[str, Callable[..., Tensor]] = {
            f"ours:{b}": functools.partial(_ours, seqlens=seqlens, backend=_forced(b)) for b in backends
        }
        fns["sdpa"] = _sdpa
        return {name: _rotating(fn, sets) for name, fn in fns.items()}


def _rotating(fn: Callable[..., Tensor], sets: list) -> Contender:
    cycle = itertools.cycle(sets)
    return lambda: fn(*next(cycle))


def _ours(q: Tensor, k: Tensor, v: Tensor, seqlens: Tensor, backend: str | None) -> Tensor:
    return fastarch.ops.attention_decode(q, k, v, seqlens, backend=backend)


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _forced(backend: str) -> str | None:
    return None if backend == "auto" else backend
