"""A LLaMA model's layers in one C++ call (fastarch/models/llama_fused_step.py:
fastarch::_llama_decode_layers for a decode step, fastarch::_llama_prefill_layers for a prefill)
against the op-by-op loop: the same kernels in the same order, so the logits and the cache must
be equal bit for bit, for every layer variant a checkpoint can carry (GQA, biases, a sliding
window), fp32 and bf16, one and several rows (padded) and new tokens, and products on the
linear kernel, PyTorch's GEMM or oneDNN's matmul; and the one call is not taken where the
op-by-op loop must run (gradients, a forced backend, a parameter of another dtype)."""

from __future__ import annotations

import contextlib

import gpt2_tiny
import pytest
import torch
from test_llama import make

import fastarch
from fastarch import registry
from fastarch.models import from_pretrained
from fastarch.models import llama_fused_step as fused_step
from fastarch.ops.linear.backends import LinearProblem, cpu_product

VARIANTS = {
    "gqa": ("llama", {}),
    "mha-bias": ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "qwen2-qkv-bias": ("qwen2", {}),
    "mistral-window": ("mistral", dict(sliding_window=5)),
}
# (prompt lengths, new tokens per row in the step)
STEPS = {"1 row": ([9], 1), "3 rows": ([5, 12, 1], 1), "2 rows, 3 tokens": ([6, 11], 3), "8 rows": ([3] * 8, 1)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with gpt2_tiny.one_thread():
        yield


@pytest.fixture(autouse=True)
def _products_as_without_the_interpreter(monkeypatch):
    """The products the CPU kernel does not take on PyTorch's GEMM, as on a machine without
    TRITON_INTERPRET (under it the Triton kernel would take them, and the step runs op by op)."""
    table = [b for b in registry.backends_of("linear") if b.name != "triton"]
    monkeypatch.setitem(registry._REGISTRY, "linear", table)


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request, tmp_path_factory):
    family, kw = VARIANTS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    make(path, family, **kw)
    return from_pretrained(path)


@contextlib.contextmanager
def _answers(monkeypatch, name: str, one_call: bool):
    """fused_step.<name> as it is (one_call) or answering None (op by op): yields the list of
    its answers."""
    taken = []
    real = getattr(fused_step, name)

    def spy(*args):
        answer = real(*args) if one_call else None
        taken.append(answer)
        return answer

    with monkeypatch.context() as patch:
        patch.setattr(fused_step, name, spy)
        yield taken


