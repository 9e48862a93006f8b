"""Rotary position embedding in plain PyTorch: the definition of correct, and the backend of
last resort.

Kernel-level interface shared by every rotary backend (see backends.py)::

    forward(q, k, cos, sin, positions, interleaved, inverse) -> (q_out, k_out)

- q: (B, Hq, S, D) or packed (total, Hq, D); k: the same with Hk heads (Hk may differ from Hq:
  GQA/MQA); last dims contiguous.
- cos, sin: (max_pos, rot_dim / 2) tables, contiguous, fp32 (fp64 for fp64 q and k):
  cos[p, i] = cos(p * inv_freq[i]), with any attention factor already multiplied in.
- positions: None (token s is at position s; packed: token t at t), a (B,) int64 tensor of
  offsets (4-D only: token s of sequence b is at positions[b] + s), or the position of every
  token: (B, S) for 4-D, (total,) for packed. Every position lies in 0 .. max_pos - 1 (the
  public op checks).
- interleaved: False for the GPT-NeoX / LLaMA half-split layout, channel i pairs with
  i + rot_dim / 2; True for GPT-J's, channel 2i pairs with 2i + 1. Pair i turns by angle
  p * inv_freq[i]: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
- inverse: turn by the opposite angle (sin negated): the gradient of a rotation.
- Channels rot_dim .. D - 1 pass through unchanged.

Computed in fp32 (fp64 for fp64 inputs) and rounded once to the inputs' dtype; outputs are
new tensors laid out as torch.empty_like(q) / (k).
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_positions(q: Tensor, positions: Tensor | None) -> Tensor:
    """The position of every token: (B, S) for 4-D q, (total,) for packed q; int64."""
    if q.dim() == 4:
        batch, seqlen = q.shape[0], q.shape[2]
        steps = torch.arange(seqlen, device=q.device, dtype=torch.int64)
        if positions is None:
            return steps.expand(batch, seqlen)
        if positions.dim() == 1:
            return positions.to(torch.int64)[:, None] + steps
        return positions.to(torch.int64)
    if positions is None:
        return torch.arange(q.shape[0], device=q.device, dtype=torch.int64)
    return positions.to(torch.int64)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """x: (..., D) in the compute dtype; cos, sin: broadcastable to (..., rot_dim / 2)."""
    half = cos.shape[-1]
    rot = x[..., : 2 * half]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    turned = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), dim=-1)
    return torch.cat((turned, x[..., 2 * half :]), dim=-1)


def rotary_ref(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None, interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor]:
    """Rotates q and k by their tokens' positions (see the module docstring)."""
    acc = compute_dtype(q.dtype)
    pos = token_positions(q, positions)
    c, s = cos.to(acc)[pos], sin.to(acc)[pos]  # (B, S, half) or (total, half)
    if inverse:
        s = -s
    # Broadcast over heads: 4-D q is (B, H, S, D), packed q is (total, H, D).
    c, s = (c[:, None], s[:, None])
    outs = []
    for x in (q, k):
        y = _rotate(x.to(acc), c, s, interleaved).to(x.dtype)
        out = torch.empty_like(x)
        out.copy_(y)
        outs.append(out)
    return outs[0], outs[1]
