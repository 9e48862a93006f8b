"""The rotary embedding case of ``fastarch bench``: ``rotary`` on q and k of shape (B, H, S, D)
(k with the same heads), every pair rotated (rot_dim = D), positions 0 .. S - 1.
Memory-bound: the rate is GB/s of minimum traffic, against the measured copy bandwidth.

Contenders on the same q and k:
- ``ours:<backend>``: ``fastarch.ops.rotary(q, k, cos, sin, backend=<backend>)`` with fp32
  (max_pos, D / 2) tables;
- ``eager``: the code it replaces, transformers' LLaMA ``apply_rotary_pos_emb``:
  ``q * cos + rotate_half(q) * sin`` (and k) with cos and sin already gathered per position,
  (1, 1, S, D) in the inputs' dtype, as transformers passes them to every layer (their
  computation, once per model forward, is not timed);
- ``compile``: ``torch.compile(eager, dynamic=False)``.

One timed iteration ("fwd") is the forward; ("fwd+bwd") the forward on q and k that require
grad, then the backward of fixed random gradients of both outputs.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import fastarch
from fastarch import registry
from fastarch.bench.timing import Contender, input_sets_needed
from fastarch.ops.rope.backends import RotaryProblem

OPS = ("rotary",)
DIFFERENTIABLE = set(OPS)
SHAPE_RANK = 4  # B x H x S x D


def default_shapes(device: str, quick: bool) -> list[tuple[int, ...]]:
    """(B, H, S, D): LLaMA-7B's 32 heads of 128 at 2048 tokens on the GPU; 12 heads of 64
    (GPT-2/BERT-base sized) at 1024 tokens as the quick CPU case."""
    if device == "cuda":
        return [(1, 32, 2048, 128)] if quick else [(1, 32, 2048, 128), (8, 32, 4096, 128), (64, 32, 1, 128)]
    return [(1, 12, 1024, 64)] if quick else [(1, 12, 1024, 64), (1, 32, 2048, 128), (16, 32, 1, 128)]


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _eager(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@dataclass(frozen=True)
class Case:
    """``rotary`` on q and k of ``shape`` (B, H, S, D)."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    backward: bool
    device: str

    baseline_names = ("eager", "compile")
    unit = "GB/s"

    @classmethod
    def baseline_names_for(cls, device: str) -> tuple[str, ...]:
        return cls.baseline_names

    @property
    def work(self) -> int:
        return self.bytes_moved

    @property
    def bytes_moved(self) -> int:
        """Minimum traffic: q and k read and q_out and k_out written (2 tensors of B·H·S·D
        elements each way), the cos and sin rows of S positions read once (2·S·D/2 fp32);
        the backward moves the same for dq and dk."""
        b, h, s, d = self.shape
        one = 4 * b * h * s * d * self.dtype.itemsize + 2 * s * (d // 2) * 4
        return one * (2 if self.backward else 1)

    def backend_that_runs(self, requested: str) -> str:
        problem = RotaryProblem(self.device, self.dtype, self.shape[3], self.shape[3])
        try:
            return registry.choose(self.op, problem, registry.requested_backend(_forced(requested))).name
        except registry.NoBackendError:
            return ""

    def contenders(self, backends: list[str], compile: bool) -> dict[str, Contender]:
        sets = [self._inputs() for _ in range(input_sets_needed(self.bytes_moved, self.device))]
        seqlen, d = self.shape[2], self.shape[3]
        cos, sin, _ = fastarch.ops.rotary_tables(d, seqlen, device=self.device)
        # transformers' per-position cos/sin: (1, 1, S, D) in the inputs' dtype
        cos_hf = torch.cat((cos, cos), -1).to(self.dtype)[None, None]
        sin_hf = torch.cat((sin, sin), -1).to(self.dtype)[None, None]
        fns: dict[str, Callable] = {
            f"ours:{b}": functools.partial(_ours, cos=cos, sin=sin, backend=_forced(b)) for b in backends
        }
        fns["eager"] = functools.partial(_eager, cos=cos_hf, sin=sin_hf)
        if compile:
            torch._dynamo.reset()  # a fresh compile per case: never hits the recompile limit
            fns["compile"] = functools.partial(torch.compile(_eager, dynamic=False), cos=cos_hf, sin=sin_hf)
        return {name: self._iteration(fn, sets) for name, fn in fns.items()}

    def _inputs(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, ...]]:
        like = {"dtype": self.dtype, "device": self.device}
        q, k = (torch.randn(self.shape, **like).requires_grad_(self.backward) for _ in range(2))
        grads = tuple(torch.randn(self.shape, **like) for _ in range(2)) if self.backward else ()
        return (q, k), grads

    def _iteration(self, fn: Callable[..., object], sets: list) -> Contender:
        cycle = itertools.cycle(sets)
        if not self.backward:
            return lambda: fn(*next(cycle)[0])

        def forward_backward() -> None:
            args, grads = next(cycle)
            for t in args:
                t.grad = None
            torch.autograd.backward(fn(*args), grads)

        return forward_backward


def _ours(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backend: str | None) -> tuple[Tensor, Tensor]:
    return fastarch.ops.rotary(q, k, cos, sin, backend=backend)


def _forced(backend: str) -> str | None:
    return None if backend == "auto" else backend
