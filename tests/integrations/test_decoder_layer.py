"""FastarchLlamaDecoderLayer, its Mistral/Qwen2/Qwen3/Gemma/Gemma 3 siblings, FastarchGPT2Block,
FastarchGPTNeoXLayer and FastarchOPTDecoderLayer (fastarch/integrations/decoder_layer.py): fastarch.optimize turns a
model's decoder layers into ones whose decode step runs as one function of fastarch's kernels,
with transformers' cache. Judged as the other drop-in paths are (dropin_tolerance.py: against
the fp64 model, at most a small factor of torch's own error), plus where the step may not run:
each condition falls back to transformers' layer, whose result is checked too."""

from __future__ import annotations

import copy

import pytest
import torch
from dropin_tolerance import assert_close  # tests/integrations/dropin_tolerance.py
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.opt.modeling_opt import OPTDecoderLayer

import fastarch
from fastarch.integrations import decoder_layer
from fastarch.integrations.decoder_layer import FUSED, FastarchLlamaDecoderLayer

VOCAB = 99
LAYERS = 2
# Qwen2 has q/k/v biases, Qwen3 per-head q/k norms; Mistral is LLaMA's layer with a window;
# Gemma's norms multiply by 1 + weight and its MLP is GELU-gated; Gemma 3 adds q/k norms, norms
# after the attention and the MLP, a query scale of its own and sliding layers with their own
# rotary table
FAMILIES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
            "gemma": GemmaConfig, "gemma3": Gemma3TextConfig}


def _model(family: str = "llama", **config):
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    if family == "mistral":
        cfg["sliding_window"] = None  # its default, 4096, is a window no step here reaches
    if family == "gemma":
        cfg["hidden_act"] = "gelu_pytorch_tanh"
    if family == "gemma3":  # (a sliding layer, then a full one; query_pre_attn_scalar 256: scale 1/16)
        cfg |= dict(layer_types=["sliding_attention", "full_attention"], sliding_window=64)
    return _perturbed(FAMILIES[family](**(cfg | config)))


def _perturbed(config):
    """A small random causal LM whose norm weights and biases are not their initial 1s and 0s
    (a step that skipped one would pass with those)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif name.endswith("weight") and ("norm" in name or ".ln_" in name):
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model


class _Steps:
    """Counts the decode steps the fused path ran (and those it handed back to the layer)."""

    step = decoder_layer._Step

    def __init__(self, mp):
        self.fused = self.declined = 0
        real = self.step.run

        def run(step, *args):
            out = real(step, *args)
            if out is None:
                self.declined += 1
            else:
                self.fused += 1
            return out

        mp.setattr(self.step, "run", run)


def _prefill_and_step(model, ids, next_ids, dtype=None):
    """Logits of one decode step after a prefill, through transformers' DynamicCache."""
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, cache=cache, use_cache=True)
    return model(input_ids=next_ids, cache=cache, use_cache=True).logits, cache


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_matches_transformers(family, dtype, batch, monkeypatch):
    _fused_step_matches(_model(family), dtype, lambda m: m.model.layers, _Steps(monkeypatch), batch, kv_heads=2)


def _fused_step_matches(model, dtype, layers, steps: _Steps, batch: int, kv_heads: int) -> None:
    """optimize makes each of layers(model) its fused class (reported); then one decode step
    after a 9-token prefill: the fused step ran in every layer (the prefill is transformers'
    layer), its logits and the keys and values it put into transformers' cache (as its own
    layer puts them) judged against the fp64 model's."""
    exact = copy.deepcopy(model).double()
    model.to(dtype)
    fused = FUSED[type(layers(model)[0])]
    report = fastarch.optimize(model, inplace=False)
    fast = report.model
    assert [type(layer) for layer in layers(fast)] == [fused] * LAYERS
    assert sum(fused.__name__ in e.detail for e in report.swapped) == LAYERS
    ids, next_ids = torch.randint(1, VOCAB, (batch, 9)), torch.randint(1, VOCAB, (batch, 1))
    with torch.inference_mode():
        ours, our_cache = _prefill_and_step(fast, ids, next_ids)
        theirs, their_cache = _prefill_and_step(model, ids, next_ids)
        ref, exact_cache = _prefill_and_step(exact, ids, next_ids)
    assert (steps.fused, steps.declined) == (LAYERS, 0)
    assert_close(ours[:, -1], theirs[:, -1], ref[:, -1])
    for mine, its, exact_layer in zip(our_cache.layers, their_cache.layers, exact_cache.layers):
        assert mine.keys.shape == its.keys.shape == (batch, kv_heads, 10, 8)
        assert_close(mine.keys, its.keys, exact_layer.keys)
        assert_close(mine.values, its.values, exact_layer.values)


