"""How good are generated digits: a small CNN digit classifier trained on the train split, and
the measures built on it.

- ``class_accuracy(samples, labels)``: the fraction of class-conditional samples the classifier
  reads as the class they were asked for.
- ``class_coverage(samples)``: for unconditional samples, how many of the 10 classes appear and
  the classifier's mean confidence (mode collapse shows as low coverage, mush as low confidence).
- ``frechet_distance``: the Fréchet distance between Gaussians fitted to the classifier's
  penultimate features (FID's recipe, with a digit classifier in place of Inception), reported
  next to its floor, held-out B against held-out A.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastarch.generative.digits import NUM_CLASSES, DigitSplits, load_digit_splits

CLASSIFIER_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "digit-classifier"


class DigitClassifier(nn.Module):
    """Two conv blocks and a 64-wide hidden layer (the features the Fréchet distance uses).
    images: (N, 1, 16, 16) in [-1, 1]."""

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.hidden = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.out = nn.Linear(self.feature_dim, NUM_CLASSES)

    def features(self, images: Tensor) -> Tensor:
        """(N, 1, 16, 16) -> (N, 64): the penultimate activations."""
        if images.dim() != 4 or images.shape[1:] != (1, 16, 16):
            raise ValueError(f"images must be (N, 1, 16, 16), got {tuple(images.shape)}")
        h = F.max_pool2d(F.relu(self.conv1(images)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.hidden(h.flatten(1)))

    def forward(self, images: Tensor) -> Tensor:
        """(N, 1, 16, 16) -> logits (N, 10)."""
        return self.out(self.features(images))


def _shift(images: Tensor, generator: torch.Generator) -> Tensor:
    # random shifts of up to one pixel: generated digits are not centred exactly like the real ones
    dy, dx = torch.randint(-1, 2, (2,), generator=generator).tolist()
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))


def train_classifier(splits: DigitSplits | None = None, *, epochs: int = 12, seed: int = 0) -> DigitClassifier:
    """A DigitClassifier trained on the train split (a few seconds on a CPU core), in eval mode."""
    splits = splits or load_digit_splits()
    x, y = splits.train
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=g).split(64):
            loss = F.cross_entropy(model(_shift(x[batch], g)), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def save_classifier(model: DigitClassifier, path: str | os.PathLike = CLASSIFIER_CHECKPOINT) -> None:
    from safetensors.torch import save_file

    Path(path).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(path) / "model.safetensors"))


_LOADED: dict[str, DigitClassifier] = {}


def load_classifier(path: str | os.PathLike = CLASSIFIER_CHECKPOINT) -> DigitClassifier:
    """The committed classifier (every figure in the README was measured with it), cached."""
    key = str(path)
    if key not in _LOADED:
        from safetensors.torch import load_file

        model = DigitClassifier()
        model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        _LOADED[key] = model.eval()
    return _LOADED[key]


@torch.no_grad()
def predict(images: Tensor, classifier: DigitClassifier | None = None) -> Tensor:
    """Class probabilities (N, 10) of images (N, 1, 16, 16) in [-1, 1]."""
    classifier = classifier or load_classifier()
    return torch.cat([classifier(b.float()).softmax(-1) for b in images.split(512)]) if len(images) else torch.empty(0, NUM_CLASSES)


def class_accuracy(samples: Tensor, labels: Tensor, classifier: DigitClassifier | None = None) -> float:
    """The fraction of samples (N, 1, 16, 16) the classifier assigns to labels (N,)."""
    if len(samples) != len(labels) or len(samples) == 0:
        raise ValueError(f"samples and labels must be non-empty and equally long, got {len(samples)} and {len(labels)}")
    return (predict(samples, classifier).argmax(-1) == labels.to(torch.long)).float().mean().item()


def class_coverage(samples: Tensor, classifier: DigitClassifier | None = None) -> dict[str, float]:
    """For unconditional samples: ``coverage`` (the fraction of the 10 classes predicted for at
    least 2% of the samples), ``mean_confidence`` (the mean top probability), ``histogram``."""
    probs = predict(samples, classifier)
    counts = torch.bincount(probs.argmax(-1), minlength=NUM_CLASSES)
    return {
        "coverage": (counts >= max(1, math.ceil(0.02 * len(samples)))).float().mean().item(),
        "mean_confidence": probs.max(-1).values.mean().item(),
        "histogram": counts.tolist(),
    }


@torch.no_grad()
def features(images: Tensor, classifier: DigitClassifier | None = None) -> Tensor:
    """The classifier's penultimate features (N, 64), float64."""
    classifier = classifier or load_classifier()
    return torch.cat([classifier.features(b.float()) for b in images.split(512)]).double()


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to feature sets a (N, D) and b (M, D):
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2), computed through
    symmetric eigendecompositions in float64 (no non-symmetric matrix square root)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"a and b must be (N, D) feature sets with N >= 2 and the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(cov_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    d = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(d.item(), 0.0)


def sample_frechet_distance(samples: Tensor, reference: Tensor, classifier: DigitClassifier | None = None) -> float:
    """frechet_distance of the classifier features of samples and reference images."""
    return frechet_distance(features(samples, classifier), features(reference, classifier))


def evaluate(samples: Tensor, labels: Tensor | None = None, splits: DigitSplits | None = None) -> dict:
    """Every measure at once: accuracy against labels (when the samples are conditional),
    coverage and confidence, the Fréchet distance to held-out A and its floor (held-out B vs A)."""
    splits = splits or load_digit_splits()
    report = class_coverage(samples)
    if labels is not None:
        report["class_accuracy"] = class_accuracy(samples, labels)
    report["frechet_distance"] = sample_frechet_distance(samples, splits.held_out_a[0])
    report["frechet_floor"] = sample_frechet_distance(splits.held_out_b[0], splits.held_out_a[0])
    return report
