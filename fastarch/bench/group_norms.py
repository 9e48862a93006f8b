"""The group_norm cases of ``fastarch bench``: the diffusion UNet's GroupNorm + SiLU (32 groups),
NCHW (``group_norm``) and channels-last (``group_norm_nhwc``). Memory-bound: the rate is GB/s
of minimum traffic, against the measured copy bandwidth.

Contenders, all called as ``fn(x, weight, bias)`` on the same input sets:

- ``ours:<backend>``: ``fastarch.ops.group_norm(x, 32, weight, bias, activation="silu",
  backend=<backend>)``; ``ours:auto`` lets the registry choose;
- ``eager``: the PyTorch code it replaces, ``F.silu(F.group_norm(x, 32, weight, bias))``;
- ``compile``: ``torch.compile(eager, dynamic=False)``.

One timed iteration ("fwd") is the forward on inputs that do not require grad; or ("fwd+bwd")
setting every input's ``.grad`` to None, the forward on inputs that require grad, then
``y.backward(dy)`` with a fixed random dy (of x's memory format): the gradients of x, weight
and bias.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import fastarch
from fastarch import registry
from fastarch.bench.timing import Contender, input_sets_needed
from fastarch.ops.group_norms.backends import GroupNormProblem

GROUPS = 32
EPS = 1e-5


def _eager(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))


def _ours(x: Tensor, weight: Tensor, bias: Tensor, backend: str | None = None) -> Tensor:
    return fastarch.ops.group_norm(x, GROUPS, weight, bias, EPS, activation="silu", backend=backend)


# op name -> channels-last
OPS = {"group_norm": False, "group_norm_nhwc": True}
DIFFERENTIABLE = set(OPS)
SHAPE_RANK = 4  # N x C x H x W


def default_shapes(device: str, quick: bool) -> list[tuple[int, ...]]:
    """(N, C, H, W): 8x256x32x32 (a Stable-Diffusion-sized UNet block at 32x32 latents, batch 8)
    is the goal shape; batch 1 shows one sample's groups shared by the cores."""
    if device == "cuda":
        return [(8, 256, 32, 32)] if quick else [(8, 256, 32, 32), (1, 256, 32, 32), (8, 512, 64, 64)]
    return [(8, 256, 32, 32)] if quick else [(8, 256, 32, 32), (1, 256, 32, 32)]


@dataclass(frozen=True)
class Case:
    """GroupNorm (32 groups) + SiLU on x of ``shape`` (N, C, H, W), NCHW or channels-last."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    backward: bool  # time forward + backward, else the forward alone
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
        """The minimum memory traffic of one iteration, with E = N·C·H·W elements of e bytes,
        C channels and N·G groups:

        forward:  E·e read (x) + E·e written (y) + 2·C·e read (weight, bias) + 2·N·G·4 written
                  (mean, rstd)
        backward: 2·E·e read (x, dy) + E·e written (dx) + 2·C·e read (weight, bias) + 2·C·e
                  written (dweight, dbias) + 2·N·G·4 read (mean, rstd)
        """
        n, c = self.shape[0], self.shape[1]
        elements, e = math.prod(self.shape), self.dtype.itemsize
        stats = 2 * n * GROUPS * 4
        forward = 2 * elements * e + 2 * c * e + stats
        backward = 3 * elements * e + 4 * c * e + stats
        return forward + (backward if self.backward else 0)

    @property
    def channels_last(self) -> bool:
        return OPS[self.op]

    def backend_that_runs(self, requested: str) -> str:
        """The backend that ``ours:<requested>`` runs ("auto": the registry's choice), or ""
        when none can."""
        n, c = self.shape[0], self.shape[1]
        problem = GroupNormProblem(
            self.device, self.dtype, n, c, math.prod(self.shape[2:]), GROUPS, self.channels_last
        )
        try:
            return registry.choose("group_norm", problem, registry.requested_backend(_forced(requested))).name
        except registry.NoBackendError:
            return ""

    def contenders(self, backends: list[str], compile: bool) -> dict[str, Contender]:
        """``ours:<backend>`` for each backend, ``eager``, and ``compile`` unless not wanted;
        each a callable that runs one iteration on the next of a few rotating input sets."""
        sets = [self._inputs() for _ in range(input_sets_needed(self.bytes_moved, self.device))]
        fns = {f"ours:{b}": functools.partial(_ours, backend=_forced(b)) for b in backends}
        fns["eager"] = _eager
        if compile:
            torch._dynamo.reset()  # a fresh compile per case: never hits the recompile limit
            fns["compile"] = torch.compile(_eager, dynamic=False)
        return {name: self._iteration(fn, sets) for name, fn in fns.items()}

    def _layout(self, t: Tensor) -> Tensor:
        return t.to(memory_format=torch.channels_last) if self.channels_last else t

    def _inputs(self) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor | None]:
        """One input set: (x, weight, bias), and the gradient of y."""
        like = {"dtype": self.dtype, "device": self.device}
        c = self.shape[1]
        x = self._layout(torch.randn(self.shape, **like))
        args = (x, 1 + 0.1 * torch.randn(c, **like), 0.1 * torch.randn(c, **like))
        for t in args:
            t.requires_grad_(self.backward)
        return args, self._layout(torch.randn(self.shape, **like)) if self.backward else None

    def _iteration(self, fn: Callable[..., Tensor], sets: list) -> Contender:
        cycle = itertools.cycle(sets)
        if not self.backward:
            return lambda: fn(*next(cycle)[0])

        def forward_backward() -> None:
            args, dy = next(cycle)
            for t in args:
                t.grad = None
            fn(*args).backward(dy)

        return forward_backward


def _forced(backend: str) -> str | None:
    return None if backend == "auto" else backend
