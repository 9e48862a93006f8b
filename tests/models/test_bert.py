"""BERT, RoBERTa and DistilBERT against transformers, on small random checkpoints written with
save_pretrained and loaded by fastarch.models.from_pretrained.

Batches are right-padded with mixed lengths: a full row, a length-1 row, a fully padded row
(no real token: ours gives zeros there; transformers' values there mean nothing, so that row
and every padding position are left out of the comparison), and others.

Tolerances:
- fp32: |ours - transformers| <= 1e-5 x max |transformers| (per output). Both compute in fp32;
  ours sums in other orders (packed attention kernels, fused add + LayerNorm, the fused QKV
  matmul), a few ulps per op after two layers: measured ~1e-7 relative, so 1e-5 leaves room
  for other BLAS builds while a wrongly masked key or a wrong position (errors of order 1)
  fails by far.
- bf16 / fp16: the truth is transformers in fp64; ours must stay within FACTOR x transformers'
  own error in the dtype (same weights, rounded) plus a floor of two roundings at the
  output's scale, as the attention tests judge kernels.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastarch
from fastarch.models import from_pretrained
from hf_tiny import batch, make  # tests/models/hf_tiny.py

FAMILIES = ["bert", "roberta", "distilbert"]
LENGTHS = [13, 1, 7, 0, 10]  # a full row, one token, a fully padded row
SEQLEN = 13
FACTOR = 3.0
REL32 = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> {head: (directory, transformers model)}; heads "mlm" (*ForMaskedLM) and
    "base" (*Model, with BERT's / RoBERTa's pooler)."""
    out = {}
    for i, family in enumerate(FAMILIES):
        out[family] = {}
        for head in ("mlm", "base"):
            path = tmp_path_factory.mktemp(f"{family}-{head}")
            out[family][head] = (path, make(family, path, head=head, seed=i))
    return out


def hf_inputs(family, ids, mask, types):
    kw = dict(input_ids=ids, attention_mask=mask)
    if family != "distilbert":
        kw["token_type_ids"] = types
    return kw


def our_inputs(family, ids, mask, types):
    return (ids, mask) if family == "distilbert" else (ids, mask, types)


def assert_close_rel(ours, theirs, rel, what):
    scale = theirs.abs().max().item()
    err = (ours.double() - theirs.double()).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} x {scale:.3g}"


def assert_fp32_close(ours, theirs, exact, what):
    """fp32 against transformers' fp64 run: our error at most FACTOR x transformers' fp32 error
    plus 4 fp32 ulps at the output's scale (our products and sums round in other orders, e.g.
    oneDNN's matmul; a wrong mask or layout lands at 100x)."""
    exact = exact.double()
    ours_err = (ours.double() - exact).abs().max().item()
    theirs_err = (theirs.double() - exact).abs().max().item()
    floor = 4 * torch.finfo(torch.float32).eps * max(exact.abs().max().item(), 1.0)
    assert ours_err <= FACTOR * theirs_err + floor, f"{what}: error {ours_err:.3g} > {FACTOR} x {theirs_err:.3g} + {floor:.3g}"


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_matches_transformers(checkpoints, family, padding):
    ids, mask, types = batch(family, LENGTHS, SEQLEN)
    if padding == "left":
        ids, mask, types = ids.flip(1), mask.flip(1), types.flip(1)
    real = mask.bool()
    for head in ("mlm", "base"):
        path, hf = checkpoints[family][head]
        model = from_pretrained(path)
        with torch.no_grad():
            ref = hf(**hf_inputs(family, ids, mask, types), output_hidden_states=True)
            exact = copy.deepcopy(hf).double()(**hf_inputs(family, ids, mask, types), output_hidden_states=True)
            out = model(*our_inputs(family, ids, mask, types))
        assert out.last_hidden_state.shape == (len(LENGTHS), SEQLEN, 64)
        assert_fp32_close(out.last_hidden_state[real], ref.hidden_states[-1][real], exact.hidden_states[-1][real],
                          f"{head} last_hidden_state")
        assert (out.last_hidden_state[~real] == 0).all()
        if head == "mlm":
            assert model.pooler is None
            with torch.no_grad():
                logits = model.masked_lm(*our_inputs(family, ids, mask, types)).logits
            assert_fp32_close(logits[real], ref.logits[real], exact.logits[real], "masked-LM logits")
        elif family == "distilbert":
            assert out.pooler_output is None
        elif padding == "right":  # the pooler reads position 0: a real token only with right padding
            has_token = real[:, 0]
            assert_fp32_close(out.pooler_output[has_token], ref.pooler_output[has_token],
                              exact.pooler_output[has_token], "pooler_output")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", FAMILIES)
