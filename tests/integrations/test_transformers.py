"""fastarch inside transformers models (tiny random configs, AutoModel.from_config): the "fastarch"
attention implementation and fastarch.optimize against what users run today (attn
implementation "sdpa"), both judged against the fp64 model (dropin_tolerance.py): outputs with
padding, a training step's gradients, greedy generation with transformers' own cache; T5's
position bias."""

from __future__ import annotations

import copy

import pytest
import torch
from dropin_tolerance import assert_close  # tests/integrations/dropin_tolerance.py
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    Gemma2Config,
    GPT2Config,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    T5Config,
    T5Model,
)

import fastarch
import fastarch.override
from fastarch.integrations import transformers as integration
from fastarch.optimize import HFRMSNorm, LayerNorm

VOCAB = 99
CONFIGS = {
    "bert": lambda: BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    # sliding-window attention: 13 tokens, a window of 4 (the mask carries it)
    "mistral": lambda: MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                     sliding_window=4),
}
NORM = {"bert": LayerNorm, "gpt2": LayerNorm, "llama": HFRMSNorm, "mistral": HFRMSNorm}


def _model(name: str, causal_lm: bool = False):
    torch.manual_seed(0)
    auto = AutoModelForCausalLM if causal_lm else AutoModel
    return auto.from_config(CONFIGS[name](), attn_implementation="sdpa").eval()


def _inputs(batch=2, length=13):
    ids = torch.randint(1, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 9:] = 0  # right padding: every query still sees a real key
    return ids, mask


class _Counting:
    """Counts the attention calls fastarch runs for the model: fastarch.ops.attention's, and the
    unpadded encoder's packed calls of the kernel directly (attention_direct, when it ran)."""

    def __init__(self, mp):
        from fastarch.integrations import unpadded_encoder

        self.calls = 0
        real, direct = integration.ops.attention, unpadded_encoder.attention_direct

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        def counting_direct(*args, **kwargs):
            out = direct(*args, **kwargs)
            self.calls += out is not None
            return out

        mp.setattr(integration.ops, "attention", counting)
        mp.setattr(unpadded_encoder, "attention_direct", counting_direct)


