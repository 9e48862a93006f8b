"""Small generative models trained on scikit-learn's 8x8 digits (upsampled to 16x16), with the
quality measures that judge them: a DCGAN whose norms run on fastarch's kernels, and a
class-conditional DDPM on fastarch's UNet2D.

    from fastarch.generative import CHECKPOINTS
    from fastarch.generative.dcgan import Generator
    from fastarch.generative.ddpm import load_ddpm, sample_digits

    threes = torch.full((16,), 3)
    gan = Generator.from_pretrained(CHECKPOINTS / "gan-digits")
    images = gan.sample(16, threes, seed=0)                                  # (16, 1, 16, 16) in [-1, 1]
    images = sample_digits(load_ddpm(CHECKPOINTS / "ddpm-digits"), threes, steps=50, guidance_scale=1.5, seed=0)

Committed checkpoints live in ``checkpoints/``; ``fastarch train-gan`` / ``train-ddpm`` rebuild
them and ``fastarch sample`` draws from them.
"""

from __future__ import annotations

from pathlib import Path

from fastarch.generative.digits import DigitSplits, load_digit_splits

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"

__all__ = ["CHECKPOINTS", "DigitSplits", "load_digit_splits"]
