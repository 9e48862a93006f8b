"""What an attention call carries besides q, k and v, as one object from the public op to the
backends (AttentionArgs), and what a backend's supports check sees (AttentionProblem).

Both are NamedTuples: an attention call builds two AttentionArgs and one AttentionProblem
(which the registry hashes), and a frozen dataclass of twelve fields took ~2.4 us to build
against ~0.5 for the tuple (AMD EPYC), a fifth of a small call's Python."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class AttentionArgs(NamedTuple):
    """The options of one attention call, checked and in kernel form (the semantics are those
    of reference.py). The fields, in order, are the kernel ops' arguments after q, k and v
    (csrc/ops.cpp's ``_attention_fwd``), with ``seed`` as a tensor; ``kernel_args()`` gives them
    with the seed as an int.

    attn_mask: additive, q's dtype, a view broadcast to (B, H, Sq, Sk), or None.
    key_padding_mask: bool (B, Sk), True = a real key, or None.
    cu_seqlens_q, cu_seqlens_k: int32 (N + 1,) offsets of packed sequences, or None.
    max_seqlen_q, max_seqlen_k: the longest packed sequence, or an upper bound of it (kernels
        size their grids by it); 0 when not packed.
    causal, scale, window_left, window_right (-1: unbounded), dropout_p.
    seed: the dropout hash's seed, an int64 scalar tensor on the CPU, or None without dropout.
    """

    attn_mask: Tensor | None = None
    key_padding_mask: Tensor | None = None
    cu_seqlens_q: Tensor | None = None
    cu_seqlens_k: Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    causal: bool = False
    scale: float = 1.0
    window_left: int = -1
    window_right: int = -1
    dropout_p: float = 0.0
    seed: Tensor | None = None

    TENSORS = ("attn_mask", "key_padding_mask", "cu_seqlens_q", "cu_seqlens_k", "seed")

    @property
    def seed_value(self) -> int:
        """The seed as the kernels take it (0 without dropout). A CPU tensor: no device sync."""
        return int(self.seed) if self.seed is not None else 0

    def fields(self) -> tuple:
        """Every field in order (the kernel ops' argument order, seed a tensor)."""
        return tuple(self)

    def kernel_args(self) -> tuple:
        """Every field in order, the seed as an int: the C++ and Triton kernel ops' arguments."""
        return self[:-1] + (self.seed_value,)

    def tensors(self) -> tuple:
        """The tensor fields (for autograd's save_for_backward)."""
        return tuple(getattr(self, name) for name in self.TENSORS)

    def scalars(self) -> dict:
        """The other fields (for autograd's context)."""
        return {name: value for name, value in zip(self._fields, self) if name not in self.TENSORS}

    @classmethod
    def from_parts(cls, tensors: tuple, scalars: dict) -> AttentionArgs:
        """The inverse of tensors() and scalars()."""
        return cls(**dict(zip(cls.TENSORS, tensors)), **scalars)


class AttentionProblem(NamedTuple):
    """What a backend needs to know to say whether it can run an attention call."""

    device: str
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    heads: int
    kv_heads: int
    attn_mask: bool = False
    key_padding_mask: bool = False
    varlen: bool = False
    dropout: bool = False
    window: bool = False
    decode: bool = False

    @classmethod
    def of(cls, q: Tensor, k: Tensor, v: Tensor, args: AttentionArgs | None = None, decode: bool = False):
        """q (B, H, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) (or the caches, for decode)."""
        a = args or AttentionArgs()
        return cls(
            q.device.type, q.dtype, q.shape[-1], v.shape[-1], q.shape[1], k.shape[1], a.attn_mask is not None,
            a.key_padding_mask is not None, a.cu_seqlens_q is not None, a.dropout_p > 0,
            a.window_left >= 0 or a.window_right >= 0, decode,
        )

    def __str__(self) -> str:
        features = [name for name in ("attn_mask", "key_padding_mask", "varlen", "dropout", "window") if getattr(self, name)]
        return (
            f"{self.dtype} on {self.device}, head dim {self.head_dim}"
            + (f" (values {self.head_dim_v})" if self.head_dim_v != self.head_dim else "")
            + f", {self.heads} heads / {self.kv_heads} kv heads"
            + (f", with {', '.join(features)}" if features else "")
        )


def empty_out(q: Tensor, v: Tensor) -> Tensor:
    """The attention output for q and values v: q's layout when the head dims agree, else
    contiguous (B, H, Sq, Dv)."""
    return torch.empty_like(q) if v.shape[-1] == q.shape[-1] else q.new_empty(*q.shape[:-1], v.shape[-1])