def test_low_precision_error_is_a_multiple_of_transformers(checkpoints, family, dtype):
    path, hf = checkpoints[family]["mlm"]
    ids, mask, types = batch(family, LENGTHS, SEQLEN, seed=1)
    real = mask.bool()
    kw = hf_inputs(family, ids, mask, types)
    with torch.no_grad():
        # copies: casting the shared fixture model back and forth would round its weights
        truth = copy.deepcopy(hf).double()(**kw, output_hidden_states=True)
        theirs = copy.deepcopy(hf).to(dtype)(**kw, output_hidden_states=True)
        model = from_pretrained(path, dtype=dtype)
        hidden = model(*our_inputs(family, ids, mask, types)).last_hidden_state
        logits = model.masked_lm(*our_inputs(family, ids, mask, types)).logits
    assert hidden.dtype == dtype and logits.dtype == dtype
    for what, ours, their, true in [
        ("last_hidden_state", hidden, theirs.hidden_states[-1], truth.hidden_states[-1]),
        ("logits", logits, theirs.logits, truth.logits),
    ]:
        ours, their, true = ours[real].double(), their[real].double(), true[real]
        floor = 2 * torch.finfo(dtype).eps * true.abs().max().item()
        err, their_err = (ours - true).abs().max().item(), (their - true).abs().max().item()
        assert err <= FACTOR * their_err + floor, f"{what}: error {err:.3g}, transformers' {their_err:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_lm_training_step_gradients_match_transformers(checkpoints, family):
    """One masked-LM step in train mode (dropout 0): the loss and every parameter's gradient.
    transformers' gradients, saved as a checkpoint of the same config and loaded into our
    model by the same name map that the forward tests check, land on our parameters."""
    path, hf = checkpoints[family]["mlm"]
    ids, mask, types = batch(family, LENGTHS, SEQLEN, seed=2)
    g = torch.Generator().manual_seed(3)
    labels = torch.where((torch.rand(ids.shape, generator=g) < 0.4) & mask.bool(), ids, -100)
    hf = copy.deepcopy(hf).train()  # the fixture's model stays as it is
    ref = hf(**hf_inputs(family, ids, mask, types), labels=labels)
    ref.loss.backward()
    model = from_pretrained(path).train()
    out = model.masked_lm(*our_inputs(family, ids, mask, types), labels=labels)
    out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) <= REL32 * ref.loss.item()

    theirs = hf_grads(hf, path)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        # gradients sum over the batch's tokens: 1e-4 of the largest entry
        assert_close_rel(p.grad, theirs[name], 1e-4, f"gradient of {name}")


@pytest.mark.parametrize("family", ["roberta"])  # one family: compiling takes seconds; RoBERTa has every part
def test_compiled_forward_equals_eager(checkpoints, family):
    path, _ = checkpoints[family]["base"]
    model = from_pretrained(path)
    ids, mask, types = batch(family, LENGTHS, SEQLEN)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager = model(*our_inputs(family, ids, mask, types))
        got = compiled(*our_inputs(family, ids, mask, types))
    assert_close_rel(got.last_hidden_state, eager.last_hidden_state, REL32, "compiled last_hidden_state")
    if eager.pooler_output is not None:
        assert_close_rel(got.pooler_output, eager.pooler_output, REL32, "compiled pooler_output")


