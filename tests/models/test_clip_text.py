"""fastarch.models.clip_text against transformers' CLIPTextModelWithProjection, CLIPTextModel and
CLIPModel (its text tower), on small random checkpoints written with save_pretrained and read
back with fastarch.models.from_pretrained.

Every parameter is drawn at random (LayerNorm weights and biases too): a tensor loaded into the
wrong place changes the outputs. Batches are padded on the right as CLIP's tokenizer pads, with
texts of different lengths, one of them a single token; the padding positions of
last_hidden_state are not compared (transformers computes values there that nothing reads; we
give zeros).

Tolerances (as tests/models/test_vit.py argues them)
- fp32: max |ours - transformers| <= 1e-5 x max |transformers| (a few ulps per step, through
  short reductions; a wrong weight, mask, position or pooled token moves the outputs by 1e-2).
- bf16: our error against the fp32 truth at most FACTOR x transformers' own bf16 error plus one
  ulp of the output's scale.
- gradients: within 1e-4 x each parameter's largest gradient plus 1e-6 x the largest of all.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import fastarch.models
from fastarch.models import CheckpointError
from fastarch.models.clip_text import CLIPText

transformers.logging.set_verbosity_error()

FACTOR = 2.0
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
VOCAB = 99
TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=12)

# - projection: CLIPTextModelWithProjection, quick_gelu, today's pooling rule (the first token
#   whose id is eos_token_id; 5 is not the highest id, so the legacy rule would pick another).
# - legacy: CLIPTextModel with eos_token_id 2 (configs before transformers' PR 24773): the
#   highest id is pooled; the erf GELU through bias_gelu; no projection.
# - clip: a whole CLIPModel (vision tower too); its text projection is sized by the top-level
#   projection_dim.
EOS = {"projection": 5, "legacy": VOCAB - 1, "clip": 5}
CONFIGS = {
    "projection": lambda: transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        **TEXT, eos_token_id=5, pad_token_id=1, bos_token_id=4, projection_dim=24)),
    "legacy": lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(
        **TEXT, eos_token_id=2, pad_token_id=1, bos_token_id=4, hidden_act="gelu", layer_norm_eps=1e-6)),
    "clip": lambda: transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(TEXT, eos_token_id=5, pad_token_id=1, bos_token_id=4, projection_dim=7),
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                           image_size=8, patch_size=4),
        projection_dim=12)),
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
    for name, make in CONFIGS.items():
        model = make().eval()
        randomize(model)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = path, model
    return out


def batch(name: str, lengths=(9, 1, 4), length: int = 9, seed: int = 0):
    """(input_ids, attention_mask): texts of ``lengths`` tokens, each ending with its end-of-text
    token, padded on the right with that token as CLIP's tokenizer does. The first text also
    holds the end-of-text token in its middle: the first one is pooled."""
    eos = EOS[name]
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), length), eos)
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, : n - 1] = torch.randint(6, VOCAB - 1, (n - 1,), generator=g)
        ids[row, n - 1] = eos
        mask[row, :n] = 1
    if name != "legacy" and lengths[0] > 4:
        ids[0, 3] = eos
    return ids, mask


def reference_outputs(model, ids, mask) -> dict[str, torch.Tensor]:
    """transformers' outputs under our names; last_hidden_state with zeros at the padding."""
    text = model if isinstance(model, transformers.CLIPTextModel) else model.text_model
    out = text(input_ids=ids, attention_mask=mask)
    got = {"last_hidden_state": out.last_hidden_state * mask[..., None], "pooler_output": out.pooler_output}
    if not isinstance(model, transformers.CLIPTextModel):
        got["text_embeds"] = model.text_projection(out.pooler_output)
    return got


def outputs(ours) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ours._asdict().items() if v is not None}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_padded_batch_matches_transformers(checkpoints, name, device):
    path, reference = checkpoints[name]
    model = fastarch.models.from_pretrained(path, device=device)
    assert isinstance(model, CLIPText) and not model.training
    ids, mask = batch(name)
    with torch.no_grad():
        want = reference_outputs(reference, ids, mask)
        got = outputs(model(ids.to(device), mask.to(device)))
    assert set(got) == set(want)
    for key in want:
        assert got[key].shape == want[key].shape and got[key].dtype == torch.float32
        assert relative_error(got[key].cpu(), want[key]) <= 1e-5, key
    if name == "clip":
        assert got["text_embeds"].shape[-1] == 12  # the CLIPModel's projection_dim, not the text config's


@pytest.mark.parametrize("name", ["projection", "legacy"])
def test_padding_changes_nothing(checkpoints, name):
    """Each text alone (no mask) gives what it gives inside the padded batch."""
    model = fastarch.models.from_pretrained(checkpoints[name][0])
    ids, mask = batch(name)
    with torch.no_grad():
        together = model(ids, mask)
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            alone = model(ids[row : row + 1, :n])
            assert torch.allclose(alone.pooler_output[0], together.pooler_output[row], rtol=1e-5, atol=1e-6)
            assert torch.allclose(alone.last_hidden_state[0], together.last_hidden_state[row, :n], rtol=1e-5, atol=1e-6)


