import pytest
import torch

from fastarch.generative.digits import check_class_labels, digit_images, load_digit_splits


def test_splits_are_fixed_disjoint_and_in_range():
    s = load_digit_splits()
    sizes = [len(s.train[1]), len(s.held_out_a[1]), len(s.held_out_b[1])]
    assert sizes == [1197, 300, 300]
    for x, y in (s.train, s.held_out_a, s.held_out_b):
        assert x.shape[1:] == (1, 16, 16) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        assert set(y.tolist()) == set(range(10))
    again = load_digit_splits()
    assert torch.equal(again.held_out_a[0], s.held_out_a[0])
    # disjoint: no image of held-out A appears in B or train
    flat = lambda x: {tuple(r) for r in x.flatten(1).tolist()}  # noqa: E731
    assert not flat(s.held_out_a[0]) & flat(s.held_out_b[0])
    assert not torch.equal(load_digit_splits(seed=1).held_out_a[1], s.held_out_a[1])


def test_upsampling_keeps_the_8x8_values():
    x8, y = digit_images(8)
    x16, _ = digit_images(16)
    assert x8.shape == (1797, 1, 8, 8) and len(y) == 1797
    assert x8.min() == -1 and x8.max() == 1  # 0 and 16 both occur
    # bilinear upsampling blurs but keeps each image: pooled back down, it correlates with the original
    back = torch.nn.functional.avg_pool2d(x16, 2).flatten(1)
    orig = x8.flatten(1)
    corr = torch.nn.functional.cosine_similarity(back - back.mean(1, keepdim=True), orig - orig.mean(1, keepdim=True))
    assert corr.min() > 0.9


@pytest.mark.parametrize("size", [4, 16.0, None])
def test_bad_size(size):
    with pytest.raises(ValueError, match="size"):
        digit_images(size)


@pytest.mark.parametrize("labels", [torch.tensor([0, 10]), torch.tensor([-1, 2]), torch.tensor([0.0, 1.0]), torch.tensor([1, 2, 3])])
def test_bad_class_labels(labels):
    with pytest.raises(ValueError, match="class_labels"):
        check_class_labels(labels, 2)
