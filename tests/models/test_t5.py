"""fastarch.models.t5 against transformers' T5ForConditionalGeneration on small random
checkpoints (t5_tiny.py; relu and gated-gelu feed-forwards, tied and untied heads): logits of
padded mixed-length encoder batches in fp32 and bf16, one training step's gradients, greedy
generation token for token, bad input."""

from __future__ import annotations

import copy
import types

import pytest
import t5_tiny
import torch

from fastarch import registry
from fastarch.models import from_pretrained
from fastarch.models.generate import generate
from fastarch.models.t5 import T5, _model_name

# fp32: both transformers and we are compared with the fp64 truth. T5 is badly conditioned
# (unscaled attention scores, an output scaled only at the end, five stacked blocks): with
# these weights transformers' own fp32 logits are off the truth by ~5e-6..2e-5 relative,
# so a fixed bound would measure the conditioning, not us. Ours: at most FP32_RATIO x theirs
# plus FP32_FLOOR (a few fp32 ulps at the logits' scale); directly, ours vs theirs < FP32_DIRECT.
FP32_RATIO, FP32_FLOOR, FP32_DIRECT = 2.0, 2e-6, 5e-5
# gradients: see test_training_step_gradients
GRAD_RATIO = 4.0
# bf16: our error against the fp64 truth at most this multiple of transformers' bf16 error
BF16_RATIO = 2.0

LENGTHS = [9, 30, 1, 17]  # mixed encoder lengths (one single-token row), distances past max_distance 20

VARIANTS = [("relu", True), ("relu", False), ("gated-gelu", True), ("gated-gelu", False)]