def test_positions_differ_per_sequence(monkeypatch):
    """position_ids given per sequence (no mask): each row rotates by its own angle."""
    model = _model()
    exact = copy.deepcopy(model).double()
    fast = fastarch.optimize(model, inplace=False).model
    ids, next_ids = torch.randint(1, VOCAB, (3, 9)), torch.randint(1, VOCAB, (3, 1))
    positions = torch.tensor([[9], [30], [17]])
    steps = _Steps(monkeypatch)
    logits = []
    with torch.inference_mode():
        for m in (fast, model, exact):
            cache = DynamicCache(config=m.config)
            m(input_ids=ids, cache=cache, use_cache=True)
            logits.append(m(input_ids=next_ids, cache=cache, use_cache=True, position_ids=positions).logits[:, -1])
    assert steps.fused == LAYERS
    assert_close(*logits)


@pytest.mark.parametrize(("family", "cache"), [("llama", "dynamic"), ("llama", "static"), ("mistral", "dynamic"),
                                             ("qwen2", "dynamic"), ("qwen3", "dynamic"), ("gemma", "dynamic"),
                                             ("gemma3", "dynamic"), ("gemma3", "static")])
def test_greedy_generation_equals_transformers(family, cache, monkeypatch):
    model = _model(family)
    fast = fastarch.optimize(model, inplace=False).model
    ids = torch.randint(1, VOCAB, (2, 7))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0,
              cache_implementation=cache)
    steps = _Steps(monkeypatch)
    with torch.inference_mode():
        theirs, ours = model.generate(ids, **kw), fast.generate(ids, **kw)
    assert torch.equal(ours, theirs)
    # every token after the prompt's (a static cache's empty slots masked in the step's attention)
    assert steps.fused == LAYERS * 11


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_padded_batch_takes_the_mask(family, monkeypatch):
    """Left padding gives the step an attention mask: the fused step passes it to the attention
    (fastarch's masked path); its logits are judged against the fp64 model's, and greedy
    generation gives transformers' tokens."""
    _padded_step_and_generation(_model(family), _Steps(monkeypatch))


