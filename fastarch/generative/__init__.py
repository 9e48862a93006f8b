"""Small generative models trained on scikit-learn's 8x8 digits (upsampled to 16x16), with the
quality measures that judge them: a DCGAN whose norms run on fastarch's kernels, and a
class-conditional DDPM on fastarch's UNet2D.

    from fastarch.generative import load_digit_splits, load_gan
    images = load_gan().sample(16, class_labels=torch.full((16,), 3), seed=0)   # (16, 1, 16, 16) in [-1, 1]

Committed checkpoints live in ``checkpoints/``; ``fastarch train-gan`` / ``train-ddpm`` rebuild
them and ``fastarch sample`` draws from them.
"""

from __future__ import annotations

from pathlib import Path

from fastarch.generative.digits import DigitSplits, load_digit_splits

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"

__all__ = ["CHECKPOINTS", "DigitSplits", "load_digit_splits"]