def _ids(v):
    return f"{v[0]}-{'tied' if v[1] else 'untied'}"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rel(ours, ref):
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _truth(hf):
    """An fp64 copy of a transformers T5: the truth. T5LayerNorm computes its variance in fp32
    whatever the input's dtype; the copy's norms compute it in fp64 (else the "truth" is off
    by ~1e-6 relative in logits, 1e-5 in gradients)."""
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    def norm64(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    model = copy.deepcopy(hf).double()
    for module in model.modules():
        if isinstance(module, T5LayerNorm):
            module.forward = types.MethodType(norm64, module)
    return model


def _decoder_ids(batch: int, length: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, t5_tiny.VOCAB, (batch, length), generator=g)
    ids[:, 0] = 0  # decoder_start_token_id
    return ids


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_logits_fp32_padded_batch(tmp_path, variant):
    ff, tied = variant
    hf = t5_tiny.make(tmp_path, ff=ff, tied=tied)
    ids, mask = t5_tiny.batch(LENGTHS)
    dec = _decoder_ids(len(LENGTHS), 25)
    model = from_pretrained(tmp_path)
    assert isinstance(model, T5) and (model.lm_head is None) == tied
    with torch.no_grad():
        truth = _truth(hf)(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        ours = model(ids, mask, dec)
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    ours_err, theirs_err = _rel(ours, truth), _rel(theirs, truth)
    assert ours_err <= FP32_RATIO * theirs_err + FP32_FLOOR, (ours_err, theirs_err)
    assert _rel(ours, theirs) < FP32_DIRECT
    with torch.no_grad(), registry.backend("reference"):  # fp64 on the reference kernels: the math, exactly
        assert _rel(from_pretrained(tmp_path, dtype=torch.float64)(ids, mask, dec), truth) < 1e-12
    # the padding ids are never read: other ids there change nothing
    other = ids.masked_fill(mask == 0, 5)
    with torch.no_grad():
        assert torch.equal(model(other, mask, dec), ours)


@pytest.mark.parametrize("variant", [("relu", True), ("gated-gelu", False)], ids=_ids)
def test_logits_bf16(tmp_path, variant):
    """bf16 against the fp64 truth, bounded by transformers' own bf16 error (transformers
    keeps the feed-forward's wo in fp32 when loading bf16: _keep_in_fp32_modules). Smaller
    weights than the fp32 tests': with those, bf16 flips near-tied attention maxima and
    transformers' own bf16 logits are off by 30-40% (a bound of a multiple of that would
    test nothing); here both are off by ~1.5%."""
    ff, tied = variant
    hf = t5_tiny.make(tmp_path, ff=ff, tied=tied, scale=0.1, bias_scale=1.0)
    ids, mask = t5_tiny.batch(LENGTHS)
    dec = _decoder_ids(len(LENGTHS), 25)
    import transformers

    hf16 = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        truth = _truth(hf)(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        theirs = hf16(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        model = from_pretrained(tmp_path, dtype=torch.bfloat16)
        ours = model(ids, mask, dec)
    assert ours.dtype == torch.bfloat16
    theirs_err, ours_err = _rel(theirs, truth), _rel(ours, truth)
    assert theirs_err < 0.05
    assert ours_err <= BF16_RATIO * theirs_err + 4e-3, (ours_err, theirs_err)  # 4e-3: one bf16 ulp at 1


@pytest.mark.parametrize("variant", [("relu", True), ("gated-gelu", False)], ids=_ids)
def test_greedy_generate_matches_transformers(tmp_path, variant):
    """32 greedy tokens, token for token as transformers' generate (decoder_start first), for a
    padded batch and for each prompt alone, and with an eos token that stops rows early.
    As many decoder as encoder layers: transformers' generate sizes its cache by num_layers."""
    ff, tied = variant
    hf = t5_tiny.make(tmp_path, ff=ff, tied=tied, num_decoder_layers=2)
    ids, mask = t5_tiny.batch(LENGTHS)
    model = from_pretrained(tmp_path)
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    ours = model.generate(ids, mask, max_new_tokens=32)
    assert ours.shape == (len(LENGTHS), 33) and torch.equal(ours, theirs)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=32), theirs)  # the shared entry point
    for b, n in enumerate(LENGTHS):
        with torch.no_grad():
            theirs = hf.generate(input_ids=ids[b:b + 1, :n], max_new_tokens=32, do_sample=False)
        ours = model.generate(ids[b, :n], max_new_tokens=32)
        assert torch.equal(ours, theirs), b
    ours = model.generate(ids, mask, max_new_tokens=32)
    # an eos token the rows reach at different steps (the config's, 1, never comes): each row
    # stops there, is padded with pad_token_id after it, and the batch ends when all stopped
    eos = int(ours[0, 4]) if variant[0] == "relu" else int(ours[1, 4])
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=eos)
    ours = model.generate(ids, mask, max_new_tokens=32, eos_token_id=eos)
    assert (ours == eos).any() and torch.equal(ours, theirs)
    with torch.no_grad():  # min_new_tokens: no eos before 6 new tokens
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=eos,
                             min_new_tokens=6)
    ours = model.generate(ids, mask, max_new_tokens=32, eos_token_id=eos, min_new_tokens=6)
    assert (ours[:, 1:7] != eos).all() and torch.equal(ours, theirs)


