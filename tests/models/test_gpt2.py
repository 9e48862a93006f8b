"""fastarch.models.gpt2 against transformers' GPT2LMHeadModel / GPTNeoForCausalLM on small random
checkpoints (gpt2_tiny.py): logits on padded mixed-length batches in fp32 and bf16, one
training step's gradients, local attention, loading errors."""

from __future__ import annotations

import copy
import json

import gpt2_tiny
import pytest
import torch
import torch.nn.functional as F

from fastarch.models import CheckpointError, from_pretrained
from fastarch.models.gpt2 import GPT2, _model_name

# fp32: the same math in another order (packed attention, fused norms): a few ulps of logits ~10
FP32_REL = 1e-5
# bf16: our error against the fp32 truth at most this multiple of transformers' bf16 error
BF16_RATIO = 2.0

LENGTHS = [7, 13, 1, 10]  # mixed lengths, one single-token row

# (family, config overrides): the variants a checkpoint can carry
VARIANTS = [
    ("gpt2", {}),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True, activation_function="gelu", tie_word_embeddings=False)),
    ("gpt_neo", {}),  # a local layer with window 5 < the prompts
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with gpt2_tiny.one_thread():
        yield


def _ids(v):
    return f"{v[0]}-{'-'.join(v[1]) or 'default'}"


def _real(mask):
    return mask.bool()


def _rel_err(ours, ref, mask):
    real = _real(mask)
    return ((ours.float() - ref.float())[real].abs().max() / ref.float()[real].abs().max()).item()


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_fp32_padded_batch(tmp_path, variant, side):
    family, overrides = variant
    hf = gpt2_tiny.make(tmp_path, family, **overrides)
    ids, mask = gpt2_tiny.prompts(LENGTHS, side)
    model = from_pretrained(tmp_path)
    assert isinstance(model, GPT2)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=gpt2_tiny.hf_positions(mask)).logits
        out = model(ids, mask)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _rel_err(out, ref, mask) < FP32_REL
    assert (out[~_real(mask)] == 0).all()  # padding is not computed
    # last_only: each row's last real token
    with torch.no_grad():
        last = model(ids, mask, last_only=True)
    idx = torch.tensor([(m.nonzero().max()).item() for m in mask])
    torch.testing.assert_close(last[:, 0], out[torch.arange(len(LENGTHS)), idx], rtol=0, atol=1e-5)


def test_logits_mask_with_a_hole_and_no_mask(tmp_path):
    """Positions count real tokens (transformers' cumsum), wherever the padding is; without a
    mask every token is real."""
    hf = gpt2_tiny.make(tmp_path)
    ids, mask = gpt2_tiny.prompts([9, 9], "left")
    mask[0, 3] = 0
    model = from_pretrained(tmp_path)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=gpt2_tiny.hf_positions(mask)).logits
        assert _rel_err(model(ids, mask), ref, mask) < FP32_REL
        ref = hf(ids).logits
        assert _rel_err(model(ids), ref, torch.ones_like(mask)) < FP32_REL


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo"])
def test_logits_bf16(tmp_path, family):
    """bf16 against the fp32 truth, bounded by transformers' own bf16 error."""
    hf = gpt2_tiny.make(tmp_path, family)
    ids, mask = gpt2_tiny.prompts(LENGTHS, "left")
    pos = gpt2_tiny.hf_positions(mask)
    with torch.no_grad():
        truth = hf(ids, attention_mask=mask, position_ids=pos).logits
        theirs = hf.to(torch.bfloat16)(ids, attention_mask=mask, position_ids=pos).logits
        model = from_pretrained(tmp_path, dtype=torch.bfloat16)
        ours = model(ids, mask)
    assert ours.dtype == torch.bfloat16
    theirs_err, ours_err = _rel_err(theirs, truth, mask), _rel_err(ours, truth, mask)
    assert ours_err <= BF16_RATIO * theirs_err + 4e-3, (ours_err, theirs_err)  # 4e-3: one bf16 ulp at 1


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def test_training_step_gradients(tmp_path):
    """One step of next-token loss on a padded batch: every parameter's gradient as transformers'."""
    hf = gpt2_tiny.make(tmp_path)
    model = from_pretrained(tmp_path).train()
    hf.train()
    ids, mask = gpt2_tiny.prompts(LENGTHS, "right")
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]

    def loss(logits):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)

    loss(hf(ids, attention_mask=mask, position_ids=gpt2_tiny.hf_positions(mask)).logits).backward()
    ours_loss = loss(model(ids, mask))
    ours_loss.backward()
    hf_params = dict(hf.named_parameters())  # the tied lm_head is wte: one entry, as ours
    hf_name = {_model_name(n): n for n in hf_params}
    checked = 0
    for name, p in model.named_parameters():
        ref = hf_params[hf_name[name]].grad
        ref = ref.t() if hf_name[name].split(".", 3)[-1] in _CONV1D else ref
        scale = ref.abs().max().item()
        assert p.grad is not None, name
        assert (p.grad - ref).abs().max().item() <= 1e-4 * scale + 1e-7, name
        checked += 1
    assert checked == len(hf_params)


