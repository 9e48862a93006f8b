"""The norm cases of ``fastarch bench``: layer_norm, rms_norm, add_layer_norm, add_rms_norm.
Memory-bound: the rate is GB/s of minimum traffic, against the measured copy bandwidth.

Contenders, all called as ``fn(x, [residual,] weight, [bias,] eps)`` on the same input sets:

- ``ours:<backend>``: ``fastarch.ops.<op>(..., backend=<backend>)``; ``ours:auto`` lets the
  registry choose;
- ``eager``: the PyTorch code it replaces: ``F.layer_norm`` / ``F.rms_norm``, and for the add
  variants ``s = x + residual`` followed by the norm of ``s``, returning ``(y, s)``;
- ``compile``: ``torch.compile(eager, dynamic=False)``.

One timed iteration ("fwd") is the forward on inputs that do not require grad; or ("fwd+bwd")
setting every input's ``.grad`` to None, the forward on inputs that require grad, then
``torch.autograd.backward(outputs, grads)`` with fixed random gradients for every output (y,
and s for the add variants), so that no extra reduction kernel is timed. That computes the
gradients of x, residual, weight and bias.
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
from fastarch.ops.norms.backends import NormProblem

EPS = 1e-5


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def _add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    s = x + residual
    return F.layer_norm(s, s.shape[-1:], weight, bias, eps), s


def _add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    s = x + residual
    return F.rms_norm(s, s.shape[-1:], weight, eps), s


@dataclass(frozen=True)
class NormOp:
    eager: Callable[..., object]
    ours: Callable[..., object]
    residual: bool  # takes a residual and also returns s = x + residual
    rms: bool  # RMSNorm: no bias, no mean


OPS = {
    "layer_norm": NormOp(_layer_norm, fastarch.ops.layer_norm, residual=False, rms=False),
    "rms_norm": NormOp(_rms_norm, fastarch.ops.rms_norm, residual=False, rms=True),
    "add_layer_norm": NormOp(_add_layer_norm, fastarch.ops.add_layer_norm, residual=True, rms=False),
    "add_rms_norm": NormOp(_add_rms_norm, fastarch.ops.add_rms_norm, residual=True, rms=True),
}


DIFFERENTIABLE = set(OPS)
SHAPE_RANK = 2  # ROWS x HIDDEN


def default_shapes(device: str, quick: bool) -> list[tuple[int, ...]]:
    """(rows, hidden) shapes; 4096x768 (BERT-base/GPT-2 at 4096 tokens) is the goal shape."""
    if device == "cuda":
        return [(4096, 768), (16384, 8192)] if quick else [(4096, 768), (8192, 4096), (16384, 8192), (4096, 65536)]
    return [(4096, 768)] if quick else [(4096, 768), (2048, 4096), (16384, 256)]


@dataclass(frozen=True)
class Case:
    """One norm problem: ``op`` on x of ``shape`` (..., hidden), normalized over the last dim."""

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
        """The minimum memory traffic of one iteration: every input read once, every output
        written once. With R rows, N = hidden, e bytes per element, k = 2 tensors of (R, N)
        for the add variants (x and residual in; y and s out) else 1, p = 2 vectors (weight,
        bias) for layer norms else 1 (weight), and q = 2 fp32 statistics per row for layer
        norms (mean, rstd) else 1 (rstd):

        forward:  k·R·N·e read (x, residual) + k·R·N·e written (y, s) + p·N·e read (weight,
                  bias) + q·R·4 written (mean, rstd)
        backward: R·N·e read (x, or s for the add variants) + k·R·N·e read (dy, ds)
                  + R·N·e written (dx; x and residual share one gradient) + N·e read (weight)
                  + p·N·e written (dweight, dbias) + q·R·4 read (mean, rstd)
        """
        op = OPS[self.op]
        rows, n = math.prod(self.shape[:-1]), self.shape[-1]
        e = self.dtype.itemsize
        k = 2 if op.residual else 1
        p = q = 1 if op.rms else 2
        forward = 2 * k * rows * n * e + p * n * e + q * rows * 4
        backward = (2 + k) * rows * n * e + (1 + p) * n * e + q * rows * 4
        return forward + (backward if self.backward else 0)

    def backend_that_runs(self, requested: str) -> str:
        """The backend that ``ours:<requested>`` runs ("auto": the registry's choice), or ""
        when none can."""
        problem = NormProblem(self.device, self.dtype, math.prod(self.shape[:-1]), self.shape[-1])
        try:
            return registry.choose(self.op, problem, registry.requested_backend(_forced(requested))).name
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

    def _inputs(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """One input set: the op's tensor arguments, and the gradients of its outputs."""
        op = OPS[self.op]
        like = {"dtype": self.dtype, "device": self.device}
        n = self.shape[-1]
        args = [torch.randn(self.shape, **like)]
        if op.residual:
            args.append(torch.randn(self.shape, **like))
        args.append(1 + 0.1 * torch.randn(n, **like))
        if not op.rms:
            args.append(0.1 * torch.randn(n, **like))
        for t in args:
            t.requires_grad_(self.backward)
        n_outputs = 2 if op.residual else 1
        grads = tuple(torch.randn(self.shape, **like) for _ in range(n_outputs)) if self.backward else ()
        return tuple(args), grads

    def _iteration(self, fn: Callable[..., object], sets: list) -> Contender:
        cycle = itertools.cycle(sets)
        if not self.backward:
            return lambda: fn(*next(cycle)[0], EPS)

        def forward_backward() -> None:
            args, grads = next(cycle)
            for t in args:
                t.grad = None
            torch.autograd.backward(fn(*args, EPS), grads)

        return forward_backward


def _forced(backend: str) -> str | None:
    return None if backend == "auto" else backend

