"""fastarch.models.starcoder against transformers' GPTBigCodeForCausalLM on small random
checkpoints, multi-query (StarCoder's) and multi-head: logits on padded mixed-length batches in
fp32 and bf16, one training step's gradients, greedy generation token for token, the static
cache, bad input and bad checkpoints."""

from __future__ import annotations

import json

import gpt2_tiny
import pytest
import torch
import torch.nn.functional as F
import transformers

from fastarch.models import CheckpointError, from_pretrained
from fastarch.models.generate import generate
from fastarch.models.gpt2 import _model_name
from fastarch.models.starcoder import StarCoder

FP32_REL = 1e-5  # the same math in another order (packed attention, fused norms)
BF16_RATIO = 2.0  # our bf16 error against the fp32 truth, at most this multiple of transformers'
NEW = 32
LENGTHS = [7, 13, 1, 10]  # mixed lengths, one single-token row
POSITIONS = gpt2_tiny.POSITIONS

MQ = pytest.mark.parametrize("multi_query", [True, False], ids=["mqa", "mha"])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with gpt2_tiny.one_thread():
        yield


def make(path, *, seed: int = 0, **kw) -> transformers.GPTBigCodeForCausalLM:
    """A random GPTBigCodeForCausalLM (head dim 16, two layers, an odd MLP width, no dropout, no
    eos) saved to ``path``, returned fp32 in eval mode."""
    base = dict(vocab_size=gpt2_tiny.VOCAB, n_positions=POSITIONS, n_embd=64, n_layer=2, n_head=4, n_inner=80,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    cfg = transformers.GPTBigCodeConfig(**{**base, **kw})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.GPTBigCodeForCausalLM(cfg)
    gpt2_tiny.randomize(model, seed)
    model.save_pretrained(path)
    return model.eval()


def _logits(hf, ids, mask):
    return hf(ids, attention_mask=mask, position_ids=gpt2_tiny.hf_positions(mask)).logits


def _rel_err(ours, ref, mask):
    real = mask.bool()
    return ((ours.float() - ref.float())[real].abs().max() / ref.float()[real].abs().max()).item()


VARIANTS = [
    dict(multi_query=True),
    dict(multi_query=False),
    dict(multi_query=True, activation_function="gelu", tie_word_embeddings=False),
    dict(multi_query=False, activation_function="gelu_fast", scale_attn_weights=False),  # SantaCoder's GELU
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_fp32_padded_batch(tmp_path, overrides, side):
    hf = make(tmp_path, **overrides)
    model = from_pretrained(tmp_path)
    assert isinstance(model, StarCoder)
    # the cache holds one key/value head with multi-query attention
    assert model.new_cache(1, 4).k[0].shape[1] == (1 if overrides["multi_query"] else 4)
    ids, mask = gpt2_tiny.prompts(LENGTHS, side)
    with torch.no_grad():
        ref = _logits(hf, ids, mask)
        out = model(ids, mask)
        last = model(ids, mask, last_only=True)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _rel_err(out, ref, mask) < FP32_REL
    assert (out[~mask.bool()] == 0).all()  # padding is not computed
    idx = torch.tensor([m.nonzero().max().item() for m in mask])
    torch.testing.assert_close(last[:, 0], out[torch.arange(len(LENGTHS)), idx], rtol=0, atol=1e-5)


@MQ
def test_logits_bf16(tmp_path, multi_query):
    """bf16 against the fp32 truth, bounded by transformers' own bf16 error."""
    hf = make(tmp_path, multi_query=multi_query)
    ids, mask = gpt2_tiny.prompts(LENGTHS, "right")
    with torch.no_grad():
        truth = _logits(hf, ids, mask)
        theirs = _logits(hf.to(torch.bfloat16), ids, mask)
        ours = from_pretrained(tmp_path, dtype=torch.bfloat16)(ids, mask)
    assert ours.dtype == torch.bfloat16
    theirs_err, ours_err = _rel_err(theirs, truth, mask), _rel_err(ours, truth, mask)
    assert ours_err <= BF16_RATIO * theirs_err + 4e-3, (ours_err, theirs_err)  # 4e-3: one bf16 ulp at 1


@MQ
def test_training_step_gradients(tmp_path, multi_query):
    """One step of next-token loss on a padded batch: every parameter's gradient as transformers'
    (c_attn's in the checkpoint's layout: ours is the same tensor)."""
    hf = make(tmp_path, multi_query=multi_query).train()
    model = from_pretrained(tmp_path).train()
    ids, mask = gpt2_tiny.prompts(LENGTHS, "left")
    # a label counts where it and the token predicting it are real (with left padding the last
    # pad would predict the first real token: transformers computes garbage there, we zeros)
    labels = ids[:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)

    def loss(logits):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)

    loss(_logits(hf, ids, mask)).backward()
    loss(model(ids, mask)).backward()
    hf_params = dict(hf.named_parameters())  # the tied lm_head is wte: one entry, as ours
    hf_name = {_model_name(n): n for n in hf_params}
    for name, p in model.named_parameters():
        ref = hf_params[hf_name[name]].grad
        assert p.grad is not None and p.grad.shape == ref.shape, name
        assert (p.grad - ref).abs().max().item() <= 1e-4 * ref.abs().max().item() + 1e-7, name
    assert len(dict(model.named_parameters())) == len(hf_params)


@pytest.fixture(scope="module", params=[True, False], ids=["mqa", "mha"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("starcoder")
    return make(path, multi_query=request.param), from_pretrained(path)


def test_greedy_as_transformers_batched_and_alone(pair):
    hf, ours = pair
    lengths = [5, 12, 1]
    ids, mask = gpt2_tiny.prompts(lengths, "left")
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    batched = generate(ours, ids, mask, max_new_tokens=NEW)
    assert batched.shape == theirs.shape and torch.equal(batched, theirs)
    for i, n in enumerate(lengths):
        alone = generate(ours, ids[i : i + 1, -n:], max_new_tokens=NEW)
        assert torch.equal(alone[0, n:], batched[i, -NEW:]), f"row {i}"
    # right padding: each row the same continuation
    right_ids, right_mask = gpt2_tiny.prompts(lengths, "right", seed=5)
    for i, n in enumerate(lengths):
        right_ids[i, :n] = ids[i, -n:]
    assert torch.equal(generate(ours, right_ids, right_mask, max_new_tokens=NEW)[:, -NEW:], batched[:, -NEW:])


def test_cache_is_never_reallocated(pair):
    _, model = pair
    ids, mask = gpt2_tiny.prompts(LENGTHS, "left")
    cache = model.new_cache(len(LENGTHS), ids.shape[1] + NEW)
    tensors = [*cache.k, *cache.v, cache.seqlens]
    ptrs = [t.data_ptr() for t in tensors]
    seen = []
    first = generate(model, ids, mask, max_new_tokens=NEW, cache=cache,
                     callback=lambda _: seen.append([t.data_ptr() for t in [*cache.k, *cache.v, cache.seqlens]] == ptrs))
    assert len(seen) == NEW and all(seen)
    assert cache.seqlens.tolist() == [n + NEW - 1 for n in LENGTHS]  # the last token is not fed back
    again = generate(model, ids, mask, max_new_tokens=NEW, cache=cache)  # reused
    assert torch.equal(first, again) and [t.data_ptr() for t in tensors] == ptrs


def test_bad_input(pair):
    _, model = pair
    V = gpt2_tiny.VOCAB
    ids = torch.ones(2, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="exceed the model's 64 positions"):
        generate(model, ids, max_new_tokens=POSITIONS - 9)
    generate(model, ids, max_new_tokens=POSITIONS - 10)  # exactly fits
    with pytest.raises(ValueError, match="more than the model's 64 positions"):
        model(torch.ones(1, POSITIONS + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {V}\), got ids from 1 to {V}"):
        model(ids.index_fill(1, torch.tensor([3]), V))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        generate(model, ids.index_fill(1, torch.tensor([0]), -1), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask must have input_ids' shape \(2, 10\), got \(2, 9\)"):
        model(ids, torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seqlen\)"):
        model(ids[0])
    with pytest.raises(TypeError, match="input_ids must hold integer token ids"):
        model(ids.float())
    # the next tokens against a filled cache
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        model(ids, cache=cache)
        with pytest.raises(ValueError, match="input_ids must lie in"):
            model(torch.full((2, 1), V), cache=cache)
        with pytest.raises(ValueError, match="cache was made for batch 2"):
            model(torch.ones(3, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="10 \\+ 7 new ones do not fit"):
            model(torch.ones(2, 7, dtype=torch.long), cache=cache)


def test_checkpoint_not_fitting_config(tmp_path):
    """A config.json whose multi_query disagrees with the weights: the error names the tensor."""
    make(tmp_path, multi_query=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "multi_query": False}))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.\d\.attn\.c_attn\.(weight|bias) has shape \(96\b.*needs \(192\b"):
        from_pretrained(tmp_path)
    for bad, what in [({"activation_function": "swish"}, "activation_function"),
                      ({"add_cross_attention": True}, "add_cross_attention"),
                      ({"n_head": 5}, "not a multiple of n_head")]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(CheckpointError, match=what):
            from_pretrained(tmp_path)


def test_checkpoint_variants_and_missing_tensor(tmp_path):
    """The causal-mask buffer older transformers saved is skipped; a GPTBigCodeModel checkpoint
    (no transformer. prefix, no lm_head) loads with the head tied; a missing tensor is named."""
    from safetensors.torch import load_file, save_file

    hf = make(tmp_path, multi_query=False)
    weights = load_file(str(tmp_path / "model.safetensors"))
    save_file({**weights, "transformer.bias": torch.ones(POSITIONS, POSITIONS).tril().bool()},
              str(tmp_path / "model.safetensors"))
    ids, mask = gpt2_tiny.prompts(LENGTHS, "left")
    with torch.no_grad():
        ref = _logits(hf, ids, mask)
        assert _rel_err(from_pretrained(tmp_path)(ids, mask), ref, mask) < FP32_REL
        base = tmp_path / "base"
        hf.transformer.save_pretrained(base)
        assert _rel_err(from_pretrained(base)(ids, mask), ref, mask) < FP32_REL
    del weights["transformer.h.1.attn.c_attn.bias"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks tensors StarCoder needs: h\.1\.c_attn\.bias"):
        from_pretrained(tmp_path)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cached_decoding_equals_the_full_forward(pair, dtype, device):
    """Logits of tokens fed through the (one-head, with multi_query) cache, one at a time then
    three at once, as those of the full forward over the whole padded sequences; in bf16 within
    the full forward's own bf16 error against fp32 (the two round differently)."""
    _, ours = pair
    model = ours.to(device, dtype)
    try:
        ids, mask = (t.to(device) for t in gpt2_tiny.prompts(LENGTHS, "left"))
        more = torch.randint(2, gpt2_tiny.VOCAB, (len(LENGTHS), 7), generator=torch.Generator().manual_seed(1))
        more = more.to(device)
        cache = model.new_cache(len(LENGTHS), ids.shape[1] + 7)
        with torch.no_grad():
            steps = [model(ids, mask, cache=cache, last_only=True)]
            steps += [model(more[:, i : i + 1], cache=cache) for i in range(4)]
            steps.append(model(more[:, 4:], cache=cache))
            cached = torch.cat(steps, 1)  # logits after the prompt, then after each new token
            seq, seq_mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)
            full = model(seq, seq_mask)[:, ids.shape[1] - 1 :]
            truth = model.float()(seq, seq_mask)[:, ids.shape[1] - 1 :]
        assert cache.seqlens.tolist() == [n + 7 for n in LENGTHS]
        scale = truth.abs().max()
        if dtype == torch.float32:
            assert (cached - full).abs().max() <= FP32_REL * scale
        else:
            bound = (full.float() - truth).abs().max()
            assert (cached.float() - truth).abs().max() <= 2 * bound + 4e-3 * scale
    finally:
        ours.to("cpu", torch.float32)


@pytest.mark.gpu
@MQ
def test_cuda_matches_transformers(tmp_path, multi_query):
    """On CUDA, fp32 and bf16: logits of a padded batch within BF16_RATIO x transformers' own
    error on CUDA in that dtype against the truth (fp64 on the CPU), plus two ulps of the
    truth's scale (at least FP32_REL); greedy generation in fp32 as on the CPU, token for token."""
    import copy

    hf = make(tmp_path, multi_query=multi_query)
    ids, mask = gpt2_tiny.prompts(LENGTHS, "right")
    pos = gpt2_tiny.hf_positions(mask)
    real = mask.bool()
    with torch.no_grad():
        truth = copy.deepcopy(hf).double()(ids, attention_mask=mask, position_ids=pos).logits[real]
        for dtype in (torch.float32, torch.bfloat16):
            theirs = copy.deepcopy(hf).to("cuda", dtype)(ids.cuda(), attention_mask=mask.cuda(),
                                                         position_ids=pos.cuda()).logits[real.cuda()].double().cpu()
            model = from_pretrained(tmp_path, dtype=dtype, device="cuda")
            ours = model(ids.cuda(), mask.cuda())[real.cuda()].double().cpu()
            floor = max(2 * torch.finfo(dtype).eps, FP32_REL) * truth.abs().max().item()
            err, their_err = (ours - truth).abs().max().item(), (theirs - truth).abs().max().item()
            assert err <= BF16_RATIO * their_err + floor, f"{dtype}: error {err:.3g}, transformers' {their_err:.3g}"
    ids, mask = gpt2_tiny.prompts([5, 12, 1], "left")
    on_cpu = generate(from_pretrained(tmp_path), ids, mask, max_new_tokens=NEW)
    on_cuda = generate(from_pretrained(tmp_path, device="cuda"), ids.cuda(), mask.cuda(), max_new_tokens=NEW)
    assert torch.equal(on_cuda.cpu(), on_cpu)