def _step(model, lengths, n, *, one_call: bool, monkeypatch):
    """Prefill the prompts, then one decode step of n tokens per row: (logits, cache, what
    linear_in_one_call answered: None for op by op, else whether the products ran on the linear
    kernel)."""
    ids, mask = gpt2_tiny.prompts(lengths, "left")
    new = torch.randint(2, gpt2_tiny.VOCAB, (len(lengths), n), generator=torch.Generator().manual_seed(1))
    with _answers(monkeypatch, "linear_in_one_call", one_call) as taken:
        cache = model.new_cache(len(lengths), 24)
        with torch.inference_mode():
            model(ids, mask, cache=cache, last_only=True)
            logits = model(new, cache=cache)
    assert len(taken) == 1
    return logits, cache, taken[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("step", list(STEPS))
def test_one_call_equals_op_by_op(model, dtype, step, monkeypatch):
    model = model.to(dtype)
    lengths, n = STEPS[step]
    ours, cache, taken = _step(model, lengths, n, one_call=True, monkeypatch=monkeypatch)
    theirs, their_cache, _ = _step(model, lengths, n, one_call=False, monkeypatch=monkeypatch)
    assert taken is not None, "the step ran op by op"
    # the products where the registry puts them for this build's rows (bf16's 8 rows: PyTorch's
    # GEMM beside the AVX-512 kernels, the linear kernel at level avx2, where PyTorch's bf16
    # products convert)
    rows = len(lengths) * n
    kernel = registry.choose("linear", LinearProblem("cpu", dtype, rows, 64, 64, True), "").name == "cpu"
    assert taken is kernel, f"expected the products on {'the linear kernel' if kernel else 'PyTorch GEMM'}"
    assert torch.equal(ours, theirs)
    assert torch.equal(cache.seqlens, their_cache.seqlens) and cache.filled == their_cache.filled
    for layer in range(len(cache.k)):
        assert torch.equal(cache.k[layer], their_cache.k[layer]) and torch.equal(cache.v[layer], their_cache.v[layer])
    assert not ours.isnan().any()


# prompt lengths of a prefill (left-padded to the longest): 3 tokens take the bf16 linear
# kernel's rows; 40 take oneDNN's fp32 matmul where the registry chose it (AMD CPUs), and at
# level avx2 the bf16 products widened to fp32
PREFILLS = {"1 row": [9], "3 tokens": [3], "3 rows": [5, 12, 1], "an empty row": [0, 6, 3], "8 rows": [3] * 8,
            "40 tokens": [40]}


def _prefill(model, lengths, *, one_call: bool, cached: bool, monkeypatch):
    """(logits of every prompt token, the filled cache or None, what prefill_products answered)."""
    ids, mask = gpt2_tiny.prompts(lengths, "left")
    with _answers(monkeypatch, "prefill_products", one_call) as taken:
        cache = model.new_cache(len(lengths), 48) if cached else None
        with torch.inference_mode():
            logits = model(ids, mask, cache=cache)
    assert len(taken) == 1
    return logits, cache, taken[0]


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no cache"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("prompts", list(PREFILLS))
def test_prefill_in_one_call_equals_op_by_op(model, dtype, prompts, cached, monkeypatch):
    model = model.to(dtype)
    lengths = PREFILLS[prompts]
    ours, cache, taken = _prefill(model, lengths, one_call=True, cached=cached, monkeypatch=monkeypatch)
    theirs, their_cache, _ = _prefill(model, lengths, one_call=False, cached=cached, monkeypatch=monkeypatch)
    total = sum(lengths)
    expected = {"reference": "torch", "cpu": cpu_product(total, dtype)}[
        registry.choose("linear", LinearProblem("cpu", dtype, total, 64, 64, True), "").name]
    assert taken == fused_step.PRODUCTS[expected]
    assert torch.equal(ours, theirs)
    assert not ours.isnan().any()
    if cached:
        assert torch.equal(cache.seqlens, their_cache.seqlens) and cache.filled == their_cache.filled
        for layer in range(len(cache.k)):
            assert torch.equal(cache.k[layer], their_cache.k[layer]) and torch.equal(cache.v[layer], their_cache.v[layer])


def test_prefill_nan_in_gives_nan_out(model, monkeypatch):
    """A NaN in a prompt's hidden states (a NaN embedding row) reaches that row's logits
    through the one call, and no other row's."""
    model = model.float()
    ids, mask = gpt2_tiny.prompts([5, 12], "left")
    with torch.no_grad():
        saved = model.embed_tokens.weight[ids[1, -1]].clone()
        model.embed_tokens.weight[ids[1, -1], 3] = float("nan")
    try:
        ours, _, taken = _prefill(model, [5, 12], one_call=True, cached=True, monkeypatch=monkeypatch)
    finally:
        with torch.no_grad():
            model.embed_tokens.weight[ids[1, -1]] = saved
    assert taken is not None
    assert ours[1, -1].isnan().all() and not ours[0].isnan().any()


def test_prefill_not_taken_where_the_op_by_op_loop_must_run(model):
    model = model.float()
    x = torch.randn(7, model.config.hidden_size)
    with torch.inference_mode():
        assert fused_step.prefill_products(model, x, None, -1) is not None
        with fastarch.backend("reference"):
            assert fused_step.prefill_products(model, x, None, -1) is None
        assert fused_step.prefill_products(model, x[:0], None, -1) is None  # no token: op by op
        model.train()
        try:  # the attention's dropout
            assert fused_step.prefill_products(model, x, None, -1) is None
        finally:
            model.eval()
    with torch.enable_grad():
        assert fused_step.prefill_products(model, x, None, -1) is None
    cache = model.new_cache(1, 24, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert fused_step.prefill_products(model, x, cache, -1) is None  # the op-by-op loop names the dtype


def test_nan_in_gives_nan_out(model, monkeypatch):
    """A NaN weight reaches the logits through the one call as through the op-by-op loop."""
    model = model.float()
    with torch.no_grad():
        saved = model.layers[1].o_proj.weight[0, 0].item()
        model.layers[1].o_proj.weight[0, 0] = float("nan")
    try:
        ours, _, taken = _step(model, [5, 12], 1, one_call=True, monkeypatch=monkeypatch)
    finally:
        with torch.no_grad():
            model.layers[1].o_proj.weight[0, 0] = saved
    assert taken is not None and ours.isnan().all()


def test_not_taken_where_the_op_by_op_loop_must_run(model):
    model = model.float()
    cache = model.new_cache(2, 24)
    x = torch.randn(2, model.config.hidden_size)
    with torch.inference_mode():
        assert fused_step.linear_in_one_call(model, x, cache, -1) is not None
        with fastarch.backend("reference"):  # a forced backend: every op on it, one by one
            assert fused_step.linear_in_one_call(model, x, cache, -1) is None
    with torch.enable_grad():  # gradients need torch's dispatcher
        assert fused_step.linear_in_one_call(model, x, cache, -1) is None
    assert fused_step.step_arguments(model, torch.float32) is not None
    assert fused_step.step_arguments(model, torch.bfloat16) is None  # parameters of another dtype


def test_a_parameter_of_another_dtype_is_still_an_error(model):
    """The one call declines a mixed model; the op-by-op loop then names the mismatch."""
    model = model.float()
    cache = model.new_cache(1, 24)
    ids, mask = gpt2_tiny.prompts([4], "left")
    down = model.layers[0].down_proj
    weight = down.weight
    down.weight = torch.nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
    try:
        with torch.inference_mode():
            with pytest.raises(TypeError, match="weight must have x's dtype"):
                model(ids, mask, cache=cache, last_only=True)
    finally:
        down.weight = weight


def test_a_cache_of_another_dtype_is_still_an_error(model):
    model = model.float()
    ids, mask = gpt2_tiny.prompts([4, 6], "left")
    cache = model.new_cache(2, 24, dtype=torch.bfloat16)
    x = torch.randn(2, model.config.hidden_size)
    with torch.inference_mode():
        assert fused_step.linear_in_one_call(model, x, cache, -1) is None
        with pytest.raises(TypeError, match="k_cache's dtype"):
            model(ids, mask, cache=cache, last_only=True)


class _Same(torch.nn.Module):
    def forward(self, w):
        return w


def test_a_parametrized_weight_runs_op_by_op(model, monkeypatch):
    """A parametrization computes the weight on access (no plain parameter to hand to C++): the
    step runs op by op, with the same logits."""
    from torch.nn.utils import parametrize

    model = model.float()
    before, _, taken = _step(model, [5, 12], 1, one_call=True, monkeypatch=monkeypatch)
    assert taken is not None
    parametrize.register_parametrization(model.layers[0].o_proj, "weight", _Same())
    try:
        assert fused_step.step_arguments(model, torch.float32) is None
        after, _, _ = _step(model, [5, 12], 1, one_call=True, monkeypatch=monkeypatch)
    finally:
        parametrize.remove_parametrizations(model.layers[0].o_proj, "weight")
    assert torch.equal(after, before)


def _decode_run(model, weight_after: int | None, monkeypatch, *, one_call: bool):
    """Prefill two prompts and take 3 decode steps on one cache; then (weight_after: a factor)
    scale layer 1's o_proj weight by a new parameter and take a fourth. (the steps' logits, how
    often linear_in_one_call was asked)."""
    ids, mask = gpt2_tiny.prompts([5, 9], "left")
    cache = model.new_cache(2, 24)
    o_proj = model.layers[1].o_proj
    weight = o_proj.weight
    with _answers(monkeypatch, "linear_in_one_call", one_call) as taken, torch.inference_mode():
        model(ids, mask, cache=cache, last_only=True)
        logits = [model(torch.tensor([[3 + i], [4 + i]]), cache=cache) for i in range(3)]
        o_proj.weight = torch.nn.Parameter(weight * weight_after, requires_grad=False)
        try:
            logits.append(model(torch.tensor([[9], [7]]), cache=cache))
        finally:
            o_proj.weight = weight
    return logits, len(taken)


def test_the_plan_is_remembered_until_a_parameter_changes(model, monkeypatch):
    """decode_plan asks linear_in_one_call (and gathers the weights) once per model and cache,
    not at every step; a parameter set on a layer makes it ask again, and the step after it runs
    the new weight, as the op-by-op loop does."""
    model = model.float()
    ours, asked = _decode_run(model, 2, monkeypatch, one_call=True)
    theirs, _ = _decode_run(model, 2, monkeypatch, one_call=False)
    assert asked == 2  # the first step, and the one after the new parameter
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert not torch.equal(ours[3], _decode_run(model, 1, monkeypatch, one_call=True)[0][3])


def test_the_plan_is_asked_again_after_a_conversion_or_a_forced_backend(model):
    model = model.float()
    cache = model.new_cache(2, 24)
    x = torch.randn(2, model.config.hidden_size)
    with torch.inference_mode():
        plan = fused_step.decode_plan(model, x, cache, -1)
        assert plan is not None and fused_step.decode_plan(model, x, cache, -1) is plan
        with fastarch.backend("reference"):
            assert fused_step.decode_plan(model, x, cache, -1) is None
        model.float()  # Llama._apply forgets the plans (its parameters may be new objects)
        again = fused_step.decode_plan(model, x, cache, -1)
        assert again is not None and again is not plan
    with torch.enable_grad():
        assert fused_step.decode_plan(model, x, cache, -1) is None


def test_the_loop_checks_its_weights(model):
    """The C++ loop names a weight that is not a contiguous CPU tensor of x's dtype (a
    parameter's .data replaced in place, which the remembered plan does not see)."""
    model = model.float()
    cache = model.new_cache(1, 24)
    x = torch.randn(1, model.config.hidden_size)
    weights, quants, biases, eps = fused_step.step_arguments(model, torch.float32)
    cos, sin = model._rope(x.device)

    def call(ws):
        offsets = cache.seqlens.long()
        return torch.ops.fastarch._llama_decode_layers(
            x, ws, quants, biases, cache.k, cache.v, cos, sin, offsets, cache.seqlens, cache.seqlens + 1, eps, 1,
            model.n_head, model.n_kv, model.head_dim, model.head_dim**-0.5, -1, True)

    with torch.inference_mode():
        assert call(weights).shape == x.shape
        o = [i for i, w in enumerate(weights) if w is model.layers[0].o_proj.weight][0]
        with pytest.raises(RuntimeError, match=f"weight {o} must be a contiguous CPU tensor"):
            call([*weights[:o], weights[o].t().contiguous().t(), *weights[o + 1:]])
        with pytest.raises(RuntimeError, match=f"weight {o} is BFloat16 with quant 0"):
            call([*weights[:o], weights[o].bfloat16(), *weights[o + 1:]])