@pytest.mark.parametrize("variant", [("relu", True), ("gated-gelu", False)], ids=_ids)
def test_training_step_gradients(tmp_path, variant):
    """One step of the labels' loss (shifted right into the decoder, -100 ignored) on a padded
    batch: the loss and every parameter's gradient as transformers' (the relative position
    biases' included, which fastarch.ops.attention's backward does not give). Both are
    compared with fp64 gradients, as the logits: transformers' fp32 gradients are off that truth
    by up to ~1e-4 relative (per parameter, max over its entries, by its largest entry). Ours
    are held to GRAD_RATIO x the largest of those errors: our attention backward is
    FlashAttention's (P recomputed from the log-sum-exp, rowsum(dO * O) for the softmax
    term), which in a peaked softmax cancels differently from eager's, so for a few
    parameters (the decoder's first self-attention) ours is 3-5x transformers' error on that
    parameter, up to ~2.5x the largest. In fp64 on the reference kernels the gradients are
    the truth's to 1e-10: any difference in fp32 is rounding, not math."""
    ff, tied = variant
    hf = t5_tiny.make(tmp_path, ff=ff, tied=tied).train()
    hf64 = _truth(hf)
    model = from_pretrained(tmp_path).train()
    ids, mask = t5_tiny.batch(LENGTHS)
    labels = _decoder_ids(len(LENGTHS), 12, seed=2)
    labels[1, 9:] = -100
    labels[3, 5:] = -100
    theirs = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    theirs.backward()
    hf64(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    truth_params = dict(hf64.named_parameters())
    ours, logits = model(ids, mask, labels=labels)
    ours.backward()
    assert logits.shape == (len(LENGTHS), 12, t5_tiny.VOCAB)
    assert abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item())
    hf_params = dict(hf.named_parameters())  # tied copies of shared are one entry, as ours
    ours_to_hf = {}
    for name in hf_params:
        target = "shared.weight" if name.endswith("embed_tokens.weight") else _model_name(name)
        if target is not None:
            ours_to_hf[target] = name
    errors = {}
    for name, p in model.named_parameters():
        ref, truth = hf_params[ours_to_hf[name]].grad, truth_params[ours_to_hf[name]].grad
        assert p.grad is not None, name
        assert truth.abs().max() > 0, name
        errors[name] = _rel(p.grad, truth), _rel(ref, truth)
    assert len(errors) == len(hf_params)
    level = max(theirs for _, theirs in errors.values())
    assert level < 1e-3
    worst = max(errors, key=lambda n: errors[n][0])
    assert errors[worst][0] <= GRAD_RATIO * level, (worst, errors[worst], level)
    # the same step in fp64 on the reference kernels: the math itself, exactly
    model64 = from_pretrained(tmp_path, dtype=torch.float64).train()
    with registry.backend("reference"):
        loss64, _ = model64(ids, mask, labels=labels)
        loss64.backward()
    for name, p in model64.named_parameters():
        assert _rel(p.grad, truth_params[ours_to_hf[name]].grad) < 1e-10, name


def test_bad_input(tmp_path):
    """Wrong shapes, dtypes and ids out of the vocabulary: errors naming the tensor."""
    t5_tiny.make(tmp_path)
    model = from_pretrained(tmp_path)
    ids, mask = t5_tiny.batch([5, 3])
    dec = _decoder_ids(2, 4)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seqlen\)"):
        model(ids[0], None, dec)
    with pytest.raises(TypeError, match="input_ids must hold integer token ids"):
        model(ids.float(), mask, dec)
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids, \(2, 5\), got \(2, 3\)"):
        model(ids, mask[:, :3], dec)
    with pytest.raises(ValueError, match=r"decoder_input_ids must be \(batch, seqlen\)"):
        model(ids, mask, dec[0])
    with pytest.raises(ValueError, match="decoder_input_ids must lie in"):
        model(ids, mask, dec + t5_tiny.VOCAB)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 97\), got ids from -1"):
        model(ids.masked_fill(mask == 0, -1), mask, dec)  # padding ids are checked too: they are looked up
    with pytest.raises(ValueError, match="T5 needs decoder_input_ids"):
        model(ids, mask)
    with pytest.raises(ValueError, match="encoder_out must be"):
        model.decode(dec, model.encode(ids, mask)[:1], mask)
    with pytest.raises(ValueError, match="labels must lie in"):
        model(ids, mask, labels=dec + t5_tiny.VOCAB)
    with pytest.raises(ValueError, match="labels must be"):
        model(ids, mask, labels=dec.float())
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model.generate(ids + 200, mask, max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, mask, max_new_tokens=-1)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, mask, max_new_tokens=3, do_sample=True, top_p=2.0)
    with pytest.raises(ValueError, match=r"decoder_start_token_id must be a token id in \[0, 97\), got 1000"):
        model.generate(ids, mask, max_new_tokens=3, decoder_start_token_id=1000)  # (an IndexError before)
    assert model.generate(ids, mask, max_new_tokens=0).tolist() == [[0], [0]]
    with pytest.raises(ValueError, match=r"attention_mask: rows \[1\] have no real token"):
        model(ids, mask * torch.tensor([[1], [0]]), dec)