def test_local_attention_for_model_type_gpt2(tmp_path):
    """fastarch's config keys attention_layers / window_size on a GPT-2 checkpoint: each local
    layer's token sees the window_size most recent tokens, as transformers' GPT-2 given that
    band as its mask."""
    hf = gpt2_tiny.make(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    window = 4
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "attention_layers": ["local", "local"], "window_size": window}))
    model = from_pretrained(tmp_path)
    ids, mask = gpt2_tiny.prompts([15, 15], "left")
    S = ids.shape[1]
    ones = torch.ones(S, S, dtype=torch.bool)
    band = ones.tril() & ~ones.tril(-window)
    additive = torch.zeros(S, S).masked_fill(~band, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ref = hf(ids, attention_mask=additive.expand(2, 1, S, S)).logits
        full = hf(ids).logits
        out = model(ids, mask)
    assert _rel_err(out, ref, mask) < FP32_REL
    assert _rel_err(out, full, mask) > 1e-2  # the window changed something


def test_too_long_input(tmp_path):
    gpt2_tiny.make(tmp_path)
    model = from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(1, gpt2_tiny.POSITIONS + 1, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(1, 4))


def test_wrong_shape_checkpoint(tmp_path):
    """config.json that does not fit the weights: the error names the tensor."""
    gpt2_tiny.make(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_inner": 96}))
    with pytest.raises(CheckpointError, match=r"h\.0\.mlp\.c_fc\.weight has shape \(64, 80\).*\(64, 96\)"):
        from_pretrained(tmp_path)


def test_missing_tensor_and_bad_config(tmp_path):
    from safetensors.torch import load_file, save_file

    gpt2_tiny.make(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "activation_function": "swish"}))
    with pytest.raises(CheckpointError, match="activation_function"):
        from_pretrained(tmp_path)
    # sizes that are not ints >= 1 (a ZeroDivisionError, a negative dimension, a TypeError deep in
    # torch before), and a config that is not a JSON object
    for field, bad in (("n_head", 0), ("n_positions", -1), ("n_embd", "64"), ("n_positions", 64.0)):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, field: bad}))
        with pytest.raises(CheckpointError, match=rf"{field} must be an int >= 1, got {bad!r}"):
            from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([cfg]))
    with pytest.raises(CheckpointError, match="must hold a JSON object of settings, got a list"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    del weights["transformer.h.1.ln_2.bias"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"h\.1\.ln_2\.bias"):
        from_pretrained(tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["gpt2", "gpt_neo"])
def test_cuda_matches_transformers(tmp_path, family):
    """On CUDA, fp32 and bf16: logits of a padded batch (and for GPT-2 one training step's
    gradients) within BF16_RATIO x transformers' own error on CUDA in that dtype against the
    truth on the CPU (fp64 logits, fp32 gradients), plus two ulps of the truth's scale."""
    hf = gpt2_tiny.make(tmp_path, family)
    ids, mask = gpt2_tiny.prompts(LENGTHS, "right")
    pos = gpt2_tiny.hf_positions(mask)
    real = _real(mask)
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]

    def loss(logits):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten().to(logits.device))

    with torch.no_grad():
        truth = copy.deepcopy(hf).double()(ids, attention_mask=mask, position_ids=pos).logits[real]
    train = family == "gpt2"
    if train:
        ref = copy.deepcopy(hf).train()
        loss(ref(ids, attention_mask=mask, position_ids=pos).logits).backward()
        true_grads = dict(ref.named_parameters())

    def check(what, ours, theirs, true, dtype, floor_rel=0.0):
        ours, theirs, true = ours.double().cpu(), theirs.double().cpu(), true.double()
        floor = max(2 * torch.finfo(dtype).eps, floor_rel) * true.abs().max().item()
        err, their_err = (ours - true).abs().max().item(), (theirs - true).abs().max().item()
        assert err <= BF16_RATIO * their_err + floor, f"{what} ({dtype}): error {err:.3g}, transformers' {their_err:.3g}"

    cuda = [t.cuda() for t in (ids, mask, pos)]
    for dtype in (torch.float32, torch.bfloat16):
        theirs = copy.deepcopy(hf).to("cuda", dtype).train(train)
        their_logits = theirs(cuda[0], attention_mask=cuda[1], position_ids=cuda[2]).logits
        model = from_pretrained(tmp_path, dtype=dtype, device="cuda").train(train)
        logits = model(cuda[0], cuda[1])
        check("logits", logits[real.cuda()], their_logits[real.cuda()], truth, dtype)
        if not train:
            continue
        loss(their_logits).backward()
        loss(logits).backward()
        their_grads = dict(theirs.named_parameters())
        hf_name = {_model_name(n): n for n in their_grads}
        for name, p in model.named_parameters():
            n = hf_name[name]
            conv = n.split(".", 3)[-1] in _CONV1D
            grad = (lambda g: g.t() if conv else g)
            check(f"gradient of {name}", p.grad, grad(their_grads[n].grad), grad(true_grads[n].grad), dtype, 1e-4)


def test_tied_config_with_a_stored_head_loads_as_transformers(tmp_path):
    """tie_word_embeddings set, but the file holds an lm_head.weight unlike wte: transformers
    keeps the stored head, untied (checked here), and so do we (we had tied it to wte)."""
    import transformers

    hf0 = gpt2_tiny.make(tmp_path, tie_word_embeddings=False)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(hf.lm_head.weight, hf0.lm_head.weight)
    with pytest.warns(UserWarning, match="the stored head is used, untied"):
        model = from_pretrained(tmp_path)
    assert model.lm_head.weight is not model.wte.weight
    ids, mask = gpt2_tiny.prompts(LENGTHS, "right")
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=gpt2_tiny.hf_positions(mask)).logits
        assert _rel_err(model(ids, mask), ref, mask) < FP32_REL