def test_left_padding_matches_transformers(checkpoints):
    """Left padding with a pad id that is not the end-of-text id: positions count from the
    padded row's start and the pooled token is the text's end-of-text, as in transformers."""
    path, reference = checkpoints["projection"]
    model = fastarch.models.from_pretrained(path)
    ids, mask = batch("projection", lengths=(6, 1, 3), length=6)
    lengths = mask.sum(1)
    for row in range(ids.shape[0]):
        n = int(lengths[row])
        ids[row] = torch.cat([torch.ones(6 - n, dtype=ids.dtype), ids[row, :n]])
        mask[row] = torch.cat([torch.zeros(6 - n, dtype=mask.dtype), torch.ones(n, dtype=mask.dtype)])
    with torch.no_grad():
        want = reference_outputs(reference, ids, mask)
        got = outputs(model(ids, mask))
    for key in want:
        assert relative_error(got[key], want[key]) <= 1e-5, key


@pytest.mark.parametrize("name", ["projection", "legacy"])
def test_left_padding_with_end_of_text_pad_pools_the_text(checkpoints, name):
    """Left padding whose pad is the end-of-text id (CLIP's tokenizer's pad): transformers' rule
    would pool a padding position there (the first end-of-text id, or the first highest id);
    we pool each text's own end-of-text token, its last one here."""
    model = fastarch.models.from_pretrained(checkpoints[name][0])
    ids, mask = batch(name, lengths=(6, 1, 3), length=6)
    for row in (1, 2):
        n = int(mask[row].sum())
        ids[row] = torch.cat([torch.full((6 - n,), EOS[name]), ids[row, :n]])
        mask[row] = torch.arange(6) >= 6 - n
    with torch.no_grad():
        out = model(ids, mask)
    for row in (1, 2):
        assert out.pooler_output[row].abs().max() > 0
        assert torch.equal(out.pooler_output[row], out.last_hidden_state[row, -1]), row


