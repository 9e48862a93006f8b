"""fastarch.models.generate: greedy decoding token for token as transformers' generate (batched
and alone), the sampling options' promises, stopping and padding, the static cache, bad
input, TextGenerator and the ``fastarch generate`` command. Small random checkpoints
(gpt2_tiny.py)."""

from __future__ import annotations

import gpt2_tiny
import pytest
import torch

from fastarch.cli import main
from fastarch.models import from_pretrained
from fastarch.models.generate import SamplingOptions, TextGenerator, generate

NEW = 32
LENGTHS = [5, 12, 1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with gpt2_tiny.one_thread():
        yield


@pytest.fixture(scope="module", params=["gpt2", "gpt_neo"])
def pair(request, tmp_path_factory):
    """(transformers model, ours) of one random checkpoint."""
    path = tmp_path_factory.mktemp(request.param)
    hf = gpt2_tiny.make(path, request.param)
    return hf, from_pretrained(path)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    gpt2_tiny.make(path)
    return from_pretrained(path)


def test_greedy_as_transformers_batched_and_alone(pair):
    hf, ours = pair
    ids, mask = gpt2_tiny.prompts(LENGTHS, "left")
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    batched = generate(ours, ids, mask, max_new_tokens=NEW)
    assert batched.shape == (len(LENGTHS), ids.shape[1] + NEW)
    assert torch.equal(batched, theirs)
    for i, n in enumerate(LENGTHS):
        alone = generate(ours, ids[i : i + 1, -n:], max_new_tokens=NEW)
        assert torch.equal(alone[0, n:], batched[i, -NEW:]), f"row {i}"
    # right padding gives each row the same continuation (transformers needs left padding)
    right_ids, right_mask = gpt2_tiny.prompts(LENGTHS, "right", seed=5)
    for i, n in enumerate(LENGTHS):
        right_ids[i, :n] = ids[i, -n:]
    right = generate(ours, right_ids, right_mask, max_new_tokens=NEW)
    assert torch.equal(right[:, -NEW:], batched[:, -NEW:])


def test_min_new_tokens_holds_eos_as_transformers(pair):
    """min_new_tokens: the eos token is never chosen before that many new tokens (its score
    -inf first), then may stop the row; equal to transformers' min_new_tokens."""
    hf, ours = pair
    ids, mask = gpt2_tiny.prompts(LENGTHS, "left")
    free = generate(ours, ids, mask, max_new_tokens=8)[:, ids.shape[1]:]
    eos = int(free[0, 1])  # row 0's second greedy token
    kwargs = dict(max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    for least in (0, 2, 5):
        theirs = hf.generate(ids, attention_mask=mask, do_sample=False, min_new_tokens=least, **kwargs)
        out = generate(ours, ids, mask, min_new_tokens=least, **kwargs)
        assert torch.equal(out, theirs), least
        assert (out[:, ids.shape[1]:ids.shape[1] + least] != eos).all()
    with pytest.raises(ValueError, match="min_new_tokens must be an int >= 0"):
        generate(ours, ids, mask, max_new_tokens=2, min_new_tokens=-1)


def test_eos_stops_and_pads_as_transformers(pair):
    hf, ours = pair
    ids, mask = gpt2_tiny.prompts(LENGTHS, "left")
    free = generate(ours, ids, mask, max_new_tokens=12)[:, ids.shape[1]:]
    # row 0 stops at its first new token from the 3rd on (other rows where they meet it, if ever)
    at = next(i for i in range(2, 12) if free[0, i] not in free[0, :i])
    eos = int(free[0, at])
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    out = generate(ours, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, theirs)
    new = out[0, ids.shape[1]:]
    assert new[at] == eos and (new[at + 1:] == 0).all()
    # every row stopped: generation ends early
    all_stop = generate(ours, ids[:1], mask[:1], max_new_tokens=12, eos_token_id=[99, eos])
    assert all_stop.shape[1] == ids.shape[1] + at + 1
    # the model's eos (config.json's) is the default; [] turns it off
    ours.config.eos_token_id = eos
    try:
        assert torch.equal(generate(ours, ids, mask, max_new_tokens=12, pad_token_id=0), out)
        assert generate(ours, ids, mask, max_new_tokens=12, eos_token_id=[]).shape[1] == ids.shape[1] + 12
    finally:
        ours.config.eos_token_id = None


def test_cache_is_never_reallocated(model):
    ids, mask = gpt2_tiny.prompts(LENGTHS, "left")
    cache = model.new_cache(len(LENGTHS), ids.shape[1] + NEW)
    tensors = [*cache.k, *cache.v, cache.seqlens]
    ptrs = [t.data_ptr() for t in tensors]
    seen = []

    def check(_):
        seen.append([t.data_ptr() for t in [*cache.k, *cache.v, cache.seqlens]] == ptrs)

    first = generate(model, ids, mask, max_new_tokens=NEW, cache=cache, callback=check)
    assert len(seen) == NEW and all(seen)
    assert all(a is b for a, b in zip([*cache.k, *cache.v, cache.seqlens], tensors))
    assert cache.seqlens.tolist() == [n + NEW - 1 for n in LENGTHS]  # the last token is not fed back
    again = generate(model, ids, mask, max_new_tokens=NEW, cache=cache)  # reused
    assert torch.equal(first, again) and [t.data_ptr() for t in tensors] == ptrs


def _full_logits(model, seqs, mask):
    with torch.no_grad():
        return model(seqs, mask)


def test_sampled_tokens_stay_in_top_k(model):
    """Every sampled token is among the top k of the model's logits for its prefix."""
    ids, mask = gpt2_tiny.prompts(LENGTHS, "right")
    k = 2
    out = generate(model, ids, mask, max_new_tokens=10, do_sample=True, top_k=k, seed=1)
    S = ids.shape[1]
    for b, n in enumerate(LENGTHS):
        seq = torch.cat([ids[b, :n], out[b, S:]])[None]
        logits = _full_logits(model, seq, None)[0]
        for t in range(10):
            top = logits[n - 1 + t].topk(k).indices
            assert seq[0, n + t] in top


def test_seeded_sampling_repeats(model):
    ids, mask = gpt2_tiny.prompts(LENGTHS, "left")
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95)
    a = generate(model, ids, mask, seed=3, **kw)
    b = generate(model, ids, mask, seed=3, **kw)
    c = generate(model, ids, mask, seed=4, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _support(scores):
    return set(torch.isfinite(scores).nonzero().flatten().tolist())


def test_top_k_top_p_min_p_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 3
    probs = logits.softmax(-1)[0]
    order = probs.argsort(descending=True).tolist()
    # top-k: exactly the k largest
    assert _support(SamplingOptions(do_sample=True, top_k=5).process(logits, None)[0]) == set(order[:5])
    # top-p: the shortest run of most likely tokens whose probability reaches p
    for p in (0.3, 0.75, 0.999):
        cum, nucleus = 0.0, []
        for t in order:
            nucleus.append(t)
            cum += probs[t].item()
            if cum >= p:
                break
        assert _support(SamplingOptions(do_sample=True, top_p=p).process(logits, None)[0]) == set(nucleus), p
    # min-p: tokens at least min_p times as likely as the most likely
    kept = {t for t in range(50) if probs[t] >= 0.1 * probs.max()}
    assert _support(SamplingOptions(do_sample=True, min_p=0.1).process(logits, None)[0]) == kept
    # temperature first: a low temperature sharpens the distribution min-p sees
    sharp = _support(SamplingOptions(do_sample=True, temperature=0.25, min_p=0.1).process(logits, None)[0])
    assert sharp <= kept and order[0] in sharp
    # greedy ignores the warpers
    assert _support(SamplingOptions(top_k=1, top_p=0.1).process(logits, None)[0]) == set(range(50))


def test_repetition_penalty_by_hand():
    scores = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = SamplingOptions(repetition_penalty=2.0).process(scores, seen)
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0]]