def _output(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_match_sdpa(name, dtype, monkeypatch):
    model = _model(name)
    exact = copy.deepcopy(model).double()
    model.to(dtype)
    report = fastarch.optimize(model, inplace=False)
    fast = report.model
    assert fast.config._attn_implementation == "fastarch" and model.config._attn_implementation == "sdpa"
    assert any("'fastarch'" in e.detail for e in report.swapped)
    assert any(isinstance(m, NORM[name]) for m in fast.modules())
    ids, mask = _inputs()
    counting = _Counting(monkeypatch)
    with torch.no_grad():
        ours, theirs, ref = _output(fast, ids, mask), _output(model, ids, mask), _output(exact, ids, mask)
    assert counting.calls == 2  # one per layer
    keep = mask.bool()  # compare real tokens (padded positions are free to differ)
    assert_close(ours[keep], theirs[keep], ref[keep])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_step_gradients(name):
    model = _model(name).train()
    exact = copy.deepcopy(model).double()
    fast = fastarch.optimize(model, inplace=False).model
    ids, mask = _inputs()
    grads = []
    for m in (fast, model, exact):
        out = _output(m, ids, mask)
        (out[mask.bool()].double().square().mean()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    ours, theirs, ref = grads
    assert ours.keys() == ref.keys() and len(ref) > 10
    for n in ref:
        assert_close(ours[n], theirs[n], ref[n], factor=3.0)


def test_llama_gqa_greedy_generation():
    model = _model("llama", causal_lm=True)
    fast = fastarch.optimize(model, inplace=False).model
    ids = torch.randint(1, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as batched generation pads
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    theirs = model.generate(ids, **kw)
    ours = fast.generate(ids, **kw)
    assert torch.equal(ours, theirs)


def test_greedy_generation_decodes_by_the_kernel_directly(monkeypatch):
    """Batch 1, no padding: every new token's attention (one query, no mask) calls the attention
    kernel itself, skipping fastarch.ops.attention's Python; the tokens are SDPA's."""
    model = _model("llama", causal_lm=True)
    fast = fastarch.optimize(model, inplace=False).model
    direct = []  # per call of the decode path: whether it ran the kernel
    real = integration._decode_direct

    def spy(*args):
        out = real(*args)
        direct.append(out is not None)
        return out

    monkeypatch.setattr(integration, "_decode_direct", spy)
    ids = torch.randint(1, VOCAB, (1, 7))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        theirs, ours = model.generate(ids, **kw), fast.generate(ids, **kw)
    assert torch.equal(ours, theirs)
    assert len(direct) == 2 * 7 and all(direct)  # 2 layers x the 7 steps after the prompt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,keys", [(4, 2, 1), (9, 3, 37), (2, 2, 300)])
def test_decode_direct_is_the_op(dtype, heads, kv_heads, keys):
    """The decode path gives fastarch.ops.attention's bits on the same backend, shaped (B, 1, H,
    Dv); it declines (None: the general path runs) with autograd and for inputs the op would
    refuse."""
    torch.manual_seed(0)
    q = torch.randn(2, heads, 1, 16, dtype=dtype)
    k = torch.randn(2, kv_heads, keys, 16, dtype=dtype)
    v = torch.randn(2, kv_heads, keys, 24, dtype=dtype)
    backend = fastarch.override.backend_for("attention", ("cpu", dtype, 16, 24, heads, kv_heads) + (False,) * 6)
    with torch.no_grad():
        got = integration._decode_direct(q, k, v, 0.3, None)
        want = fastarch.ops.attention(q, k, v, scale=0.3, backend=backend)
        assert got.shape == (2, 1, heads, 24) and torch.equal(got, want.transpose(1, 2))
        assert integration._decode_direct(q, k, v, None, None) is not None  # default scale
        assert integration._decode_direct(q, k[:, :, :0], v[:, :, :0], 0.3, None) is None  # no key
        assert integration._decode_direct(q, k, v.float() if dtype != torch.float32 else v.half(), 0.3, None) is None
        assert integration._decode_direct(q, k, v, float("nan"), None) is None
    assert integration._decode_direct(q.requires_grad_(), k, v, 0.3, None) is None


def test_set_attn_implementation_directly():
    model = _model("llama", causal_lm=True)
    ids, mask = _inputs()
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("fastarch")
        ours = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-4, atol=1e-5)


def test_compiled_fullgraph(monkeypatch):
    """torch.compile(fullgraph=True) of an optimized LLaMA: no graph break, fastarch inside."""
    torch._dynamo.reset()
    model = _model("llama")
    fast = fastarch.optimize(model, inplace=False).model
    ids, mask = _inputs()
    counting = _Counting(monkeypatch)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        ours = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
        theirs = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert counting.calls == 2  # traced once per layer
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-4, atol=1e-5)


def test_sdpa_override_reaches_sdpa_models(monkeypatch):
    """An unmodified "sdpa" model inside fastarch.sdpa_override(): its attention runs fastarch."""
    model = _model("llama")
    exact = copy.deepcopy(model).double()
    ids, mask = _inputs()
    calls = []
    real = fastarch.override.ops.scaled_dot_product_attention
    monkeypatch.setattr(fastarch.override.ops, "scaled_dot_product_attention", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        with fastarch.sdpa_override():
            ours = _output(model, ids, mask)
        theirs, ref = _output(model, ids, mask), _output(exact, ids, mask)
    assert len(calls) == 2
    keep = mask.bool()
    assert_close(ours[keep], theirs[keep], ref[keep])


def test_model_inside_another_module():
    """A transformers model inside a plain module (as a SentenceTransformer holds its BertModel)."""
    bert = _model("bert")
    wrapper = torch.nn.Sequential(torch.nn.ModuleDict({"bert": bert}))
    report = fastarch.optimize(wrapper)
    assert bert.config._attn_implementation == "fastarch"
    assert any(e.path == "0.bert" and "'fastarch'" in e.detail for e in report.swapped)
    fastarch.restore(wrapper)
    assert bert.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpt2_conv1d_on_the_k_major_kernel(dtype, monkeypatch):
    """GPT-2's Conv1D projections become FastarchConv1D: at a decode step (2 rows) the linear
    kernel reads their (in, out) weights as they are; the prefill's 18 rows run Conv1D's addmm.
    Logits against the fp64 model, greedy tokens against transformers', restore."""
    from transformers import DynamicCache
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    from transformers.pytorch_utils import Conv1D

    model = _model("gpt2", causal_lm=True)
    exact = copy.deepcopy(model).double()
    model.to(dtype)
    report = fastarch.optimize(model, inplace=False)
    fast = report.model
    for block in fast.transformer.h:  # (the Conv1D modules alone: test_decoder_layer.py has the fused block)
        block.__class__ = GPT2Block
    convs = [m for m in fast.modules() if isinstance(m, Conv1D)]
    assert len(convs) == 4 * 2 and all(type(m) is integration.FastarchConv1D for m in convs)
    assert sum("FastarchConv1D" in e.detail for e in report.swapped) == len(convs)
    ran = []
    real = integration.linear_or_none

    def spy(x, w, b, backend):
        y = real(x, w, b, backend)
        ran.append((x.numel() // x.shape[-1], y is not None))
        return y

    monkeypatch.setattr(integration, "linear_or_none", spy)
    ids, next_ids = torch.randint(1, VOCAB, (2, 9)), torch.randint(1, VOCAB, (2, 1))
    logits = []
    with torch.inference_mode():
        for m in (fast, model, exact):
            cache = DynamicCache(config=m.config)
            m(input_ids=ids, cache=cache, use_cache=True)
            logits.append(m(input_ids=next_ids, cache=cache, use_cache=True).logits[:, -1])
    # (2 rows of fp16 at level avx2 are PyTorch's: the kernel takes them from 3 there)
    kernel = fastarch.override.kernel_for("linear", ("cpu", dtype, 2, 32, 96, False, True), None) is not None
    assert ran == [(18, False)] * len(convs) + [(2, kernel)] * len(convs)
    assert kernel or dtype == torch.float16
    assert_close(*logits)
    if dtype == torch.float32:  # (16-bit near-ties of a random model may part)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            assert torch.equal(fast.generate(ids, **kw), model.generate(ids, **kw))
    fastarch.restore(fast)
    assert all(type(m) is Conv1D for m in convs)


def test_gpt2_conv1d_without_a_kernel_is_left_alone():
    """fp64: no fastarch linear kernel runs it, so the report says so and Conv1D stays."""
    from transformers.pytorch_utils import Conv1D

    model = _model("gpt2").double()
    report = fastarch.optimize(model)
    convs = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert len(convs) == 8 and all(type(m) is Conv1D for m in convs)
    left = [e for e in report.left_alone if e.kind == "Conv1D"]
    assert len(left) == 8 and all("no fastarch linear kernel runs it" in e.detail for e in left)


def _tiny(config_class, **extra):
    config = config_class(vocab_size=99, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["gemma2", "gpt-oss"])
def test_attention_options_without_a_kernel_stay_as_they_were(family):
    """Gemma 2's attention logit soft-capping and gpt-oss's attention sinks: no fastarch kernel,
    and SDPA refuses the first and would drop the second. optimize leaves those models'
    attention as it was (reported), swaps the rest, and generates the same tokens; asked for
    directly, "fastarch" attention is a clear error, not SDPA's results without them."""
    if family == "gemma2":
        model, option, what = _tiny(Gemma2Config), "softcap", "attn_logit_softcapping"
    else:
        model, option, what = _tiny(GptOssConfig, num_local_experts=2, num_experts_per_tok=1), "s_aux", "sinks"
    ids = torch.randint(1, 99, (2, 7))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        theirs = model.generate(ids, **kw)
    previous = model.config._attn_implementation
    report = fastarch.optimize(model)
    assert model.config._attn_implementation == previous
    (entry,) = report.left_alone
    assert entry.path == "(model)" and f"attention stays {previous!r}" in entry.detail and what in entry.detail
    assert report.swapped  # its norms and products are fastarch's
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, **kw), theirs)
    fastarch.restore(model)
    model.set_attn_implementation("fastarch")
    with pytest.raises(ValueError, match=f"{option} .* has no fastarch kernel"), torch.inference_mode():
        model.generate(ids, **kw)


def test_restore_sets_the_attention_back():
    model = _model("gpt2")
    ln = model.h[0].ln_1
    fastarch.optimize(model)
    assert model.config._attn_implementation == "fastarch" and type(model.h[0].ln_1) is LayerNorm
    fastarch.restore(model)
    assert model.config._attn_implementation == "sdpa" and model.h[0].ln_1 is ln


def test_t5_position_bias(monkeypatch):
    """T5's relative position bias reaches the attention as an additive mask: fastarch runs it
    in inference; with gradients on (the bias is learned) the call goes to SDPA."""
    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, dropout_rate=0.0)
    model = T5Model(config).eval()
    model.set_attn_implementation("sdpa")
    exact = copy.deepcopy(model).double()
    report = fastarch.optimize(model, inplace=False)
    fast = report.model
    assert fast.config._attn_implementation == "fastarch"
    # encoder: 2 per layer + the final one; decoder: 3 per layer + the final one
    assert sum(isinstance(m, HFRMSNorm) for m in fast.modules()) == (2 * 2 + 1) + (3 * 2 + 1)
    ids, mask = _inputs()
    dec = torch.randint(1, VOCAB, (2, 5))

    def run(m):
        return m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).last_hidden_state

    counting = _Counting(monkeypatch)
    with torch.no_grad():
        ours, theirs, ref = run(fast), run(model), run(exact)
    assert counting.calls == 3 * 2  # encoder self, decoder self and cross attention, 2 layers
    assert_close(ours, theirs, ref)
    calls = counting.calls
    with_grad = run(fast)
    # the self-attention's learned bias needs its gradient: SDPA ran those; the
    # cross-attention's bias is constant zeros: fastarch ran them
    assert counting.calls == calls + 2
    assert_close(with_grad.detach(), theirs, ref)
