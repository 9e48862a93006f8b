"""fastarch.models.vit against transformers' ViTForImageClassification and ViTModel, on small
random checkpoints written with save_pretrained and read back with fastarch.models.from_pretrained.

Every parameter is drawn at random (LayerNorm weights and biases too, not transformers' 1 and
0): a tensor loaded into the wrong place, or a swapped pair of norms, changes the outputs.

Tolerances
- fp32: max |ours - transformers| <= 1e-5 x max |transformers|. Both compute the same fp32
  function; ours rounds in another order (a fused attention with an online softmax, the fused
  residual + LayerNorm, the bias added inside the GELU), each step a few ulps (1e-7) at the
  values' scale, through two blocks of reductions of length <= 37: a few 1e-6 at most. A wrong
  weight, norm, mask or activation form moves the outputs by 1e-3 or more.
- bf16/fp16: our error against the fp32 truth (transformers in fp32) at most FACTOR x the error
  of transformers' own computation in that dtype, plus one ulp of the output's scale. Both
  round every matmul, norm and activation output to the dtype, in places that differ (the
  fused ops keep fp32 inside and round once): which error is larger varies by draw (ours up to
  1.6x theirs on these checkpoints).
- gradients: each parameter's gradient within 1e-4 x its largest entry (fp32; the backward sums
  over the batch and sequence in another order), plus 1e-6 x the largest gradient of all: a
  gradient that is 0 in exact arithmetic (the key bias's: softmax ignores a shift shared by
  every key) keeps rounding noise at the scale of the terms that cancel.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import fastarch.models
from fastarch.models import CheckpointError
from fastarch.models.vit import ViT

transformers.logging.set_verbosity_error()

FACTOR = 2.0
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# A classifier (square images, erf GELU); a ViTModel with its pooler, rectangular images and
# patches, two channels, no q/k/v bias and the tanh GELU.
CONFIGS = {
    "classifier": (transformers.ViTForImageClassification, dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=16,
        patch_size=4, num_labels=5, hidden_act="gelu",
    )),
    "base_pooler": (transformers.ViTModel, dict(
        hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40, image_size=[12, 16],
        patch_size=[4, 8], num_channels=2, qkv_bias=False, hidden_act="gelu_new", layer_norm_eps=1e-6,
    )),
}


def randomize(model: torch.nn.Module) -> None:
    """Every parameter from N(0, 1), matrices scaled by 1/sqrt(fan-in) so activations stay O(1)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.dim() >= 2 else 1.0))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (checkpoint directory, the transformers model in fp32, eval mode)."""
    out = {}
    for name, (cls, kwargs) in CONFIGS.items():
        model = cls(transformers.ViTConfig(**kwargs)).eval()
        randomize(model)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = path, model
    return out


def pixels(model, batch: int = 3, seed: int = 0) -> torch.Tensor:
    c = model.config
    size = c.image_size if isinstance(c.image_size, list) else [c.image_size] * 2
    return torch.randn(batch, c.num_channels, *size, generator=torch.Generator().manual_seed(seed))


def outputs(ours) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ours._asdict().items() if v is not None}


def reference_outputs(model, x) -> dict[str, torch.Tensor]:
    """transformers' outputs under our names."""
    if isinstance(model, transformers.ViTForImageClassification):
        out = model.vit(x)
        return {"logits": model.classifier(out.last_hidden_state[:, 0]), "last_hidden_state": out.last_hidden_state}
    out = model(x)
    return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_matches_transformers(checkpoints, name, device):
    path, reference = checkpoints[name]
    model = fastarch.models.from_pretrained(path, device=device)
    assert isinstance(model, ViT) and not model.training
    x = pixels(reference)
    with torch.no_grad():
        want = reference_outputs(reference, x)
        got = outputs(model(x.to(device)))
    assert set(got) == set(want)
    for key in want:
        assert got[key].shape == want[key].shape and got[key].dtype == torch.float32
        assert relative_error(got[key].cpu(), want[key]) <= 1e-5, key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_low_precision_error_bounded_by_transformers(checkpoints, name, dtype, device):
    path, reference = checkpoints[name]
    model = fastarch.models.from_pretrained(path, dtype=dtype, device=device)
    low = transformers.ViTModel if name == "base_pooler" else transformers.ViTForImageClassification
    reference_low = low.from_pretrained(path, dtype=dtype).eval()
    x = pixels(reference)
    with torch.no_grad():
        truth = reference_outputs(reference, x)
        theirs = reference_outputs(reference_low, x.to(dtype))
        got = outputs(model(x.to(device)))  # fp32 pixels: cast to the model's dtype, as transformers does
    for key in truth:
        assert got[key].dtype == dtype
        ours_err = (got[key].cpu().float() - truth[key]).abs().max().item()
        their_err = (theirs[key].float() - truth[key]).abs().max().item()
        ulp = torch.finfo(dtype).eps * truth[key].abs().max().item()
        assert ours_err <= FACTOR * their_err + ulp, (key, ours_err, their_err)