def test_repetition_penalty_changes_greedy_as_transformers(pair):
    hf, ours = pair
    ids, mask = gpt2_tiny.prompts([6], "left")
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, repetition_penalty=1.8,
                         eos_token_id=None, pad_token_id=0)
    out = generate(ours, ids, mask, max_new_tokens=16, repetition_penalty=1.8)
    plain = generate(ours, ids, mask, max_new_tokens=16)
    assert torch.equal(out, theirs) and not torch.equal(out, plain)


@pytest.fixture(scope="module")
def text_gen(tmp_path_factory):
    path = tmp_path_factory.mktemp("withtok")
    tok = gpt2_tiny.tokenizer(path)
    gpt2_tiny.make(path, vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return path, TextGenerator.from_pretrained(path)


def test_stop_strings_cut(text_gen):
    _, gen = text_gen
    tok = gen.tokenizer
    ids = torch.tensor([tok("Hello world")["input_ids"]])
    free = generate(gen.model, ids, max_new_tokens=12, eos_token_id=[])[0, ids.shape[1]:]
    text = tok.decode(free)
    # the stop string: two characters that first appear with token i (i >= 6)
    for i in range(6, 12):
        stop = tok.decode(free[:i])[-2:]
        if len(stop) == 2 and "\ufffd" not in stop and stop not in tok.decode(free[: i - 1]):
            break
    at = next(j for j in range(1, 13) if stop in tok.decode(free[:j]))  # i, unless the text shifted
    assert at <= 11
    out = generate(gen.model, ids, max_new_tokens=12, eos_token_id=[], stop_strings=stop, tokenizer=tok)
    assert out.shape[1] == ids.shape[1] + at  # generation ends with the token that completes it
    said = gen.generate("Hello world", max_new_tokens=12, stop_strings=[stop], eos_token_id=[])
    assert said.endswith(stop) and text.startswith(said) and said.count(stop) == 1  # the text ends with it
    with pytest.raises(ValueError, match="tokenizer"):
        generate(gen.model, ids, max_new_tokens=4, stop_strings="x")


def test_text_generator_stream_and_chat(text_gen):
    _, gen = text_gen
    pieces = list(gen.stream("Once upon a time", max_new_tokens=20, eos_token_id=[]))
    assert gen.stats["new_tokens"] == 20 and gen.stats["prompt_tokens"] > 0
    assert "".join(pieces) == gen.generate("Once upon a time", max_new_tokens=20, eos_token_id=[])
    assert all(pieces) and not any(p.endswith("\ufffd") for p in pieces[:-1])  # no character split
    tok = gen.tokenizer
    chat = gen.encode("hi", chat=True)[0].tolist()
    assert tok.decode(chat) == "<|user|>hi<|end|><|assistant|>"
    assert gen.generate("hi", chat=True, max_new_tokens=5, eos_token_id=[]) == tok.decode(
        generate(gen.model, torch.tensor([chat]), max_new_tokens=5, eos_token_id=[])[0, len(chat):])
    with pytest.raises(ValueError, match="max_new_tokens"):  # at the call (it had waited for the first next())
        gen.stream("hi", max_new_tokens=-1)


def test_cli_generate(text_gen, capsys):
    path, gen = text_gen
    assert main(["generate", "Once upon", "--model", str(path), "--max-new-tokens", "8", "--dtype", "fp32"]) == 0
    out, err = capsys.readouterr()
    assert out == gen.generate("Once upon", max_new_tokens=8) + "\n"
    assert err.startswith("prefill: ") and "tokens/s" in err and "decode: " in err
    sampled = ["generate", "Once upon", "--model", str(path), "--max-new-tokens", "8", "--do-sample", "--top-k", "5",
               "--seed", "3"]
    assert main(sampled) == 0 and main(sampled) == 0
    first, second = capsys.readouterr().out.split("\n")[:2]
    assert first == second
    assert main(["generate", "Once upon", "--model", str(path), "--chat", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["generate", "Once upon", "--model", str(path), "--max-new-tokens", "0"]) == 0
    assert " 0 tokens in" in capsys.readouterr().err  # (it had said "decode: -1 tokens")
    # no --model runs the default GGUF model (test_llama.py checks the message when it is missing)
    for argv, message in [(["generate", "x", "--model", str(path / "nowhere")], "config.json"),
                          (["generate", "x", "--model", str(path), "--device", "nonsense"], "--device nonsense"),
                          (["generate", "x", "--model", str(path), "--max-new-tokens", "100"], "64 positions"),
                          (["generate", "x", "--model", str(path), "--top-p", "2"], "top_p")]:
        assert main(argv) in (1, 2)
        assert message in capsys.readouterr().err, argv


def test_bad_input(model):
    ids, mask = gpt2_tiny.prompts([10], "left")
    with pytest.raises(ValueError, match="exceed the model's 64 positions"):
        generate(model, ids, max_new_tokens=gpt2_tiny.POSITIONS - 9)
    with pytest.raises(ValueError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        generate(model, ids.repeat(2, 1), torch.cat([mask, 0 * mask]), max_new_tokens=4)
    with pytest.raises(TypeError, match="integer"):
        generate(model, ids.float(), max_new_tokens=4)
    with pytest.raises(TypeError, match="attention_mask must be a tensor"):  # (an AttributeError before)
        generate(model, ids, mask.tolist(), max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, max_new_tokens=-1)
    # 1e-45: the scaled logits overflow fp32 (the softmax had failed inside torch.multinomial)
    for bad in (dict(temperature=0.0), dict(temperature=1e-45), dict(temperature=float("nan")), dict(top_p=0.0),
                dict(top_k=0), dict(top_k=True), dict(min_p=1.5), dict(repetition_penalty=0),
                dict(repetition_penalty=1e-40), dict(temperature=10**400), dict(repetition_penalty=10**400),
                dict(seed=2**64), dict(seed=1.5), dict(stop_strings=[""])):
        with pytest.raises(ValueError, match=next(iter(bad))):
            generate(model, ids, max_new_tokens=4, do_sample=True, tokenizer=object(), **bad)
    for bad in (dict(temperature="1"), dict(top_p="0.9"), dict(eos_token_id="78"), dict(eos_token_id=3.0),
                dict(eos_token_id=[None])):
        with pytest.raises(TypeError, match=next(iter(bad))):  # a string eos id had been read digit by digit
            generate(model, ids, max_new_tokens=4, do_sample=True, **bad)
    cache = model.new_cache(1, 12)
    with pytest.raises(ValueError, match="cache holds 12"):
        generate(model, ids, max_new_tokens=4, cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        model.new_cache(1, gpt2_tiny.POSITIONS + 1)
    # max_new_tokens=0: the prompt back
    assert torch.equal(generate(model, ids, mask, max_new_tokens=0), ids)


def test_nan_logits_and_out_of_vocab_ids(model):
    """NaN logits stop generation with an error, never a token drawn from them; an id past the
    vocabulary is refused before the embedding (a device-side assert on a GPU)."""
    ids, _ = gpt2_tiny.prompts([4], "left")
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 97\)"):
        generate(model, ids + gpt2_tiny.VOCAB, max_new_tokens=2)
    padded, mask = gpt2_tiny.prompts([4, 2], "left")
    padded[1, :2] = -1  # padding ids are never read
    assert generate(model, padded, mask, max_new_tokens=2).shape == (2, 6)
    bias = model.h[0].mlp_proj.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias[0] = float("nan")
    try:
        with pytest.raises(FloatingPointError, match="NaN at generation step 0"):
            generate(model, ids, max_new_tokens=2)
    finally:
        with torch.no_grad():
            bias.copy_(saved)


def test_repetition_penalty_ignores_padding(model):
    """A padded prompt penalizes its real tokens only: the same as the prompt alone, even when
    the padding holds the very tokens the prompt goes on to generate."""
    ids, mask = gpt2_tiny.prompts([3, 9], "left")
    alone = generate(model, ids[:1, -3:], max_new_tokens=6, repetition_penalty=3.0)
    ids[0, :6] = alone[0, -6:]
    batched = generate(model, ids, mask, max_new_tokens=6, repetition_penalty=3.0)
    assert torch.equal(batched[0, -6:], alone[0, -6:])


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cached_decoding_equals_the_full_forward(pair, dtype, device):
    """Logits of tokens fed through the cache (one at a time, then three at once) as those of
    the full forward over the whole padded sequences; in bf16 within the full forward's own
    bf16 error against fp32 (the two round differently)."""
    _, ours = pair
    model = ours.to(device, dtype)
    try:
        ids, mask = (t.to(device) for t in gpt2_tiny.prompts(LENGTHS, "left"))
        more = torch.randint(2, gpt2_tiny.VOCAB, (len(LENGTHS), 7), generator=torch.Generator().manual_seed(1))
        more = more.to(device)
        cache = model.new_cache(len(LENGTHS), ids.shape[1] + 7)
        assert cache.k[0].dtype == dtype and cache.k[0].device.type == device
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
            assert (cached - full).abs().max() <= 1e-5 * scale
        else:
            bound = (full.float() - truth).abs().max()
            assert (cached.float() - truth).abs().max() <= 2 * bound + 4e-3 * scale
    finally:
        ours.to("cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["gpt2", "gpt_neo"])
def test_cuda_generation_as_transformers(tmp_path, family):
    """On CUDA in fp32: greedy tokens as transformers' there (batched and alone), eos padding,
    the cache in place, seeded sampling repeats on a CUDA generator."""
    hf = gpt2_tiny.make(tmp_path, family).cuda()
    ours = from_pretrained(tmp_path, device="cuda")
    ids, mask = (t.cuda() for t in gpt2_tiny.prompts(LENGTHS, "left"))
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    cache = ours.new_cache(len(LENGTHS), ids.shape[1] + NEW)
    ptrs = [t.data_ptr() for t in [*cache.k, *cache.v, cache.seqlens]]
    batched = generate(ours, ids, mask, max_new_tokens=NEW, cache=cache)
    assert batched.device.type == "cuda" and torch.equal(batched, theirs)
    assert [t.data_ptr() for t in [*cache.k, *cache.v, cache.seqlens]] == ptrs
    for i, n in enumerate(LENGTHS):
        assert torch.equal(generate(ours, ids[i : i + 1, -n:], max_new_tokens=NEW)[0, n:], batched[i, -NEW:])
    eos = int(batched[0, -NEW + 2])
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(generate(ours, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0), theirs)
    kw = dict(max_new_tokens=16, do_sample=True, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    assert torch.equal(generate(ours, ids, mask, seed=7, **kw), generate(ours, ids, mask, seed=7, **kw))


def test_transformers_streamer(text_gen):
    """transformers' TextIteratorStreamer gets the prompt, then each token: its text is ours."""
    from transformers import TextIteratorStreamer

    _, gen = text_gen
    ids = gen.encode("Hello world")
    streamer = TextIteratorStreamer(gen.tokenizer, skip_prompt=True)
    out = generate(gen.model, ids, max_new_tokens=10, eos_token_id=[], streamer=streamer)
    assert "".join(streamer) == gen.tokenizer.decode(out[0, ids.shape[1]:])
