"""What the rotary test files share: the inputs of a case and the fp64 truth."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastarch.ops.rope.reference import rotary_ref
from fastarch.ops.rope.tables import rotary_tables

MAX_POS = 40


@dataclass(frozen=True)
class Case:
    """q (B, Hq, S, D) or packed (total = S, Hq, D); k with Hk heads; rot channels rotate."""

    batch: int
    heads_q: int
    heads_k: int
    seqlen: int
    head_dim: int
    rot: int
    positions: str  # "none", "offsets", "full" (4-D); packed: "none" or "full"
    packed: bool = False
    token_major: bool = False  # q is a (B, S, H, D) tensor transposed, as transformers makes it

    def __str__(self) -> str:
        layout = "packed" if self.packed else ("bshd" if self.token_major else "bhsd")
        return (f"{layout}-b{self.batch}-h{self.heads_q}x{self.heads_k}-s{self.seqlen}-d{self.head_dim}"
                f"-rot{self.rot}-pos_{self.positions}")


CASES = [
    Case(2, 3, 3, 5, 16, 16, "none"),
    Case(2, 4, 1, 6, 16, 16, "offsets"),  # MQA, decode-style offsets
    Case(2, 4, 2, 5, 24, 16, "full", token_major=True),  # GQA, partial rotary, transformers' layout
    Case(1, 2, 2, 7, 10, 6, "full"),  # half = 3: not a power of two
    Case(1, 3, 1, 9, 12, 8, "full", packed=True),
    Case(1, 2, 2, 4, 8, 8, "none", packed=True),
    Case(3, 1, 1, 1, 64, 32, "offsets"),  # one decode step per sequence
    Case(1, 2, 1, 3, 48, 40, "full"),  # 20 pairs: a whole and a partial chunk of 16 lanes
]


def make(case: Case, dtype: torch.dtype, seed: int = 0):
    """(q, k, cos, sin, positions): random q, k in dtype; fp32 tables; int64 positions."""
    g = torch.Generator().manual_seed(seed)

    def heads(h: int) -> torch.Tensor:
        if case.packed:
            return torch.randn(case.seqlen, h, case.head_dim, generator=g).to(dtype)
        if case.token_major:
            return torch.randn(case.batch, case.seqlen, h, case.head_dim, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(case.batch, h, case.seqlen, case.head_dim, generator=g).to(dtype)

    q, k = heads(case.heads_q), heads(case.heads_k)
    cos, sin, _ = rotary_tables(case.rot, MAX_POS, base=100.0)  # a small base: every pair turns visibly
    if case.positions == "none":
        positions = None
    elif case.positions == "offsets":
        positions = torch.randint(0, MAX_POS - case.seqlen + 1, (case.batch,), generator=g)
    else:
        shape = (case.seqlen,) if case.packed else (case.batch, case.seqlen)
        positions = torch.randint(0, MAX_POS, shape, generator=g)
    return q, k, cos, sin, positions


def truth(q, k, cos, sin, positions, interleaved: bool, inverse: bool = False):
    """The fp64 reference on the same inputs."""
    return rotary_ref(q.double(), k.double(), cos.double(), sin.double(), positions, interleaved, inverse)


def ulp_bound(ref: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per element: one ulp of the dtype at |ref| (a result rounded once from a slightly wrong
    fp32 value can land one ulp off near a tie), plus the fp32 computation's own error, a few
    ulps of fp32 at the inputs' scale (x1 cos - x2 sin may cancel)."""
    eps = torch.finfo(dtype).eps
    return eps * ref.abs() + 8 * torch.finfo(torch.float32).eps * x.abs().max().double()