def test_decoder_attention_mask_and_left_padding(tmp_path):
    """A right-padded decoder batch (decoder_attention_mask) and a left-padded encoder batch
    (T5 counts positions over the padded layout, padding included, as transformers does):
    logits at the real decoder tokens as transformers'."""
    hf = t5_tiny.make(tmp_path, ff="gated-gelu")
    model = from_pretrained(tmp_path)
    ids, mask = t5_tiny.batch(LENGTHS)
    ids, mask = ids.flip(1), mask.flip(1)
    dec = _decoder_ids(len(LENGTHS), 10)
    dec_mask = torch.ones_like(dec)
    dec_mask[0, 6:] = 0
    dec_mask[2, 3:] = 0
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
        ours = model(ids, mask, dec, dec_mask)
        unmasked = model(ids, mask, dec)
    real = dec_mask.bool()
    assert _rel(ours[real], theirs[real]) < FP32_DIRECT
    assert torch.equal(ours[real], unmasked[real])  # causal: padding after a token never reaches it


def test_sampling_and_loading_errors(tmp_path):
    """Sampling with a seed repeats; a config that does not fit the weights, a missing tensor
    and an unsupported feed-forward are errors naming them."""
    import json

    from safetensors.torch import load_file, save_file

    from fastarch.models import CheckpointError

    t5_tiny.make(tmp_path)
    model = from_pretrained(tmp_path)
    ids, mask = t5_tiny.batch([6, 4])
    a = model.generate(ids, mask, max_new_tokens=8, do_sample=True, top_k=20, seed=3, eos_token_id=[])
    b = model.generate(ids, mask, max_new_tokens=8, do_sample=True, top_k=20, seed=3, eos_token_id=[])
    assert a.shape == (2, 9) and torch.equal(a, b)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "d_ff": 48}))
    with pytest.raises(CheckpointError, match=r"DenseReluDense\.wi\.weight has shape \(40, 32\).*\(48, 32\)"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "feed_forward_proj": "gated-tanh"}))
    with pytest.raises(CheckpointError, match="feed_forward_proj"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["decoder.block.1.layer.1.EncDecAttention.k.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.1\.cross\.k\.weight"):
        from_pretrained(tmp_path)


def test_nan_in_nan_out(tmp_path):
    """A NaN weight reaches the logits of the rows that read it (not the others); generation
    refuses to choose from NaN logits. (Untied: a tied head would put the NaN row's logit
    into every row.)"""
    t5_tiny.make(tmp_path, tied=False)
    model = from_pretrained(tmp_path)
    ids, mask = t5_tiny.batch([5, 3])
    ids[0, 0], ids[1] = 7, ids[1].clamp(min=8)
    with torch.no_grad():
        model.shared.weight[7] = float("nan")
        logits = model(ids, mask, _decoder_ids(2, 4).clamp(min=8))
    assert logits[0].isnan().all() and not logits[1].isnan().any()
    with pytest.raises(FloatingPointError, match=r"NaN at generation step 0 \(rows \[0\]\)"):
        model.generate(ids, mask, max_new_tokens=4)


def test_training_with_dropout_runs(tmp_path):
    """With dropout (config dropout_rate) the attention with a position bias runs in plain
    PyTorch (the bias gradient needs the dropped probabilities): a step gives finite
    gradients everywhere, and two steps under one seed are equal."""
    t5_tiny.make(tmp_path, dropout_rate=0.2)
    model = from_pretrained(tmp_path).train()
    ids, mask = t5_tiny.batch([6, 4])
    labels = _decoder_ids(2, 5, seed=2)
    grads = []
    for _ in range(2):
        model.zero_grad()
        torch.manual_seed(0)
        loss, _ = model(ids, mask, labels=labels)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.isfinite(g).all() and g.abs().max() > 0, name
        assert torch.equal(g, grads[1][name]), name
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, mask, labels[:, :3]), model(ids, mask, labels[:, :3]))  # eval: no dropout