def same_parameters(ours: torch.nn.Module, theirs: torch.nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, our parameter, theirs) for every parameter of ``theirs``, paired by value: every
    value was drawn at random, so equal tensors are the same checkpoint tensor (this avoids
    restating the name map the test is checking)."""
    pairs, mine = [], list(ours.named_parameters())
    for name, p in theirs.named_parameters():
        found = [q for _, q in mine if q.shape == p.shape and torch.equal(q.detach().float(), p.detach().float())]
        assert len(found) == 1, f"{name}: {len(found)} of our parameters hold its values"
        pairs.append((name, found[0], p))
    assert len(pairs) == len(mine)
    return pairs


def assert_gradients_close(names: list[str], got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    overall = max(w.abs().max().item() for w in want)
    for name, g, w in zip(names, got, want):
        err = (g - w).abs().max().item()
        assert err <= 1e-4 * w.abs().max().item() + 1e-6 * overall, (name, err)


def test_training_step_gradients_match_transformers(checkpoints):
    path, _ = checkpoints["classifier"]
    model = fastarch.models.from_pretrained(path).train()
    reference = transformers.ViTForImageClassification.from_pretrained(path).train()
    x, labels = pixels(reference), torch.tensor([0, 4, 2])
    loss_theirs = reference(x, labels=labels).loss
    loss_theirs.backward()
    loss_ours = torch.nn.functional.cross_entropy(model(x).logits, labels)
    loss_ours.backward()
    assert abs(loss_ours.item() - loss_theirs.item()) <= 1e-5 * abs(loss_theirs.item())
    pairs = same_parameters(model, reference)
    assert all(mine.grad is not None for _, mine, _ in pairs)
    assert_gradients_close([n for n, _, _ in pairs], [m.grad for _, m, _ in pairs], [t.grad for _, _, t in pairs])


def test_compile_matches_eager(checkpoints):
    path, reference = checkpoints["classifier"]
    model = fastarch.models.from_pretrained(path).train()
    compiled = torch.compile(model, fullgraph=True)
    x = pixels(reference, batch=2)
    eager = model(x).logits
    grads_eager = torch.autograd.grad(eager.square().sum(), list(model.parameters()))
    got = compiled(x).logits
    grads_compiled = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    assert relative_error(got, eager) <= 1e-5
    assert_gradients_close([n for n, _ in model.named_parameters()], grads_compiled, grads_eager)


def test_nan_pixels_give_nan(checkpoints):
    path, reference = checkpoints["classifier"]
    model = fastarch.models.from_pretrained(path)
    x = pixels(reference, batch=2)
    x[1, 0, 3, 3] = float("nan")
    with torch.no_grad():
        logits = model(x).logits
    assert logits[0].isfinite().all() and logits[1].isnan().all()


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 3, 16, 20), r"pixel_values must have shape \(batch, 3, 16, 16\).*got \(2, 3, 16, 20\).*interpolated"),
        ((2, 1, 16, 16), r"pixel_values must have shape \(batch, 3, 16, 16\).*got \(2, 1, 16, 16\)"),
        ((3, 16, 16), r"pixel_values must have shape"),
        ((0, 3, 16, 16), r"pixel_values holds no image"),
    ],
)
def test_bad_pixel_values(checkpoints, shape, match):
    model = fastarch.models.from_pretrained(checkpoints["classifier"][0])
    with pytest.raises(ValueError, match=match):
        model(torch.randn(shape))


def test_integer_pixel_values_refused(checkpoints):
    model = fastarch.models.from_pretrained(checkpoints["classifier"][0])
    with pytest.raises(TypeError, match="pixel_values must be a floating tensor"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def _rewrite_config(src, dst, **changes):
    """A copy of checkpoint ``src`` in ``dst`` with config.json entries changed."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    return dst


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(hidden_act="relu"), r"hidden_act 'relu' is not built"),
        (dict(architectures=["ViTForMaskedImageModeling"]), r"ViTForMaskedImageModeling is not built"),
        (dict(image_size=[16]), r"image_size must be an int or a pair"),
        (dict(num_attention_heads=5), r"hidden_size 32 is not a multiple of num_attention_heads 5"),
        (dict(model_type="bert"), r"model_type 'bert' is not 'vit'"),
    ],
)
def test_unsupported_config_refused(checkpoints, tmp_path, changes, match):
    path = _rewrite_config(checkpoints["classifier"][0], tmp_path / "ckpt", **changes)
    with pytest.raises(CheckpointError, match=match):
        ViT.from_pretrained(path)


def test_masked_image_modeling_checkpoint_refused(tmp_path):
    config = transformers.ViTConfig(**{**CONFIGS["classifier"][1], "encoder_stride": 4})
    transformers.ViTForMaskedImageModeling(config).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["architectures"]  # the tensors alone must give it away
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"mask_token.*masked image modeling .* is not built"):
        ViT.from_pretrained(tmp_path)


def test_pooler_activation_refused(checkpoints, tmp_path):
    path = _rewrite_config(checkpoints["base_pooler"][0], tmp_path / "ckpt", pooler_act="relu")
    with pytest.raises(CheckpointError, match=r"pooler_act 'relu' is not built"):
        fastarch.models.from_pretrained(path)


def test_weights_of_another_shape_refused(checkpoints, tmp_path):
    path = _rewrite_config(checkpoints["classifier"][0], tmp_path / "ckpt", intermediate_size=36)
    with pytest.raises(CheckpointError, match=r"intermediate\.dense\.(weight|bias) has shape"):
        fastarch.models.from_pretrained(path)
