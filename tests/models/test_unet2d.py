"""fastarch.models.unet2d against diffusers' UNet2DModel and UNet2DConditionModel, on small random
checkpoints written with diffusers' save_pretrained and read back with
fastarch.models.from_pretrained (and the other way: what we save, diffusers loads).

Every parameter is drawn at random (GroupNorm and LayerNorm weights and biases too, not 1 and
0): a tensor loaded into the wrong place, or a swapped pair of norms, changes the outputs.

Configs: an unconditional UNet2DModel with attention stages (default time conditioning); one
with "scale_shift" conditioning, ResNet down/up sampling, padding-0 downsampling, no head dim
(one head per stage), a mid-block scale factor, sin/cos order and frequency shift changed; a
class-conditional one; a UNet2DConditionModel with cross-attention (1x1-conv projections,
GEGLU feed-forward); one with Linear projections, per-block lists, two transformer layers and a
class embedding.

Tolerances
- fp32: max |ours - diffusers| <= 1e-5 x max |diffusers|. Both compute the same fp32 function;
  ours rounds in another order (fused attention with an online softmax, the time embedding
  added into conv1's bias, fused residual + LayerNorm), each a few ulps at the values' scale,
  through <= 12 convs of fan-in <= 9 x 96: a few 1e-7 relative (measured: <= 7e-7). A wrong
  weight, norm, mask or activation moves the outputs by 1e-2 or more.
- bf16: our error against the fp32 truth (diffusers in fp32) at most FACTOR x diffusers' own
  bf16 error, plus one bf16 ulp of the output's scale. Both round every conv, norm and matmul
  output to bf16, in places that differ (the fused ops keep fp32 inside and round once).
- gradients (fp32): each parameter's gradient within 1e-4 x its largest entry plus 1e-6 x the
  largest gradient of all (the backward sums over batch and positions in another order; a
  gradient that is 0 in exact arithmetic, e.g. the key bias's, keeps rounding noise).
"""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastarch.models
from fastarch.models import CheckpointError
from fastarch.models.unet2d import UNet2D

FACTOR = 2.0

UNCOND = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
              norm_num_groups=8, attention_head_dim=16)
CONFIGS = {
    "uncond": (diffusers.UNet2DModel, UNCOND),
    "scale_shift": (diffusers.UNet2DModel, dict(
        sample_size=8, in_channels=2, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"), norm_num_groups=8, attention_head_dim=None,
        resnet_time_scale_shift="scale_shift", downsample_type="resnet", upsample_type="resnet", flip_sin_to_cos=False,
        freq_shift=1, downsample_padding=0, mid_block_scale_factor=1.414, norm_eps=1e-6,
    )),
    "class": (diffusers.UNet2DModel, dict(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, num_class_embeds=11, center_input_sample=True, downsample_padding=0,
    )),
    "cross": (diffusers.UNet2DConditionModel, dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, attention_head_dim=2, cross_attention_dim=24,
    )),
    "cross_linear": (diffusers.UNet2DConditionModel, dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=[1, 2],
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, attention_head_dim=[2, 4],
        cross_attention_dim=24, use_linear_projection=True, transformer_layers_per_block=[1, 2], num_class_embeds=5,
    )),
}


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Every parameter from N(0, 1): matrices scaled by 1/sqrt(fan-in), vectors by 1/2 around
    0 (biases) or 1 (norm weights), so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(r / p[0].numel() ** 0.5)
            else:
                p.copy_(0.5 * r + (1.0 if "norm" in name and name.endswith("weight") else 0.0))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (checkpoint directory, the diffusers model in fp32, eval mode)."""
    out = {}
    for name, (cls, kwargs) in CONFIGS.items():
        model = cls(**kwargs).eval()
        randomize(model)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = path, model
    return out


def inputs(model, batch: int = 2, size: int | None = None, seed: int = 0) -> dict:
    """Keyword arguments for a forward of ``model`` (diffusers'), fixed by the seed."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    size = size or c.sample_size
    kw = dict(sample=torch.randn(batch, c.in_channels, size, size, generator=g),
              timestep=torch.randint(0, 1000, (batch,), generator=g))
    if c.num_class_embeds:
        kw["class_labels"] = torch.randint(0, c.num_class_embeds, (batch,), generator=g)
    if isinstance(model, diffusers.UNet2DConditionModel):
        kw["encoder_hidden_states"] = torch.randn(batch, 7, c.cross_attention_dim, generator=g)
    return kw


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_matches_diffusers(checkpoints, name):
    path, reference = checkpoints[name]
    model = fastarch.models.from_pretrained(path)
    assert isinstance(model, UNet2D) and not model.training
    kw = inputs(reference)
    with torch.no_grad():
        want = reference(**kw).sample
        got = model(**kw)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert relative_error(got, want) <= 1e-5


@pytest.mark.parametrize("name", ["uncond", "scale_shift", "cross"])
def test_bf16_error_bounded_by_diffusers(checkpoints, name):
    path, reference = checkpoints[name]
    model = fastarch.models.from_pretrained(path, dtype=torch.bfloat16)
    reference_low = type(reference).from_pretrained(path, torch_dtype=torch.bfloat16).eval()
    kw = inputs(reference)
    low = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kw.items()}
    with torch.no_grad():
        truth = reference(**kw).sample
        theirs = reference_low(**low).sample.float()
        got = model(**kw)  # fp32 inputs: cast to the model's dtype
    assert got.dtype == torch.bfloat16
    ours_err = (got.float() - truth).abs().max().item()
    their_err = (theirs - truth).abs().max().item()
    ulp = torch.finfo(torch.bfloat16).eps * truth.abs().max().item()
    assert ours_err <= FACTOR * their_err + ulp, (ours_err, their_err)


