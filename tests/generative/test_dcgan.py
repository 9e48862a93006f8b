import pytest
import torch
import torch.nn.functional as F

from fastarch.generative import CHECKPOINTS
from fastarch.generative.dcgan import DCGANConfig, Discriminator, Generator
from fastarch.generative.train import train_gan
from fastarch.models.loading import CheckpointError

TINY = DCGANConfig(latent_dim=8, base_channels=8, class_embed_dim=8, num_groups=4)


@pytest.fixture(scope="module")
def committed():
    return Generator.from_pretrained(CHECKPOINTS / "gan-digits")


def test_training_a_few_steps_teaches_the_discriminator():
    # the full-size model: its untrained discriminator starts far off (loss ~4 at seed 0) and
    # learns to tell real from generated within a few steps
    r = train_gan(steps=8, batch_size=8, seed=0, progress=False)
    d = r.history["d_loss"]
    assert len(d) == 8 and len(r.history["g_loss"]) == 8
    assert sum(d[-3:]) / 3 < 0.5 * sum(d[:2]) / 2


def test_training_is_seeded():
    a = train_gan(TINY, steps=3, batch_size=8, seed=1, progress=False)
    b = train_gan(TINY, steps=3, batch_size=8, seed=1, progress=False)
    assert a.history == b.history
    torch.testing.assert_close(a.model.sample(4, torch.arange(4), seed=0), b.model.sample(4, torch.arange(4), seed=0), rtol=0, atol=0)


def test_committed_generator_samples(committed):
    labels = torch.tensor([0, 3, 9, 3])
    x = committed.sample(4, labels, seed=0)
    assert x.shape == (4, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and torch.isfinite(x).all()
    assert torch.equal(x, committed.sample(4, labels, seed=0))
    assert not torch.equal(x, committed.sample(4, labels, seed=1))


def test_save_and_load_round_trip(tmp_path):
    gen = Generator(TINY).eval()
    gen.save_pretrained(tmp_path)
    back = Generator.from_pretrained(tmp_path)
    assert back.config == TINY
    torch.testing.assert_close(back.sample(3, torch.arange(3), seed=0), gen.sample(3, torch.arange(3), seed=0), rtol=0, atol=0)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="dcgan_generator"):
        Generator.from_pretrained(tmp_path)


def test_unconditional_generator_and_discriminator_shapes():
    config = DCGANConfig(latent_dim=8, base_channels=8, num_classes=None, num_groups=4)
    gen, disc = Generator(config), Discriminator(config)
    x = gen.sample(5, seed=0)
    assert x.shape == (5, 1, 16, 16)
    assert disc(x).shape == (5,)
    with pytest.raises(ValueError, match="unconditional"):
        gen.sample(2, torch.tensor([1, 2]))


def test_bad_input(committed):
    with pytest.raises(ValueError, match="class_labels"):
        committed.sample(2, torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="class_labels"):
        committed.sample(2, None)
    with pytest.raises(ValueError, match="n must"):
        committed.sample(0, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="z must"):
        committed(torch.randn(2, 3), torch.tensor([1, 2]))
