import pytest
import torch

from fastarch.generative import CHECKPOINTS, ddpm
from fastarch.generative.train import train_ddpm

TINY = {**ddpm.DDPM_CONFIG, "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D"] * 2,
        "up_block_types": ["UpBlock2D"] * 2, "norm_num_groups": 4, "attention_head_dim": 8}


@pytest.fixture(scope="module")
def committed():
    return ddpm.load_ddpm(CHECKPOINTS / "ddpm-digits")


def test_training_a_few_steps_reduces_the_loss():
    r = train_ddpm(config=TINY, steps=25, batch_size=8, lr=3e-3, warmup=5, seed=0, progress=False)
    loss = r.history["loss"]
    assert len(loss) == 25
    # noise prediction starts near the noise's variance (1) and falls quickly
    assert sum(loss[-8:]) / 8 < 0.6 * sum(loss[:5]) / 5


def test_training_is_seeded():
    runs = [train_ddpm(config=TINY, steps=2, batch_size=4, seed=3, progress=False) for _ in range(2)]
    assert runs[0].history == runs[1].history


def test_committed_checkpoint_samples(committed):
    labels = torch.tensor([0, 3, 7])
    x = ddpm.sample_digits(committed, labels, steps=4, seed=0)
    assert x.shape == (3, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and torch.isfinite(x).all()
    assert torch.equal(x, ddpm.sample_digits(committed, labels, steps=4, seed=0))
    assert not torch.equal(x, ddpm.sample_digits(committed, labels, steps=4, seed=1))
    stochastic = ddpm.sample_digits(committed, labels, steps=4, eta=1.0, guidance_scale=1.0, seed=0)
    assert torch.equal(stochastic, ddpm.sample_digits(committed, labels, steps=4, eta=1.0, guidance_scale=1.0, seed=0))
    assert ddpm.sample_digits(committed, n=2, steps=2).shape == (2, 1, 16, 16)  # the null class: unconditional


def test_diffusers_loads_the_committed_checkpoint(committed):
    import diffusers  # a test dependency ([test] extra): never skipped
    theirs = diffusers.UNet2DModel.from_pretrained(CHECKPOINTS / "ddpm-digits").eval()
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 10, 500, 999]), torch.tensor([1, 5, 9, ddpm.NULL_CLASS])
    with torch.no_grad():
        torch.testing.assert_close(committed(x, t, class_labels=y), theirs(x, t, class_labels=y).sample, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"class_labels": torch.tensor([10])}, "class_labels"),
    ({"class_labels": torch.tensor([1, 2]), "n": 3}, "class_labels"),
    ({"n": 0}, "n must"),
    ({"class_labels": torch.tensor([1]), "steps": 0}, "steps"),
    ({"class_labels": torch.tensor([1]), "eta": 1.5}, "eta"),
])
def test_bad_input(committed, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ddpm.sample_digits(committed, **kwargs)