@pytest.mark.parametrize("name", ["scale_shift", "cross_linear"])
def test_training_step_gradients_match_diffusers(checkpoints, name):
    path, reference = checkpoints[name]
    model = fastarch.models.from_pretrained(path).train()
    reference = type(reference).from_pretrained(path).train()
    kw = inputs(reference, seed=3)
    target = torch.randn(reference(**kw).sample.shape, generator=torch.Generator().manual_seed(4))
    reference.zero_grad()
    loss_theirs = torch.nn.functional.mse_loss(reference(**kw).sample, target)
    loss_theirs.backward()
    loss_ours = torch.nn.functional.mse_loss(model(**kw), target)
    loss_ours.backward()
    assert abs(loss_ours.item() - loss_theirs.item()) <= 1e-5 * loss_theirs.item()
    theirs = dict(reference.named_parameters())
    ours = dict(model.named_parameters())
    assert set(ours) == set(theirs)
    overall = max(p.grad.abs().max().item() for p in theirs.values())
    for n, p in theirs.items():
        err = (ours[n].grad - p.grad).abs().max().item()
        assert err <= 1e-4 * p.grad.abs().max().item() + 1e-6 * overall, (n, err)


def test_save_pretrained_loads_in_diffusers(checkpoints, tmp_path):
    """What we save (a model loaded, or one built from a config dict and trained from scratch),
    diffusers loads with every tensor, and both compute the same function."""
    path, reference = checkpoints["cross_linear"]
    fastarch.models.from_pretrained(path).save_pretrained(tmp_path / "a")
    again = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "a").eval()
    for (n, p), (m, q) in zip(reference.state_dict().items(), again.state_dict().items()):
        assert n == m and torch.equal(p, q), n
    fresh = UNet2D.from_config(dict(UNCOND))
    fresh.save_pretrained(tmp_path / "b")
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "b").eval()
    kw = inputs(theirs)
    with torch.no_grad():
        assert relative_error(fresh.eval()(**kw), theirs(**kw).sample) <= 1e-5


def test_odd_sizes_and_encoder_attention_mask(checkpoints):
    """A sample whose size is not a multiple of 2**downsamplers (upsampling to the skip's size,
    as UNet2DConditionModel does) and padding tokens masked out of the cross-attention."""
    path, reference = checkpoints["cross"]
    model = fastarch.models.from_pretrained(path)
    kw = inputs(reference, size=9)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        want = reference(**kw, encoder_attention_mask=mask).sample
        got = model(**kw, encoder_attention_mask=mask.bool())
        unmasked = model(**kw)
    assert got.shape == (2, 4, 9, 9)
    assert relative_error(got, want) <= 1e-5
    assert relative_error(unmasked[0], want[0]) > 1e-3  # the mask matters


