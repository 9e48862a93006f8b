import pytest
from PIL import Image

from fastarch.cli import main


def test_sample_gan_one_class(tmp_path):
    out = tmp_path / "three.png"
    assert main(["sample", "--model", "gan", "--class", "3", "--n", "4", "--out", str(out), "--no-progress"]) == 0
    # a 2x2 grid of 16x16 digits, each pixel 4x4, 1 pixel apart
    assert Image.open(out).size == (2 * 65 + 1, 2 * 65 + 1)


def test_sample_ddpm_a_row_per_class(tmp_path):
    out = tmp_path / "all.png"
    assert main(["sample", "--model", "ddpm", "--n", "2", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    assert Image.open(out).size == (2 * 65 + 1, 10 * 65 + 1)


def test_train_gan_writes_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "gan"
    assert main(["train-gan", "--steps", "2", "--batch-size", "4", "--out", str(out), "--no-progress"]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "loss.png"}
    assert "class accuracy" in capsys.readouterr().err
    assert main(["sample", "--model", "gan", "--checkpoint", str(out), "--n", "1", "--out", str(tmp_path / "g.png"), "--no-progress"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--class", "10"], "--class must be a digit"),
    (["--class", "-1"], "--class must be a digit"),
    (["--n", "0"], "--n must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--out", "grid.jpg"], "--out must name a .png"),
    (["--checkpoint", "/nonexistent"], "cannot load"),
    (["--seed", str(2**64)], "--seed must be an int in [0, 2**64)"),
    (["--seed", "-1"], "--seed must be an int in [0, 2**64)"),
])
@pytest.mark.parametrize("model", ["gan", "ddpm"])
def test_sample_bad_input(model, args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--model", model, *args, "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()