@pytest.mark.gpu
def test_cuda_matches_transformers(tmp_path):
    """On CUDA, fp32 (Triton) and bf16 (the CUDA kernels): logits of a padded batch and one
    training step's gradients within BF16_RATIO (gradients: GRAD_RATIO x the largest)
    x transformers' own error on CUDA in that dtype against the truth on the CPU (fp64 logits
    and gradients), plus two ulps of the truth's scale; greedy generation runs and its first tokens agree with transformers' in fp32."""
    hf = t5_tiny.make(tmp_path, ff="gated-gelu", tied=False, scale=0.1, bias_scale=1.0, num_decoder_layers=2)
    ids, mask = t5_tiny.batch(LENGTHS)
    labels = _decoder_ids(len(LENGTHS), 12, seed=2)
    truth_model = _truth(hf).train()
    truth_logits = truth_model(input_ids=ids, attention_mask=mask, labels=labels)
    truth_logits.loss.backward()
    true_grads = dict(truth_model.named_parameters())
    truth = truth_logits.logits.detach()

    def check(what, ours, theirs, true, dtype):
        ours, theirs, true = ours.double().cpu(), theirs.double().cpu(), true.double()
        floor = 2 * torch.finfo(dtype).eps * true.abs().max().item()
        err, their_err = (ours - true).abs().max().item(), (theirs - true).abs().max().item()
        assert err <= BF16_RATIO * their_err + floor, f"{what} ({dtype}): error {err:.3g}, transformers' {their_err:.3g}"

    cuda = [t.cuda() for t in (ids, mask, labels)]
    for dtype in (torch.float32, torch.bfloat16):
        theirs = copy.deepcopy(hf).to("cuda", dtype).train()
        their_out = theirs(input_ids=cuda[0], attention_mask=cuda[1], labels=cuda[2])
        their_out.loss.backward()
        model = from_pretrained(tmp_path, dtype=dtype, device="cuda").train()
        loss, logits = model(cuda[0], cuda[1], labels=cuda[2])
        loss.backward()
        check("logits", logits, their_out.logits, truth, dtype)
        their_grads = dict(theirs.named_parameters())
        ours_to_hf = {("shared.weight" if n.endswith("embed_tokens.weight") else _model_name(n)): n
                      for n in their_grads}
        # as on the CPU: each gradient's error within GRAD_RATIO x the largest of transformers'
        errors = {name: (_rel(p.grad.cpu(), true_grads[ours_to_hf[name]].grad),
                         _rel(their_grads[ours_to_hf[name]].grad.cpu(), true_grads[ours_to_hf[name]].grad))
                  for name, p in model.named_parameters()}
        level = max(theirs_err for _, theirs_err in errors.values()) + 2 * torch.finfo(dtype).eps
        worst = max(errors, key=lambda n: errors[n][0])
        assert errors[worst][0] <= GRAD_RATIO * level, (dtype, worst, errors[worst], level)
    model = from_pretrained(tmp_path, device="cuda")
    with torch.no_grad():
        theirs = hf.cuda().generate(input_ids=cuda[0], attention_mask=cuda[1], max_new_tokens=8, do_sample=False)
    ours = model.generate(cuda[0], cuda[1], max_new_tokens=8)
    assert torch.equal(ours[:, :4].cpu(), theirs[:, :4].cpu())
