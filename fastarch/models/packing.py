"""Unpadding: the real tokens of a padded batch packed along one axis, so that no matmul, norm
or attention of an encoder touches a padding position (FlashAttention's varlen layout).

    packing = unpad(attention_mask)                 # once per batch
    x = pack(hidden, packing)                       # (B, S, ...) -> (total, ...)
    ... every layer on (total, ...), attention with packing.cu_seqlens ...
    hidden = unpack(x, packing)                     # (total, ...) -> (B, S, ...), zeros at padding

pack and unpack are differentiable (gradients flow back through the gather / scatter).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Packing(NamedTuple):
    """Where the real tokens of a padded (batch, seqlen) batch lie.

    indices: (total,) int64, the flat positions (b * seqlen + s) of the real tokens, row by row.
    cu_seqlens: (batch + 1,) int32 offsets of each row's tokens in the packed axis.
    max_seqlen: an upper bound on a row's real tokens (seqlen; see unpad).
    """

    indices: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    batch: int
    seqlen: int


def unpad(attention_mask: Tensor) -> Packing:
    """The Packing of ``attention_mask`` (B, S): nonzero / True marks a real token. Rows may
    be padded on either side, or hold no real token at all (that row packs to nothing).

    On a GPU this waits for the device once: the number of real tokens sizes the packed
    tensors, so the host must read it (torch.nonzero). Nothing else here reads the device:
    cu_seqlens are summed on it, and max_seqlen is S, a bound that costs no read and is exact
    when the batch is padded to its longest row (what a tokenizer's padding=True gives); the
    attention kernels only size their grids by it.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seqlen), got shape {tuple(attention_mask.shape)}")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be bool or integer (1 = a real token), got {attention_mask.dtype}")
    batch, seqlen = attention_mask.shape
    real = attention_mask != 0
    indices = torch.nonzero(real.flatten()).flatten()
    cu_seqlens = F.pad(real.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    return Packing(indices, cu_seqlens, seqlen, batch, seqlen)


def pack(x: Tensor, packing: Packing) -> Tensor:
    """x: (B, S, ...) -> (total, ...): the rows of the real tokens."""
    return x.flatten(0, 1).index_select(0, packing.indices)


def unpack(x: Tensor, packing: Packing) -> Tensor:
    """x: (total, ...) -> (B, S, ...), zeros at the padding positions."""
    out = x.new_zeros((packing.batch * packing.seqlen, *x.shape[1:]))
    return out.index_copy(0, packing.indices, x).unflatten(0, (packing.batch, packing.seqlen))