def test_dropout_in_train_mode(checkpoints, tmp_path):
    """With the config's dropout, train mode draws masks (two steps differ) and still gives
    finite gradients; eval mode is deterministic."""
    make("bert", tmp_path, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    model = from_pretrained(tmp_path)
    ids, mask, types = batch("bert", LENGTHS, SEQLEN)
    with torch.no_grad():
        assert torch.equal(model(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state)
    model.train()
    a, b = model(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state
    assert not torch.equal(a, b)
    a.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("family", FAMILIES)
def test_longest_sequence_the_position_table_holds(checkpoints, family):
    """max_position_embeddings 40: 40 tokens for BERT / DistilBERT, 38 for RoBERTa (its
    positions start at padding_idx + 1 = 2); one more is an error that says so."""
    path, hf = checkpoints[family]["base"]
    model = from_pretrained(path)
    longest = 38 if family == "roberta" else 40
    ids, mask, types = batch(family, [longest, 5], longest)
    real = mask.bool()
    with torch.no_grad():
        ref = hf(**hf_inputs(family, ids, mask, types)).last_hidden_state
        out = model(*our_inputs(family, ids, mask, types)).last_hidden_state
    assert_close_rel(out[real], ref[real], REL32, "last_hidden_state")
    ids, mask, types = batch(family, [longest + 1], longest + 1)
    with pytest.raises(ValueError, match=rf"{longest + 1} tokens.*position table holds {longest}.*trunc"):
        model(*our_inputs(family, ids, mask, types))


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_inputs_are_clear_errors(checkpoints, family):
    path, _ = checkpoints[family]["mlm"]
    model = from_pretrained(path)
    ids, mask, types = batch(family, [4, 2], 4)
    for bad_id in (101, -1):
        bad = ids.clone()
        bad[1, 1] = bad_id
        with pytest.raises(ValueError, match=rf"input_ids holds {bad_id}, outside \[0, 101\)"):
            model(bad, mask)
    with pytest.raises(TypeError, match="input_ids must be int64 or int32"):
        model(ids.float(), mask)
    with pytest.raises(ValueError, match=r"input_ids must be a \(batch, seqlen\) tensor"):
        model(ids[0], mask[0])
    with pytest.raises(ValueError, match="attention_mask must be a tensor of input_ids' shape"):
        model(ids, mask[:, :3])
    with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
        model(ids, mask.float())
    with pytest.raises(ValueError, match="labels must be a tensor of input_ids' shape"):
        model.masked_lm(ids, mask, labels=ids[:, :2])
    if family == "bert":
        with pytest.raises(ValueError, match=r"token_type_ids holds 2, outside \[0, 2\)"):
            model(ids, mask, torch.full_like(types, 2))
    base = from_pretrained(checkpoints[family]["base"][0])
    with pytest.raises(RuntimeError, match="no masked-LM head"):
        base.masked_lm(ids, mask)


def test_int32_ids_and_bool_mask(checkpoints):
    path, hf = checkpoints["bert"]["base"]
    model = from_pretrained(path)
    ids, mask, types = batch("bert", LENGTHS, SEQLEN)
    with torch.no_grad():
        a = model(ids, mask, types).last_hidden_state
        b = model(ids.int(), mask.bool(), types.int()).last_hidden_state
    assert torch.equal(a, b)


def test_hot_path_runs_on_fastarch_ops(checkpoints, monkeypatch):
    """Every attention call is packed (varlen, no padding), every post-LN residual goes through
    add_layer_norm, the MLP activation through bias_gelu: count the calls of one forward."""
    path, _ = checkpoints["bert"]["mlm"]
    model = from_pretrained(path)
    calls = {"attention": [], "add_layer_norm": 0, "bias_gelu": 0, "layer_norm": 0}
    real = {name: getattr(fastarch.ops, name) for name in calls}

    def attention(q, k, v, **kw):
        calls["attention"].append((q.shape, kw.get("cu_seqlens_q")))
        return real["attention"](q, k, v, **kw)

    def counting(name):
        def f(*args, **kw):
            calls[name] += 1
            return real[name](*args, **kw)
        return f

    monkeypatch.setattr(fastarch.ops, "attention", attention)
    for name in ("add_layer_norm", "bias_gelu", "layer_norm"):
        monkeypatch.setattr(fastarch.ops, name, counting(name))
    ids, mask, types = batch("bert", LENGTHS, SEQLEN)
    with torch.no_grad():
        model.masked_lm(ids, mask, types)
    total = sum(LENGTHS)
    assert [(tuple(s), cu.tolist()) for s, cu in calls["attention"]] == [((total, 4, 16), [0, 13, 14, 21, 21, 31])] * 2
    assert calls["add_layer_norm"] == 4 and calls["bias_gelu"] == 3 and calls["layer_norm"] == 2


def copy_checkpoint(src, dst, edit_weights=None, edit_config=None):
    """dst: src's config.json and model.safetensors, each edited if asked."""
    import json

    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
    weights = load_file(str(src / "model.safetensors"))
    save_file(edit_weights(weights) if edit_weights else weights, str(dst / "model.safetensors"))
    return dst


def test_bad_checkpoints_are_clear_errors(checkpoints, tmp_path):
    from fastarch.models import CheckpointError

    src, _ = checkpoints["bert"]["mlm"]
    layer = "bert.encoder.layer.1"
    cases = {
        "no-weights": (None, None, "no weights"),
        "truncated": (None, None, "not a readable safetensors file"),
        "xlnet": (None, lambda c: {**c, "model_type": "xlnet"},
                  r"model_type 'xlnet' is not supported \(supported: .*bert, .*distilbert, .*roberta"),
        "relu": (None, lambda c: {**c, "hidden_act": "relu"}, "activation 'relu' is not supported"),
        "relative": (None, lambda c: {**c, "position_embedding_type": "relative_key"},
                     "position_embedding_type 'relative_key' is not supported"),
        "wrong-shape": (lambda w: {**w, f"{layer}.intermediate.dense.weight": torch.zeros(95, 64)}, None,
                        rf"tensor {layer}.intermediate.dense.weight has shape \(95, 64\).*needs \(96, 64\)"),
        "config-misfit": (None, lambda c: {**c, "intermediate_size": 97},
                          r"intermediate\.dense\.(weight|bias) has shape \(96(, 64)?,?\).*needs \(97"),
        "unexpected": (lambda w: {**w, f"{layer}.extra.weight": torch.zeros(3)}, None,
                       rf"does not know: {layer}.extra.weight"),
        "missing": (lambda w: {k: v for k, v in w.items() if k != f"{layer}.output.dense.bias"}, None,
                    r"lacks tensors Bert needs: layers.1.down.bias"),
        "missing-key": (lambda w: {k: v for k, v in w.items() if k != f"{layer}.attention.self.key.weight"}, None,
                        rf"holds {layer}.attention.self.query.weight but lacks {layer}.attention.self.key.weight"),
        "vocab-misfit": (None, lambda c: {**c, "vocab_size": 100}, r"word_embeddings.weight has shape \(101, 64\)"),
    }
    for name, (edit_weights, edit_config, message) in cases.items():
        (tmp_path / name).mkdir()
        path = copy_checkpoint(src, tmp_path / name, edit_weights, edit_config)
        if name == "no-weights":
            (path / "model.safetensors").unlink()
        if name == "truncated":
            data = (path / "model.safetensors").read_bytes()
            (path / "model.safetensors").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=message):
            from_pretrained(path)


def test_random_models_for_benchmarks():
    """Bert.random and friends: no checkpoint, transformers' initialization, bert-base by
    default, any dtype."""
    from fastarch.models.bert import Bert, BertConfig, Roberta
    from fastarch.models.distilbert import DistilBert

    base = BertConfig.from_dict({"model_type": "bert"})
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads, base.intermediate_size) == (768, 12, 12, 3072)
    ids = torch.randint(3, 101, (3, 9))
    for cls in (Bert, Roberta, DistilBert):
        small = {"vocab_size": 101, "max_position_embeddings": 16}
        small.update({"dim": 32, "n_heads": 2, "n_layers": 1, "hidden_dim": 48} if cls is DistilBert else
                     {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 48})
        model = cls.random(small, dtype=torch.bfloat16)
        assert not model.training and model.word_embeddings.weight.dtype == torch.bfloat16
        assert 0.015 < model.word_embeddings.weight[3:].float().std() < 0.025
        with torch.no_grad():
            out = model(ids).last_hidden_state
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert torch.equal(cls.random(small).word_embeddings.weight, cls.random(small).word_embeddings.weight)


VARIANTS = [
    ("bert", dict(tie_word_embeddings=False)),
    ("roberta", dict(tie_word_embeddings=False)),
    ("distilbert", dict(tie_word_embeddings=False)),
    ("bert", dict(hidden_act="gelu_new")),
    ("roberta", dict(hidden_act="gelu_pytorch_tanh")),  # its MLM head still applies the erf GELU
    ("distilbert", dict(activation="gelu_pytorch_tanh", sinusoidal_pos_embds=True)),
]


@pytest.mark.parametrize("family, config", VARIANTS, ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_config_variants_match_transformers(tmp_path, family, config):
    """An untied masked-LM decoder (with its own bias, as transformers >= 5 writes it), tanh
    GELUs, DistilBERT's fixed sinusoidal positions: fp32 masked-LM logits as transformers'."""
    hf = make(family, tmp_path, **config)
    ids, mask, types = batch(family, [9, 1, 5], 9)
    real = mask.bool()
    model = from_pretrained(tmp_path)
    with torch.no_grad():
        ref = hf(**hf_inputs(family, ids, mask, types)).logits
        logits = model.masked_lm(*our_inputs(family, ids, mask, types)).logits
    assert_close_rel(logits[real], ref[real], REL32, "masked-LM logits")
    if config.get("sinusoidal_pos_embds"):
        assert not model.position_embeddings.weight.requires_grad


def test_untied_checkpoint_with_one_output_bias(tmp_path):
    """An untied BERT written while the decoder's bias was the head's bias (transformers < 5:
    one tensor, saved once as cls.predictions.bias): that bias is the one added."""
    from safetensors.torch import load_file, save_file

    hf = make("bert", tmp_path, tie_word_embeddings=False)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["cls.predictions.decoder.bias"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        hf.cls.predictions.decoder.bias.copy_(hf.cls.predictions.bias)
    ids, mask, types = batch("bert", [9, 4], 9)
    real = mask.bool()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        logits = from_pretrained(tmp_path).masked_lm(ids, mask, types).logits
    assert_close_rel(logits[real], ref[real], REL32, "masked-LM logits")


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_matches_transformers(checkpoints, family):
    check_device_against_transformers(checkpoints, family, "cuda")


def check_device_against_transformers(checkpoints, family, device):
    """On ``device``, fp32 and bf16: masked-LM logits and one training step's gradients. The
    truth is transformers on the CPU (fp64 logits, fp32 gradients); ours on the device must be
    within FACTOR x transformers' own error on the device in that dtype, plus a floor at the
    truth's scale: two roundings, and for fp32 gradients (sums over the batch's tokens, in
    other orders) 1e-4 as in the CPU training-step test."""
    path, hf = checkpoints[family]["mlm"]
    ids, mask, types = batch(family, LENGTHS, SEQLEN, seed=4)
    real = mask.bool()
    labels = torch.where(real, ids, -100)
    kw = hf_inputs(family, ids, mask, types)
    with torch.no_grad():
        true_logits = copy.deepcopy(hf).double()(**kw).logits[real]
    ref = copy.deepcopy(hf).train()
    ref(**kw, labels=labels).loss.backward()
    true_grads = hf_grads(ref, path)

    def check(what, ours, theirs, true, dtype, floor_rel=0.0):
        ours, theirs, true = ours.double().cpu(), theirs.double().cpu(), true.double()
        floor = max(2 * torch.finfo(dtype).eps, floor_rel) * true.abs().max().item()
        err, their_err = (ours - true).abs().max().item(), (theirs - true).abs().max().item()
        assert err <= FACTOR * their_err + floor, f"{what} ({dtype}): error {err:.3g}, transformers' {their_err:.3g}"

    moved = lambda ts: [t.to(device) for t in ts]  # noqa: E731
    for dtype in (torch.float32, torch.bfloat16):
        theirs = copy.deepcopy(hf).to(device, dtype).train()
        their_out = theirs(**{k: v.to(device) for k, v in kw.items()}, labels=labels.to(device))
        their_out.loss.backward()
        model = from_pretrained(path, dtype=dtype, device=device).train()
        out = model.masked_lm(*moved(our_inputs(family, ids, mask, types)), labels=labels.to(device))
        out.loss.backward()
        check("logits", out.logits[real.to(device)], their_out.logits[real.to(device)], true_logits, dtype)
        their_grads = hf_grads(theirs, path)
        for name, p in model.named_parameters():
            check(f"gradient of {name}", p.grad, their_grads[name], true_grads[name], dtype, 1e-4)


def hf_grads(hf, path):
    """{our parameter name: transformers' gradient of it}, fp32 on the CPU: the gradients
    saved as a checkpoint of path's config and loaded through the same name map that the
    forward tests check."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text((path / "config.json").read_text())
        save_file({n: p.grad.float().cpu().contiguous() for n, p in hf.named_parameters()}, str(Path(tmp) / "model.safetensors"))
        return {n: p.detach() for n, p in from_pretrained(tmp).named_parameters()}