def test_row_without_tokens_gives_zeros(checkpoints):
    model = fastarch.models.from_pretrained(checkpoints["projection"][0])
    ids, mask = batch("projection")
    mask[1] = 0
    with torch.no_grad():
        out = model(ids, mask)
        alone = model(ids[2:, :4])
    assert out.last_hidden_state[1].eq(0).all() and out.pooler_output[1].eq(0).all()
    assert torch.allclose(out.text_embeds[2], alone.text_embeds[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["projection", "legacy"])
def test_bf16_error_bounded_by_transformers(checkpoints, name, device):
    path, reference = checkpoints[name]
    model = fastarch.models.from_pretrained(path, dtype=torch.bfloat16, device=device)
    cls = transformers.CLIPTextModel if name == "legacy" else transformers.CLIPTextModelWithProjection
    reference_low = cls.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids, mask = batch(name)
    with torch.no_grad():
        truth = reference_outputs(reference, ids, mask)
        theirs = reference_outputs(reference_low, ids, mask)
        got = outputs(model(ids.to(device), mask.to(device)))
    for key in truth:
        assert got[key].dtype == torch.bfloat16
        ours_err = (got[key].cpu().float() - truth[key]).abs().max().item()
        their_err = (theirs[key].float() - truth[key]).abs().max().item()
        ulp = torch.finfo(torch.bfloat16).eps * truth[key].abs().max().item()
        assert ours_err <= FACTOR * their_err + ulp, (key, ours_err, their_err)


def same_parameters(ours: torch.nn.Module, theirs: torch.nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, our parameter, theirs) for every parameter of ``theirs``, paired by value (every
    value was drawn at random, so equal tensors are the same checkpoint tensor)."""
    pairs, mine = [], list(ours.named_parameters())
    for name, p in theirs.named_parameters():
        found = [q for _, q in mine if q.shape == p.shape and torch.equal(q.detach(), p.detach())]
        assert len(found) == 1, f"{name}: {len(found)} of our parameters hold its values"
        pairs.append((name, found[0], p))
    assert len(pairs) == len(mine)
    return pairs


def assert_gradients_close(names, got, want) -> None:
    overall = max(w.abs().max().item() for w in want)
    for name, g, w in zip(names, got, want):
        err = (g - w).abs().max().item()
        assert err <= 1e-4 * w.abs().max().item() + 1e-6 * overall, (name, err)


def loss_of(text_embeds: torch.Tensor) -> torch.Tensor:
    """A contrastive-style loss: each text against the others, by cosine similarity."""
    e = torch.nn.functional.normalize(text_embeds, dim=-1)
    return torch.nn.functional.cross_entropy(e @ e.T * 10.0, torch.arange(e.shape[0]))


def test_training_step_gradients_match_transformers(checkpoints):
    path, _ = checkpoints["projection"]
    model = fastarch.models.from_pretrained(path).train()
    reference = transformers.CLIPTextModelWithProjection.from_pretrained(path).train()
    ids, mask = batch("projection")
    loss_theirs = loss_of(reference(input_ids=ids, attention_mask=mask).text_embeds)
    loss_theirs.backward()
    loss_ours = loss_of(model(ids, mask).text_embeds)
    loss_ours.backward()
    assert abs(loss_ours.item() - loss_theirs.item()) <= 1e-5 * abs(loss_theirs.item())
    pairs = same_parameters(model, reference)
    assert all(mine.grad is not None for _, mine, _ in pairs)
    assert_gradients_close([n for n, _, _ in pairs], [m.grad for _, m, _ in pairs], [t.grad for _, _, t in pairs])


def test_compile_matches_eager(checkpoints):
    model = fastarch.models.from_pretrained(checkpoints["projection"][0])
    compiled = torch.compile(model, fullgraph=True)  # the packing's nonzero traced as a data-dependent size
    ids, mask = batch("projection")
    with torch.no_grad():
        eager = model(ids, mask)
        got = compiled(ids, mask)
    for key in ("text_embeds", "last_hidden_state"):
        assert relative_error(getattr(got, key), getattr(eager, key)) <= 1e-5, key


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("bad", [VOCAB, -1])
def test_token_outside_vocabulary_refused(checkpoints, bad):
    model = fastarch.models.from_pretrained(checkpoints["projection"][0])
    ids, mask = batch("projection")
    ids[2, 1] = bad
    with pytest.raises(ValueError, match=rf"token id {bad}, outside the vocabulary 0 \.\. {VOCAB - 1}"):
        model(ids, mask)
    ids[2, 7] = bad  # at a padding position: never looked up
    ids[2, 1] = 7
    model(ids, mask)


def test_too_long_sequence_refused(checkpoints):
    model = fastarch.models.from_pretrained(checkpoints["projection"][0])
    with pytest.raises(ValueError, match=r"sequences of 13 tokens, longer than the 12 positions"):
        model(torch.full((2, 13), 7))


@pytest.mark.parametrize(
    "ids, mask, error, match",
    [
        (torch.ones(2, 4), None, TypeError, r"input_ids must be an integer tensor"),
        (torch.ones(4, dtype=torch.long), None, ValueError, r"input_ids must have shape \(batch, length\)"),
        (torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3), ValueError, r"attention_mask must have input_ids' shape"),
    ],
)
def test_bad_arguments_refused(checkpoints, ids, mask, error, match):
    model = fastarch.models.from_pretrained(checkpoints["projection"][0])
    with pytest.raises(error, match=match):
        model(ids, mask)


def _copy(src, dst, config_changes=None, drop=(), add=None):
    """A copy of checkpoint ``src`` in ``dst``, config.json entries changed, tensors dropped or added."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    config.update(config_changes or {})
    (dst / "config.json").write_text(json.dumps(config))
    weights = {k: v for k, v in load_file(src / "model.safetensors").items() if k not in drop}
    weights.update(add or {})
    save_file(weights, dst / "model.safetensors")
    return dst


def test_unsupported_model_type_refused(checkpoints, tmp_path):
    path = _copy(checkpoints["projection"][0], tmp_path / "ckpt", {"model_type": "clip_vision_model"})
    with pytest.raises(CheckpointError, match=r"model_type 'clip_vision_model' is not supported \(supported: .*clip_text_model"):
        fastarch.models.from_pretrained(path)


def test_unsupported_activation_refused(checkpoints, tmp_path):
    path = _copy(checkpoints["projection"][0], tmp_path / "ckpt", {"hidden_act": "relu"})
    with pytest.raises(CheckpointError, match=r"hidden_act 'relu' is not built"):
        fastarch.models.from_pretrained(path)


def test_missing_tensor_refused(checkpoints, tmp_path):
    path = _copy(checkpoints["clip"][0], tmp_path / "ckpt", drop=["text_model.encoder.layers.1.mlp.fc2.bias"])
    with pytest.raises(CheckpointError, match=r"lacks tensors .*blocks\.1\.mlp\.fc2\.bias"):
        fastarch.models.from_pretrained(path)


def test_unknown_tensor_refused(checkpoints, tmp_path):
    """Only the named vision-tower prefixes are skipped; anything else unknown is an error."""
    path = _copy(checkpoints["clip"][0], tmp_path / "ckpt", add={"text_model.encoder.extra.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"no place for the checkpoint's tensors: text_model\.encoder\.extra\.weight"):
        fastarch.models.from_pretrained(path)


def test_vision_tensors_skipped_only_in_a_clip_model(checkpoints, tmp_path):
    """A text-model checkpoint holding vision_model.* is not what its config says: refused."""
    path = _copy(checkpoints["projection"][0], tmp_path / "ckpt", add={"vision_model.post_layernorm.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"vision_model\.post_layernorm\.weight"):
        fastarch.models.from_pretrained(path)


def test_wrong_shape_refused(checkpoints, tmp_path):
    path = _copy(checkpoints["projection"][0], tmp_path / "ckpt", {"intermediate_size": 36})
    with pytest.raises(CheckpointError, match=r"fc1\.(weight|bias) has shape"):
        fastarch.models.from_pretrained(path)
