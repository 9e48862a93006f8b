"""The activation cases of ``fastarch bench``: bias_gelu (erf form, BERT's MLP), bias_gelu_tanh
(tanh form, GPT-2's), swiglu (LLaMA's) and geglu (the diffusion UNet's feed-forward, erf form;
geglu_packed: the same on the whole projection, as fastarch.nn.GEGLU runs it). Memory-bound: the rate is GB/s of minimum traffic,
against the measured copy bandwidth.

Contenders, all called as ``fn(x, bias)`` (swiglu: ``fn(gate, up)``; geglu: ``fn(proj)``, the
(rows, 2·hidden) projection, chunked as diffusers does: ``up, gate = proj.chunk(2, -1)``, views
whose rows are strided by 2·hidden) on the same input sets:

- ``ours:<backend>``: ``fastarch.ops.bias_gelu(x, bias, approximate, backend=<backend>)``
  (``fastarch.ops.swiglu(gate, up, backend=...)``, ``fastarch.ops.geglu(gate, up, backend=...)``
  on the chunks, read in place, ``fastarch.ops.geglu_packed(proj, backend=...)``); ``ours:auto``
  lets the registry choose;
- ``eager``: the PyTorch code it replaces, ``F.gelu(x + bias, approximate=...)`` (the MLP's
  first linear layer without its bias: F.linear is not part of the case), ``F.silu(gate) * up``,
  diffusers' ``up * F.gelu(gate)``;
- ``compile``: ``torch.compile(eager, dynamic=False)``.

One timed iteration ("fwd") is the forward on inputs that do not require grad; or ("fwd+bwd")
setting the inputs' ``.grad`` to None, the forward on inputs that require grad, then
``y.backward(dy)`` with a fixed random dy: the gradients of both inputs (geglu: of the
projection, which autograd assembles from dgate and dup, except for geglu_packed's and
compile's, which write it whole).
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
from fastarch.ops.activations.backends import ActivationProblem


@dataclass(frozen=True)
class ActivationOp:
    eager: Callable[..., Tensor]
    ours: Callable[..., Tensor]
    registry_op: str  # the op's name in the backend registry
    gated: bool = False  # takes (gate, up) of one shape, else (x, bias)
    packed: bool = False  # gated, taking the one (rows, 2·hidden) projection whose halves are up, gate


def _gelu(approximate: str):
    def eager(x: Tensor, bias: Tensor) -> Tensor:
        return F.gelu(x + bias, approximate=approximate)

    eager.__name__ = f"bias_gelu_{approximate}"
    return eager


def _swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def _geglu(proj: Tensor) -> Tensor:
    up, gate = proj.chunk(2, dim=-1)
    return up * F.gelu(gate)


def _ours_geglu(proj: Tensor, backend: str | None = None) -> Tensor:
    up, gate = proj.chunk(2, dim=-1)
    return fastarch.ops.geglu(gate, up, backend=backend)


OPS = {
    "bias_gelu": ActivationOp(_gelu("none"), functools.partial(fastarch.ops.bias_gelu, approximate="none"), "bias_gelu"),
    "bias_gelu_tanh": ActivationOp(_gelu("tanh"), functools.partial(fastarch.ops.bias_gelu, approximate="tanh"), "bias_gelu"),
    "swiglu": ActivationOp(_swiglu, fastarch.ops.swiglu, "swiglu", gated=True),
    "geglu": ActivationOp(_geglu, _ours_geglu, "geglu", gated=True, packed=True),
    "geglu_packed": ActivationOp(_geglu, fastarch.ops.geglu_packed, "geglu_packed", gated=True, packed=True),
}

DIFFERENTIABLE = set(OPS)
SHAPE_RANK = 2  # ROWS x HIDDEN


def default_shapes(device: str, quick: bool) -> list[tuple[int, ...]]:
    """(rows, hidden) shapes; 4096x3072 (BERT-base's MLP at 4096 tokens) is the goal shape."""
    if device == "cuda":
        return [(4096, 3072)] if quick else [(4096, 3072), (16384, 16384)]
    return [(1024, 3072)] if quick else [(4096, 3072), (16384, 768)]


@dataclass(frozen=True)
class Case:
    """One activation problem: ``op`` on x of ``shape`` (..., hidden) with a (hidden,) bias."""

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
        """The minimum memory traffic of one iteration, R rows, N = hidden, e bytes per element:

        bias_gelu forward:  R·N·e read (x) + R·N·e written (y) + N·e read (bias)
        bias_gelu backward: 2·R·N·e read (dy, x) + R·N·e written (dx) + N·e read (bias)
                            + N·e written (dbias)
        swiglu, geglu forward:  2·R·N·e read (gate, up) + R·N·e written (y)
        swiglu, geglu backward: 3·R·N·e read (dy, gate, up) + 2·R·N·e written (dgate, dup)
        """
        rows, n = math.prod(self.shape[:-1]), self.shape[-1]
        e = self.dtype.itemsize
        if OPS[self.op].gated:
            forward, backward = 3 * rows * n * e, 5 * rows * n * e
        else:
            forward = 2 * rows * n * e + n * e
            backward = 3 * rows * n * e + 2 * n * e
        return forward + (backward if self.backward else 0)

    def backend_that_runs(self, requested: str) -> str:
        """The backend that ``ours:<requested>`` runs ("auto": the registry's choice), or ""
        when none can."""
        problem = ActivationProblem(self.device, self.dtype, math.prod(self.shape[:-1]), self.shape[-1])
        try:
            return registry.choose(OPS[self.op].registry_op, problem, registry.requested_backend(_forced(requested))).name
        except registry.NoBackendError:
            return ""

    def contenders(self, backends: list[str], compile: bool) -> dict[str, Contender]:
        """``ours:<backend>`` for each backend, ``eager``, and ``compile`` unless not wanted;
        each a callable that runs one iteration on the next of a few rotating input sets."""
        op = OPS[self.op]
        sets = [self._inputs() for _ in range(input_sets_needed(self.bytes_moved, self.device))]
        fns = {f"ours:{b}": functools.partial(op.ours, backend=_forced(b)) for b in backends}
        fns["eager"] = op.eager
        if compile:
            torch._dynamo.reset()  # a fresh compile per case: never hits the recompile limit
            fns["compile"] = torch.compile(op.eager, dynamic=False)
        return {name: self._iteration(fn, sets) for name, fn in fns.items()}

    def _inputs(self) -> tuple[tuple[Tensor, ...], Tensor | None]:
        """One input set: (x, bias), (gate, up) or (proj,), and the gradient of y."""
        like = {"dtype": self.dtype, "device": self.device}
        if OPS[self.op].packed:
            proj = torch.randn(*self.shape[:-1], 2 * self.shape[-1], **like).requires_grad_(self.backward)
            return (proj,), torch.randn(self.shape, **like) if self.backward else None
        first = torch.randn(self.shape, **like).requires_grad_(self.backward)
        second_shape = self.shape if OPS[self.op].gated else self.shape[-1:]
        second = (0.1 * torch.randn(second_shape, **like)).requires_grad_(self.backward)
        return (first, second), torch.randn(self.shape, **like) if self.backward else None

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
