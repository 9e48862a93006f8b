"""scikit-learn's handwritten digits as images for generative models: 8x8 in 0..16, upsampled
bilinearly to ``size`` x ``size`` and scaled to [-1, 1] (the range a tanh generator and a DDPM
both work in), in three fixed splits: train, held-out A and held-out B.

Held-out A is the reference the Fréchet distance compares samples against; held-out B against A
is that distance's floor (two real sets of the same size), so a sample set is judged against what
real digits score, not against zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

NUM_CLASSES = 10
HELD_OUT = 300  # images in each held-out split; the train split gets the other 1197


@dataclass(frozen=True)
class DigitSplits:
    """Each split is (images (N, 1, size, size) float32 in [-1, 1], labels (N,) int64 in 0..9)."""

    train: tuple[Tensor, Tensor]
    held_out_a: tuple[Tensor, Tensor]
    held_out_b: tuple[Tensor, Tensor]


def digit_images(size: int = 16) -> tuple[Tensor, Tensor]:
    """All 1797 digits: images (1797, 1, size, size) float32 in [-1, 1], labels (1797,) int64."""
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8 (the digits are 8x8), got {size!r}")
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images).float().unsqueeze(1)  # (N, 1, 8, 8) in 0..16
    if size != 8:
        # bilinear interpolation is a convex combination of pixels: the range stays 0..16
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x / 8.0 - 1.0, torch.from_numpy(data.target).long()


def load_digit_splits(size: int = 16, seed: int = 0) -> DigitSplits:
    """The train / held-out-A / held-out-B splits, a fixed random permutation per ``seed``."""
    x, y = digit_images(size)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    a, b, train = order[:HELD_OUT], order[HELD_OUT : 2 * HELD_OUT], order[2 * HELD_OUT :]
    return DigitSplits(train=(x[train], y[train]), held_out_a=(x[a], y[a]), held_out_b=(x[b], y[b]))


def check_class_labels(class_labels: Tensor, n: int, num_classes: int = NUM_CLASSES) -> Tensor:
    """class_labels as an int64 (n,) tensor of values in 0..num_classes-1, else a ValueError."""
    if not isinstance(class_labels, Tensor):
        class_labels = torch.as_tensor(class_labels)
    if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool or class_labels.shape != (n,):
        raise ValueError(f"class_labels must be an integer tensor of shape ({n},), got {class_labels.dtype} {tuple(class_labels.shape)}")
    if n and (int(class_labels.min()) < 0 or int(class_labels.max()) >= num_classes):
        raise ValueError(f"class_labels must lie in 0..{num_classes - 1}, got values {class_labels.min().item()}..{class_labels.max().item()}")
    return class_labels.long()
