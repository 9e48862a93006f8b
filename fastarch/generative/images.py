"""Writing image grids as PNG files (Pillow)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor


def save_grid(images: Tensor, path: str | os.PathLike, *, nrow: int | None = None, scale: int = 4, padding: int = 1) -> Path:
    """Writes images (N, 1, H, W) in [-1, 1] as one grayscale PNG, ``nrow`` images per row
    (default: a square-ish grid), each pixel enlarged ``scale`` times (nearest neighbour, so the
    16x16 pixels stay visible), ``padding`` black pixels between images. Returns the path."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] != 1 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, 1, H, W) tensor, got {tuple(images.shape)}")
    n, _, h, w = images.shape
    nrow = nrow or max(1, int(round(n**0.5)))
    rows = -(-n // nrow)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
    pixels = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    h, w = h * scale, w * scale
    canvas = torch.zeros(padding + rows * (h + padding), padding + nrow * (w + padding), dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        canvas[top : top + h, left : left + w] = pixels[i]
    path = Path(path)
    Image.fromarray(canvas.numpy(), mode="L").save(path)
    return path