def test_old_attention_names_load(checkpoints, tmp_path):
    """Checkpoints written before diffusers renamed attention projections (google/ddpm-cifar10-32:
    query/key/value/proj_attn) load as diffusers loads them."""
    from safetensors.torch import load_file, save_file

    path, reference = checkpoints["uncond"]
    state = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for n, t in state.items():
        for new, was in renames.items():
            n = n.replace(new, was)
        old[n] = t
    assert any(".proj_attn." in n for n in old)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(old, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    model = fastarch.models.from_pretrained(tmp_path)
    kw = inputs(reference)
    with torch.no_grad():
        assert relative_error(model(**kw), reference(**kw).sample) <= 1e-5


def test_nan_sample_gives_nan(checkpoints):
    path, reference = checkpoints["uncond"]
    model = fastarch.models.from_pretrained(path)
    kw = inputs(reference)
    kw["sample"][1, 0, 3, 3] = float("nan")
    with torch.no_grad():
        out = model(**kw)
    assert out[1].isnan().any() and not out[0].isnan().any()


@pytest.mark.parametrize("changes, match", [
    (dict(down_block_types=["SkipDownBlock2D", "AttnDownBlock2D"]), "down_block_types holds 'SkipDownBlock2D'"),
    (dict(up_block_types=["AttnUpBlock2D", "KUpBlock2D"]), "up_block_types holds 'KUpBlock2D'"),
    (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid_block_type"),
    (dict(act_fn="gelu"), "act_fn 'gelu'"),
    (dict(time_embedding_type="fourier"), "time_embedding_type 'fourier'"),
    (dict(class_embed_type="timestep"), "class_embed_type 'timestep'"),
    (dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift 'spatial'"),
    (dict(attention_head_dim=[8, 8]), "attention_head_dim"),
    (dict(_class_name="UNet1DModel"), "_class_name 'UNet1DModel'"),
])
def test_unsupported_unet2d_config_refused(checkpoints, tmp_path, changes, match):
    path, _ = checkpoints["uncond"]
    config = {**json.loads((path / "config.json").read_text()), **changes}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "diffusion_pytorch_model.safetensors").symlink_to(path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=match):
        fastarch.models.from_pretrained(tmp_path)


@pytest.mark.parametrize("changes, match", [
    (dict(addition_embed_type="text"), "addition_embed_type 'text'"),
    (dict(only_cross_attention=True), "only_cross_attention True"),
    (dict(encoder_hid_dim=12), "encoder_hid_dim 12"),
    (dict(cross_attention_dim=[24, 16]), "cross_attention_dim"),
    (dict(transformer_layers_per_block=[[1], [1]]), "transformer_layers_per_block"),
])
def test_unsupported_condition_config_refused(changes, match):
    config = {"_class_name": "UNet2DConditionModel", **CONFIGS["cross"][1], **changes}
    with pytest.raises(CheckpointError, match=match):
        UNet2D.from_config(config)


@pytest.mark.parametrize("name, change, error, match", [
    ("uncond", dict(sample=torch.zeros(2, 4, 16, 16)), ValueError, r"in_channels 3"),
    ("uncond", dict(sample=torch.zeros(2, 3, 16, 16, dtype=torch.long)), TypeError, "floating"),
    ("uncond", dict(class_labels=torch.tensor([0, 1])), ValueError, "no class embedding"),
    ("class", dict(class_labels=None), ValueError, "class_labels"),
    ("class", dict(class_labels=torch.tensor([0, 11])), ValueError, r"\[0, 11\)"),
    ("cross", dict(encoder_hidden_states=torch.zeros(2, 7, 16)), ValueError, "cross_attention_dim=24"),
    ("cross", dict(encoder_hidden_states=None), ValueError, "encoder_hidden_states"),
    ("cross", dict(timestep=torch.zeros(3)), ValueError, "timestep"),
])
def test_bad_inputs(checkpoints, name, change, error, match):
    path, reference = checkpoints[name]
    model = fastarch.models.from_pretrained(path)
    kw = {**inputs(reference), **change}
    with pytest.raises(error, match=match):
        model(**kw)


def test_packed_convolutions_follow_weight_updates(checkpoints):
    """Sampling (no autograd) runs the convolutions on weights packed once; a training step that
    changes the weights in place, or a cast, must not leave a stale packed copy behind."""
    path, reference = checkpoints["uncond"]
    model = fastarch.models.from_pretrained(path)
    kw = inputs(reference)
    with torch.no_grad():
        before = model(**kw)
        for p in model.parameters():
            p.mul_(1.01)
        after = model(**kw)
    with torch.enable_grad():
        unpacked = model(**kw).detach()  # autograd on: torch's conv2d on the live weights
    assert relative_error(before, after) > 1e-3
    assert relative_error(after, unpacked) <= 1e-5
    with torch.inference_mode():
        low = model.to(torch.bfloat16)(**kw)
    assert low.dtype == torch.bfloat16 and relative_error(low.float(), unpacked) <= 0.05
