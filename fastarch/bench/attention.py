"""The attention cases of ``fastarch bench``: ``attention`` and ``attention_causal`` on
(B, H, S, D) with S queries and S keys. Matmul-bound: the rate is TFLOP/s, against the
machine's measured matmul rate in the same dtype.

FLOPs of one forward: 4·B·H·S·S·D (two matmuls of 2·S·S·D each per head), halved for causal;
the backward is counted as 2.5 forwards (five matmuls), so forward+backward is 3.5 forwards.

Contenders on the same q, k, v (and, for fwd+bwd, the same output gradient):
- ``ours:<backend>``: ``fastarch.ops.attention(q, k, v, causal=...)``;
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` as dispatched by PyTorch
  (on CPU its flash-attention kernel); on CUDA one column per SDPA backend: ``sdpa_flash``,
  ``sdpa_efficient``, ``sdpa_cudnn``;
- ``sdpa_math``: SDPA forced to its math backend (the eager softmax(QKᵀ)V), CPU only;
- ``flex``: ``torch.compile(flex_attention)`` with a causal block mask for the causal case.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import fastarch
from fastarch import registry
from fastarch.bench.timing import Contender
from fastarch.ops.attn.args import AttentionProblem

OPS = ("attention", "attention_causal")
DIFFERENTIABLE = set(OPS)
SHAPE_RANK = 4  # B x H x S x D


def default_shapes(device: str, quick: bool) -> list[tuple[int, ...]]:
    """(B, H, S, D); B1 H12 S4096 D64 is the CPU goal shape, S >= 4096 with D 128 the GPU's."""
    if device == "cuda":
        return [(2, 16, 4096, 128)] if quick else [(2, 16, 4096, 128), (1, 16, 16384, 128), (4, 32, 2048, 64)]
    if quick:
        return [(1, 12, 1024, 64)]
    # 1x4x8192x64: a long sequence, where the math path's S x S scores take ~0.5-1 GB
    return [(1, 12, 4096, 64), (1, 12, 1024, 64), (4, 8, 512, 128), (1, 4, 8192, 64)]


MATH_SCORES_LIMIT = 4 << 30  # bytes of fp32 scores above which the math baseline is not run


def _sdpa_with(backend) -> Callable[..., Tensor]:
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _flex(shape: tuple[int, ...], causal: bool, device: str) -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    B, H, S, _ = shape
    mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, S, S, device=device) if causal else None

    def run(q, k, v, causal):
        return compiled(q, k, v, block_mask=mask)

    return run


@dataclass(frozen=True)
class Case:
    """One attention problem: q, k, v of ``shape`` (B, H, S, D), causal for attention_causal."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    backward: bool
    device: str

    unit = "TFLOP/s"

    @classmethod
    def baseline_names_for(cls, device: str) -> tuple[str, ...]:
        if device == "cuda":
            return ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flex")
        return ("sdpa", "sdpa_math", "flex")

    @property
    def baseline_names(self) -> tuple[str, ...]:
        return self.baseline_names_for(self.device)

    @property
    def causal(self) -> bool:
        return self.op == "attention_causal"

    @property
    def work(self) -> float:
        """FLOPs of one iteration (see the module docstring)."""
        B, H, S, D = self.shape
        forward = 4 * B * H * S * S * D / (2 if self.causal else 1)
        return forward * (3.5 if self.backward else 1.0)

    def backend_that_runs(self, requested: str) -> str:
        _, H, _, D = self.shape
        problem = AttentionProblem(self.device, self.dtype, D, D, H, H)
        try:
            return registry.choose("attention", problem, registry.requested_backend(_forced(requested))).name
        except registry.NoBackendError:
            return ""

    def contenders(self, backends: list[str], compile: bool) -> dict[str, Contender]:
        fns: dict[str, Callable[..., Tensor]] = {
            f"ours:{b}": functools.partial(_ours, backend=_forced(b)) for b in backends
        }
        if self.device == "cuda":
            from torch.nn.attention import SDPBackend

            fns["sdpa_flash"] = _sdpa_with(SDPBackend.FLASH_ATTENTION)
            fns["sdpa_efficient"] = _sdpa_with(SDPBackend.EFFICIENT_ATTENTION)
            fns["sdpa_cudnn"] = _sdpa_with(SDPBackend.CUDNN_ATTENTION)
        else:
            from torch.nn.attention import SDPBackend

            fns["sdpa"] = _sdpa
            fns["sdpa_math"] = _sdpa_with(SDPBackend.MATH)
            B, H, S, _ = self.shape
            if B * H * S * S * 4 * (3 if self.backward else 1) > MATH_SCORES_LIMIT:
                fns["sdpa_math"] = _too_big(f"skipped: the math path would hold {B * H * S * S * 4 / 1e9:.1f} GB of scores")
        if compile:
            torch._dynamo.reset()
            fns["flex"] = _flex(self.shape, self.causal, self.device)
        inputs = self._inputs()
        return {name: self._iteration(fn, inputs) for name, fn in fns.items()}

    def _inputs(self) -> tuple[tuple[Tensor, ...], Tensor | None]:
        like = {"dtype": self.dtype, "device": self.device}
        q, k, v = (torch.randn(self.shape, **like).requires_grad_(self.backward) for _ in range(3))
        return (q, k, v), torch.randn(self.shape, **like) if self.backward else None

    def _iteration(self, fn: Callable[..., Tensor], inputs) -> Contender:
        (q, k, v), dout = inputs
        if not self.backward:
            return lambda: fn(q, k, v, self.causal)

        def forward_backward() -> None:
            q.grad = k.grad = v.grad = None
            torch.autograd.backward(fn(q, k, v, self.causal), dout)

        return forward_backward


def _too_big(why: str) -> Callable[..., Tensor]:
    def run(q, k, v, causal):
        raise MemoryError(why)

    return run


def _ours(q: Tensor, k: Tensor, v: Tensor, causal: bool, backend: str | None) -> Tensor:
    return fastarch.ops.attention(q, k, v, causal=causal, backend=backend)


def _forced(backend: str) -> str | None:
    return None if backend == "auto" else backend