def _padded_step_and_generation(model, steps: _Steps) -> None:
    """A left-padded batch of two: one step after the prefill (the fused step ran in every
    layer) with logits judged against the fp64 model's, then 6 greedy tokens equal to
    transformers' (5 more fused steps per layer)."""
    exact = copy.deepcopy(model).double()
    fast = fastarch.optimize(model, inplace=False).model
    ids = torch.randint(1, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    logits = []
    with torch.inference_mode():
        for m in (fast, model, exact):
            cache = DynamicCache(config=m.config)
            m(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
            step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            logits.append(m(input_ids=ids[:, :1], attention_mask=step_mask, cache=cache, use_cache=True).logits[:, -1])
        assert steps.fused == LAYERS
        assert_close(*logits)
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(fast.generate(ids, **kw), model.generate(ids, **kw))
    assert steps.fused == LAYERS + LAYERS * 5


def _one_step_fused(model, monkeypatch, grad: bool = False) -> int:
    steps = _Steps(monkeypatch)
    ids, next_ids = torch.randint(1, VOCAB, (1, 5)), torch.randint(1, VOCAB, (1, 1))
    with torch.set_grad_enabled(grad):
        _prefill_and_step(model, ids, next_ids)
    return steps.fused


def test_conditions_that_run_the_layer(monkeypatch):
    model = _model()
    fast = fastarch.optimize(model, inplace=False).model
    assert _one_step_fused(fast, monkeypatch) == LAYERS
    assert _one_step_fused(fast, monkeypatch, grad=True) == 0  # autograd: the layer's own ops
    handle = fast.model.layers[1].self_attn.o_proj.register_forward_hook(lambda *a: None)
    assert _one_step_fused(fast, monkeypatch) == LAYERS - 1  # a hooked part: that layer runs as it is
    handle.remove()
    fast.set_attn_implementation("sdpa")
    assert _one_step_fused(fast, monkeypatch) == 0  # the attention is not fastarch's
    fast.set_attn_implementation("fastarch")
    assert _one_step_fused(fast, monkeypatch) == LAYERS


def test_rotary_tables_of_another_layout_run_the_layer(monkeypatch):
    """cos/sin whose two halves differ are not LLaMA's rotate_half tables: the layer's own
    rotary code runs them."""
    model = _model()
    fast = fastarch.optimize(model, inplace=False).model
    ids, next_ids = torch.randint(1, VOCAB, (1, 5)), torch.randint(1, VOCAB, (1, 1))
    logits = []
    for m in (fast, model):
        real = m.model.rotary_emb.forward

        def skewed(x, position_ids, real=real):
            cos, sin = real(x, position_ids)
            return cos * torch.linspace(0.5, 1.0, cos.shape[-1]), sin

        monkeypatch.setattr(m.model.rotary_emb, "forward", skewed)
    steps = _Steps(monkeypatch)
    with torch.inference_mode():
        logits = [_prefill_and_step(m, ids, next_ids)[0] for m in (fast, model)]
    assert steps.fused == 0 and steps.declined == 0
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_a_replaced_projection_is_run(monkeypatch):
    """A projection replaced after optimize (as a LoRA wrapper replaces it) runs: the step
    hands that layer back to transformers' code, which calls the new module."""
    model = _model()
    fast = fastarch.optimize(model, inplace=False).model
    ids, next_ids = torch.randint(1, VOCAB, (1, 5)), torch.randint(1, VOCAB, (1, 1))

    class Shifted(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + 1.0

    with torch.inference_mode():
        before, _ = _prefill_and_step(fast, ids, next_ids)
        for m in (fast, model):
            m.model.layers[0].mlp.down_proj = Shifted(m.model.layers[0].mlp.down_proj)
        steps = _Steps(monkeypatch)
        ours, _ = _prefill_and_step(fast, ids, next_ids)
        theirs, _ = _prefill_and_step(model, ids, next_ids)
    assert steps.fused == LAYERS - 1
    assert (ours - before).abs().max() > 0.1  # the wrapper ran
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_nan_in_gives_nan_out(family, monkeypatch):
    model = _model(family)
    fast = fastarch.optimize(model, inplace=False).model
    with torch.no_grad():
        fast.model.embed_tokens.weight[7] = float("nan")
    ids = torch.randint(8, VOCAB, (2, 5))
    steps = _Steps(monkeypatch)
    with torch.inference_mode():
        logits, _ = _prefill_and_step(fast, ids, torch.tensor([[7], [9]]))
    assert steps.fused == LAYERS
    # (Gemma's head is the embedding: token 7's logit is NaN in every row)
    others = logits[1, :, torch.arange(VOCAB) != 7] if fast.config.tie_word_embeddings else logits[1]
    assert logits[0].isnan().all() and not others.isnan().any()


def test_forced_reference_backend(monkeypatch):
    """optimize(backend=...) reaches the step's kernels: the reference backend's give the
    same logits within fp32's rounding."""
    model = _model()
    fast = fastarch.optimize(model, inplace=False).model
    ref = fastarch.optimize(model, inplace=False, backend="reference").model
    ids, next_ids = torch.randint(1, VOCAB, (2, 6)), torch.randint(1, VOCAB, (2, 1))
    steps = _Steps(monkeypatch)
    with torch.inference_mode():
        ours, _ = _prefill_and_step(fast, ids, next_ids)
        reference, _ = _prefill_and_step(ref, ids, next_ids)
    assert steps.fused == 2 * LAYERS
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_restore_and_state_dict(family):
    model = _model(family)
    plain, layers = type(model.model.layers[0]), list(model.model.layers)
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    fastarch.optimize(model)
    assert type(model.model.layers[0]) is FUSED[plain]
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys
    fastarch.restore(model)
    assert [type(layer) for layer in model.model.layers] == [plain] * LAYERS
    assert list(model.model.layers) == layers  # the same objects


def test_every_fused_class_is_its_layer():
    assert FUSED[LlamaDecoderLayer] is FastarchLlamaDecoderLayer
    for plain, fused in FUSED.items():
        assert issubclass(fused, plain) and fused.forward is not plain.forward


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma3"])
def test_sliding_window(family, monkeypatch):
    """A window shorter than the text: steps whose keys the window cuts get a mask from
    transformers, which the fused step passes to the attention; greedy tokens equal."""
    window = dict(sliding_window=6) | ({"use_sliding_window": True, "max_window_layers": 0} if family == "qwen2" else {})
    model = _model(family, **window)
    fast = fastarch.optimize(model, inplace=False).model
    ids = torch.randint(1, VOCAB, (2, 3))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    steps = _Steps(monkeypatch)
    with torch.inference_mode():
        assert torch.equal(fast.generate(ids, **kw), model.generate(ids, **kw))
    assert steps.fused == LAYERS * 11


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_on_cuda(family, dtype, monkeypatch):
    """The step on the GPU: fastarch's CUDA/Triton kernels, transformers' cache on the device."""
    model = _model(family).cuda()
    exact = copy.deepcopy(model).double()
    model.to(dtype)
    fast = fastarch.optimize(model, inplace=False).model
    ids = torch.randint(1, VOCAB, (3, 9), device="cuda")
    next_ids = torch.randint(1, VOCAB, (3, 1), device="cuda")
    steps = _Steps(monkeypatch)
    with torch.inference_mode():
        ours, _ = _prefill_and_step(fast, ids, next_ids)
        theirs, _ = _prefill_and_step(model, ids, next_ids)
        ref, _ = _prefill_and_step(exact, ids, next_ids)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
        if dtype == torch.float32:  # greedy tokens: bf16's near-ties may part, as on the CPU
            assert torch.equal(fast.generate(ids, **kw), model.generate(ids, **kw))
    assert steps.fused >= LAYERS
    assert_close(ours[:, -1], theirs[:, -1], ref[:, -1])


# ----------------------------------------------------------------------------- GPT-2


def _gpt2(**config):
    cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64, resid_pdrop=0.0,
               embd_pdrop=0.0, attn_pdrop=0.0)
    return _perturbed(GPT2Config(**(cfg | config)))


class _GPT2Steps(_Steps):
    """_Steps of GPT2Block's step."""

    step = decoder_layer._GPT2Step


def _generates_fused(model, steps: _Steps, ids):
    """fastarch.optimize's copy of model, after greedy generation of 10 tokens from ids equal to
    transformers' (the 9 steps after the prefill fused in every layer)."""
    fast = fastarch.optimize(model, inplace=False).model
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        assert torch.equal(fast.generate(ids, **kw), model.generate(ids, **kw))
    assert steps.fused == LAYERS * 9
    return fast


def test_gpt2_generation_padding_grad_nan_and_restore(monkeypatch):
    model = _gpt2()
    ids = torch.randint(1, VOCAB, (2, 7))
    steps = _GPT2Steps(monkeypatch)
    fast = _generates_fused(model, steps, ids)
    padded = torch.ones_like(ids)
    padded[0, :2] = 0  # left padding: a mask every step, passed to the step's attention
    kw = dict(attention_mask=padded, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        assert torch.equal(fast.generate(ids, **kw), model.generate(ids, **kw))
    assert steps.fused == LAYERS * 18
    _prefill_and_step(fast, ids, ids[:, :1])  # with gradients on: the block's own code
    assert steps.fused == LAYERS * 18
    with torch.no_grad():
        fast.transformer.wte.weight[7] = float("nan")
    with torch.inference_mode():
        logits, _ = _prefill_and_step(fast, torch.randint(8, VOCAB, (2, 5)), torch.tensor([[7], [9]]))
    assert steps.fused == LAYERS * 19
    # (GPT-2's head is the embedding: every row's logit of token 7 is NaN too)
    assert logits[0, -1].isnan().all() and logits[1, -1].isnan().nonzero().flatten().tolist() == [7]
    fastarch.restore(fast)
    assert [type(b) for b in fast.transformer.h] == [GPT2Block] * LAYERS


# ----------------------------------------------------------------------------- GPT-NeoX


def _neox(**config):
    """Pythia's layer: partial rotary, the parallel residual by default."""
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
               num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5)
    return _perturbed(GPTNeoXConfig(**(cfg | config)))


class _GPTNeoXSteps(_Steps):
    """_Steps of GPTNeoXLayer's step."""

    step = decoder_layer._GPTNeoXStep


def test_gpt_neox_generation_positions_and_restore(monkeypatch):
    model = _neox()
    exact = copy.deepcopy(model).double()
    ids = torch.randint(1, VOCAB, (2, 7))
    steps = _GPTNeoXSteps(monkeypatch)
    fast = _generates_fused(model, steps, ids)
    positions = torch.tensor([[9], [30]])  # per sequence: each row rotates by its own angle
    logits = []
    with torch.inference_mode():
        for m in (fast, model, exact):
            cache = DynamicCache(config=m.config)
            m(input_ids=ids, cache=cache, use_cache=True)
            logits.append(m(input_ids=ids[:, :1], cache=cache, use_cache=True, position_ids=positions).logits[:, -1])
    assert steps.fused == LAYERS * 10
    assert_close(*logits)
    fastarch.restore(fast)
    assert [type(layer) for layer in fast.gpt_neox.layers] == [GPTNeoXLayer] * LAYERS


def _opt(**config):
    """OPT-125m's layer (pre-norm) by default; do_layer_norm_before=False is OPT-350m's."""
    cfg = dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=LAYERS, num_attention_heads=4,
               max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0)
    return _perturbed(OPTConfig(**(cfg | config)))


class _OPTSteps(_Steps):
    """_Steps of OPTDecoderLayer's step."""

    step = decoder_layer._OPTStep


def test_opt_generation_and_restore(monkeypatch):
    fast = _generates_fused(_opt(), _OPTSteps(monkeypatch), torch.randint(1, VOCAB, (2, 7)))
    fastarch.restore(fast)
    assert [type(layer) for layer in fast.model.decoder.layers] == [OPTDecoderLayer] * LAYERS


# GPT-2 with each activation its configs use; GPT-NeoX with the parallel residual and without;
# OPT pre-norm and post-norm
GPT_STYLE = {
    "gpt2-gelu_new": lambda: (_gpt2(activation_function="gelu_new"), lambda m: m.transformer.h, _GPT2Steps),
    "gpt2-gelu_pytorch_tanh": lambda: (_gpt2(activation_function="gelu_pytorch_tanh"), lambda m: m.transformer.h,
                                       _GPT2Steps),
    "gpt2-gelu": lambda: (_gpt2(activation_function="gelu"), lambda m: m.transformer.h, _GPT2Steps),
    "neox-parallel": lambda: (_neox(use_parallel_residual=True), lambda m: m.gpt_neox.layers, _GPTNeoXSteps),
    "neox-sequential": lambda: (_neox(use_parallel_residual=False), lambda m: m.gpt_neox.layers, _GPTNeoXSteps),
    "opt-pre-norm": lambda: (_opt(), lambda m: m.model.decoder.layers, _OPTSteps),
    "opt-post-norm": lambda: (_opt(do_layer_norm_before=False), lambda m: m.model.decoder.layers, _OPTSteps),
}


@pytest.mark.parametrize("kind", GPT_STYLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
def test_gpt_style_decode_step_matches_transformers(kind, dtype, batch, monkeypatch):
    model, layers, steps = GPT_STYLE[kind]()
    _fused_step_matches(model, dtype, layers, steps(monkeypatch), batch, kv_heads=4)


@pytest.mark.parametrize("kind", ["gpt2-gelu_new", "neox-parallel", "opt-pre-norm"])
def test_gpt_style_padded_batch_takes_the_mask(kind, monkeypatch):
    """Left padding: GPT-2's, GPT-NeoX's and OPT's fused steps pass the mask to the attention;
    one step's logits against the fp64 model's, and transformers' greedy tokens."""
    model, _, steps = GPT_STYLE[kind]()
    _padded_step_and_generation(model, steps(monkeypatch))
