import pytest
import torch

from fastarch.generative import quality
from fastarch.generative.digits import load_digit_splits


@pytest.fixture(scope="module")
def splits():
    return load_digit_splits()


def test_committed_classifier_reads_held_out_digits(splits):
    for x, y in (splits.held_out_a, splits.held_out_b):
        assert quality.class_accuracy(x, y) > 0.93
    cov = quality.class_coverage(splits.held_out_b[0])
    assert cov["coverage"] == 1.0 and cov["mean_confidence"] > 0.9 and sum(cov["histogram"]) == 300


def test_classifier_trains_in_a_few_epochs(splits):
    model = quality.train_classifier(splits, epochs=2, seed=0)
    assert quality.class_accuracy(*splits.held_out_a, classifier=model) > 0.75


def test_frechet_distance_floor_and_noise(splits):
    a, b = splits.held_out_a[0], splits.held_out_b[0]
    assert quality.sample_frechet_distance(a, a) < 1e-6
    floor = quality.sample_frechet_distance(b, a)
    assert floor > 0
    # noise and shuffled pixels are far from digits; one class only is far from all ten
    noise = torch.rand_like(a) * 2 - 1
    shuffled = a.flatten(1)[:, torch.randperm(256)].view_as(a)
    ones = splits.train[0][splits.train[1] == 1]
    for far in (noise, shuffled, ones):
        assert quality.sample_frechet_distance(far, a) > 5 * floor


def test_frechet_distance_of_gaussians_matches_closed_form():
    # N(0, I) vs N(m, 4I) in D dims: |m|^2 + D(1 + 4 - 2*2) = |m|^2 + D
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200_000, 3, generator=g, dtype=torch.float64)
    b = 2 * torch.randn(200_000, 3, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    assert quality.frechet_distance(a, b) == pytest.approx(5 + 3, rel=0.02)


def test_bad_input():
    with pytest.raises(ValueError, match="a and b"):
        quality.frechet_distance(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="labels"):
        quality.class_accuracy(torch.zeros(3, 1, 16, 16), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="16, 16"):
        quality.predict(torch.zeros(3, 1, 8, 8))
