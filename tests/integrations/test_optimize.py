"""fastarch.optimize / fastarch.restore on plain torch models and Hugging Face-style norm layers:
what is swapped and what is left alone (and the report says why), the same Parameter objects,
outputs and gradients against fp64 (dropin_tolerance.py), restore, inplace=False, torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
from dropin_tolerance import assert_close  # tests/integrations/dropin_tolerance.py
from torch import nn

import fastarch
from fastarch import registry
from fastarch.ops.linear import backends as linear_backends
from fastarch.optimize import (
    FoldedSiLU, GroupNorm, GroupNormSiLU, HFRMSNorm, LayerNorm, Linear, MultiheadAttention, RMSNorm, group_norm_direct,
)


# Hugging Face's RMSNorm layers, as transformers writes them (LLaMA: round the normalized
# value to the input dtype, then multiply; T5: round to the weight's half dtype; Gemma:
# (1 + weight) in fp32, its attribute eps).
class LlamaStyleRMSNorm(nn.Module):
    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class T5StyleLayerNorm(LlamaStyleRMSNorm):
    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class GemmaStyleRMSNorm(nn.Module):
    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class TwoPlusRMSNorm(GemmaStyleRMSNorm):
    """An RMSNorm-style layer of another formula: left alone."""

    def forward(self, x):
        return super().forward(x) + x * 0.25


class Block(nn.Module):
    """A pre-norm transformer block using every layer optimize knows, and one it does not."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.rms = nn.RMSNorm(d, eps=1e-6)
        self.llama = LlamaStyleRMSNorm(d)
        self.t5 = T5StyleLayerNorm(d)
        self.gemma = GemmaStyleRMSNorm(d)
        self.ln2d = nn.LayerNorm((4, 8))
        self.plain = nn.LayerNorm(d, elementwise_affine=False)
        self.group = nn.GroupNorm(4, d)
        self.fc = nn.Linear(d, d)
        with torch.no_grad():
            for m in (self.ln, self.rms, self.llama, self.t5, self.ln2d):
                m.weight.uniform_(0.5, 1.5)
            self.gemma.weight.uniform_(-0.5, 0.5)  # stored as the difference from 1
            self.ln.bias.uniform_(-0.5, 0.5)

    def forward(self, x, mask=None):
        h = self.ln(x)
        a, _ = self.attn(h, h, h, key_padding_mask=mask, need_weights=False)
        x = x + a
        x = self.llama(self.rms(x)) + self.t5(x) + self.gemma(x)
        x = x + self.ln2d(x.unflatten(-1, (4, 8))).flatten(-2)
        x = self.plain(x)
        x = self.group(x.transpose(1, 2)).transpose(1, 2)
        return self.fc(x)


def _params(model):
    return {name: p for name, p in model.named_parameters()}


def test_swaps_and_reports():
    model = Block()
    before = dict(model.state_dict())
    params = _params(model)
    modules = dict(model.named_children())
    report = fastarch.optimize(model)
    kinds = {name: type(m) for name, m in model.named_children()}
    assert kinds["ln"] is LayerNorm and kinds["ln2d"] is LayerNorm and kinds["plain"] is LayerNorm
    assert kinds["rms"] is RMSNorm and kinds["attn"] is MultiheadAttention
    assert kinds["llama"] is HFRMSNorm and kinds["t5"] is HFRMSNorm and kinds["group"] is GroupNorm
    assert kinds["fc"] is Linear and kinds["gemma"] is HFRMSNorm
    assert model.llama.weight_offset == 0.0 and model.gemma.weight_offset == 1.0 and model.gemma.eps == 1e-6
    swapped = {e.path for e in report.swapped}
    assert swapped == {"ln", "attn", "rms", "llama", "t5", "gemma", "ln2d", "plain", "group", "fc"}
    assert not report.left_alone
    text = str(report)
    assert "swapped" in text and "gemma" in text and "fastarch" in text
    # the same Parameter objects under the same state_dict keys
    assert _params(model).keys() == params.keys()
    assert all(_params(model)[k] is p for k, p in params.items())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(after[k].data_ptr() == before[k].data_ptr() for k in before)
    assert isinstance(model.ln, nn.LayerNorm) and isinstance(model.attn, nn.MultiheadAttention)


def test_restore_gives_the_same_objects():
    model = Block()
    originals = dict(model.named_modules())
    fastarch.optimize(model)
    assert fastarch.restore(model) is model
    assert all(m is originals[name] for name, m in model.named_modules())
    assert all(m is originals[name] for name, m in dict(model.named_modules()).items())
    assert model.ln.weight is originals["ln"].weight


def test_rms_norm_of_another_formula_is_left_alone():
    model = nn.Sequential(TwoPlusRMSNorm(8), GemmaStyleRMSNorm(8))
    report = fastarch.optimize(model)
    assert type(model[0]) is TwoPlusRMSNorm and type(model[1]) is HFRMSNorm
    why = {e.path: e.detail for e in report.left_alone}
    assert "differs from x * rsqrt(mean(x^2) + eps) * weight (or * (1 + weight))" in why["0"]


def test_hooks_and_subclasses_are_left_alone():
    class MyLayerNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.LayerNorm(8), MyLayerNorm(8), nn.LayerNorm(8))
    model[0].register_forward_hook(lambda m, i, o: o)
    kept = list(model)
    report = fastarch.optimize(model)
    assert model[0] is kept[0] and model[1] is kept[1] and type(model[2]) is LayerNorm
    why = {e.path: e.detail for e in report.left_alone}
    assert "hooks" in why["0"] and "subclass" in why["1"]


def test_shared_module_swapped_once():
    ln = nn.LayerNorm(8)
    model = nn.Sequential(ln, nn.ReLU(), ln)
    fastarch.optimize(model)
    assert model[0] is model[2] and type(model[0]) is LayerNorm


def _conv_stack():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(), nn.Conv2d(16, 8, 1),
                          nn.GroupNorm(2, 8), nn.ReLU(), nn.GroupNorm(2, 8), nn.SiLU())
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_and_silu_fold(dtype):
    """A Sequential's GroupNorm + SiLU become one GroupNormSiLU (the SiLU's slot a FoldedSiLU);
    a GroupNorm before another activation is swapped alone. Outputs and gradients against
    the unmodified model, judged against fp64; restore gives back the same objects."""
    model = _conv_stack().to(dtype)
    originals = list(model)
    exact = copy.deepcopy(model).double()
    report = fastarch.optimize(model, inplace=False)
    fast = report.model
    assert [type(m) for m in fast] == [fastarch.nn.Conv2d, GroupNormSiLU, FoldedSiLU, fastarch.nn.Conv2d, GroupNorm,
                                       nn.ReLU, GroupNormSiLU, FoldedSiLU]
    assert fast[1].weight is report.model[1].weight and fast.state_dict().keys() == model.state_dict().keys()
    assert {e.path for e in report.swapped} >= {"1", "2", "4", "6", "7"}
    x = torch.randn(2, 3, 9, 7)
    results = []
    for m, dt in ((model, dtype), (fast, dtype), (exact, torch.float64)):
        m.zero_grad()
        y = m(x.to(dt))
        y.double().square().sum().backward()
        results.append((y, {n: p.grad for n, p in m.named_parameters()}))
    (theirs, g_theirs), (ours, g_ours), (ref, g_ref) = results
    assert_close(ours, theirs, ref)
    for name in g_ref:
        assert_close(g_ours[name], g_theirs[name], g_ref[name], factor=3.0)
    with torch.no_grad():  # inference: the convolutions on their packed weights
        assert_close(fast(x.to(dtype)), model(x.to(dtype)), exact(x.double()))
    fastarch.restore(model)
    fastarch.optimize(model)
    fastarch.restore(model)
    assert all(a is b for a, b in zip(model, originals))


def test_conv2d_swap():
    """nn.Conv2d -> fastarch.nn.Conv2d sharing its parameters: without autograd the packed
    oneDNN path (a different summation order: within a few ulps), with autograd torch's
    conv2d (the same bits); a circular padding mode, fp16, or a subclass stay as they were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, groups=2, bias=False),
                          nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"))
    weight = model[0].weight
    fast = model
    model = copy.deepcopy(fast)  # the unmodified reference
    report = fastarch.optimize(fast)
    assert [type(m) for m in fast] == [fastarch.nn.Conv2d, fastarch.nn.Conv2d, nn.Conv2d]
    assert fast[0].weight is weight and "padding_mode 'circular'" in report.left_alone[0].detail
    x = torch.randn(2, 4, 11, 9)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    y = fast(x.requires_grad_())
    torch.testing.assert_close(y, model(x), rtol=0, atol=0)
    half = fastarch.optimize(nn.Sequential(nn.Conv2d(4, 4, 1)).half())
    assert "float16 on cpu" in half.left_alone[0].detail


def test_group_norm_fold_needs_a_plain_silu():
    model = _conv_stack()
    model[2].register_forward_hook(lambda m, i, o: o)  # a hooked SiLU stays a SiLU
    shared = nn.GroupNorm(2, 8)
    other = nn.Sequential(shared, nn.SiLU(), shared, nn.ReLU())  # a GroupNorm used twice is not fused
    fastarch.optimize(model)
    fastarch.optimize(other)
    assert type(model[1]) is GroupNorm and type(model[2]) is nn.SiLU
    assert type(other[0]) is GroupNorm and other[0] is other[2] and type(other[1]) is nn.SiLU


def test_inplace_false_leaves_the_model():
    model = Block()
    report = fastarch.optimize(model, inplace=False)
    assert report.model is not model and type(model.ln) is nn.LayerNorm
    assert type(report.model.ln) is LayerNorm


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="backend"):
        fastarch.optimize(Block(), backend="tpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradients_match(dtype):
    """Outputs and every parameter's gradient, optimized against unmodified, both judged
    against the fp64 model (dropin_tolerance.py)."""
    torch.manual_seed(0)
    model = Block().to(dtype)
    exact = copy.deepcopy(model).double()
    fast = fastarch.optimize(model, inplace=False).model
    x = torch.randn(3, 17, 32)
    mask = torch.zeros(3, 17, dtype=torch.bool)
    mask[1, 12:] = True  # padding
    results = []
    for m, dt in ((model, dtype), (fast, dtype), (exact, torch.float64)):
        m.zero_grad()
        y = m(x.to(dt), mask)
        y.double().square().sum().backward()
        results.append((y, {n: p.grad for n, p in m.named_parameters()}))
    (theirs, g_theirs), (ours, g_ours), (ref, g_ref) = results
    assert_close(ours, theirs, ref)
    for name in g_ref:  # gradients: sums over the batch, one more rounding of slack
        assert_close(g_ours[name], g_theirs[name], g_ref[name], factor=3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 48), (7, 48), (2, 3, 48)])
def test_norm_direct_call_is_the_op(dtype, shape):
    """Without autograd the swapped norms (LayerNorm, RMSNorm, an HF RMSNorm) call the chosen
    backend's kernel themselves: the same bits as the fastarch op on that backend, x's shape;
    with autograd they go through the op (and give a gradient); a NaN stays a NaN."""
    layers = {"ln": nn.LayerNorm(48), "rms": nn.RMSNorm(48, eps=1e-5), "llama": LlamaStyleRMSNorm(48, eps=1e-5),
              "gemma": GemmaStyleRMSNorm(48, eps=1e-5)}
    with torch.no_grad():
        for m in layers.values():
            m.weight.uniform_(0.5, 1.5)
        layers["ln"].bias.uniform_(-0.5, 0.5)
    model = nn.ModuleDict({k: copy.deepcopy(m) for k, m in layers.items()}).to(dtype)
    fastarch.optimize(model)
    assert {type(m) for m in model.values()} == {LayerNorm, RMSNorm, HFRMSNorm}
    x = torch.randn(*shape, dtype=dtype)
    x[0, ..., 5] = float("nan")
    backend = fastarch.override.backend_for("layer_norm", ("cpu", dtype, 1, 1))
    ln, rms, llama, gemma = model["ln"], model["rms"], model["llama"], model["gemma"]
    with torch.no_grad():
        wants = {"ln": fastarch.ops.layer_norm(x, ln.weight, ln.bias, ln.eps, backend=backend),
                 "rms": fastarch.ops.rms_norm(x, rms.weight, rms.eps, backend=backend),
                 "llama": fastarch.ops.rms_norm(x, llama.weight, llama.eps, backend=backend),
                 "gemma": fastarch.ops.rms_norm(x, gemma.weight, gemma.eps, weight_offset=1.0, backend=backend)}
        for name, m in model.items():
            got = m(x)
            assert got.shape == x.shape and torch.equal(got.nan_to_num(), wants[name].nan_to_num()), name
            assert got[0].isnan().all() and not got[1:].isnan().any()  # the NaN row only
    xg = x[1:].clone().requires_grad_() if x.shape[0] > 1 else x.nan_to_num().requires_grad_()
    for name, m in model.items():
        y = m(xg)
        (grad,) = torch.autograd.grad(y.float().sum(), xg)
        assert y.grad_fn is not None and torch.isfinite(grad).all(), name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_direct_call_is_the_op(device, dtype, channels_last):
    """group_norm_direct (the swapped GroupNorms' and the UNet ResNet blocks' call of the kernel
    without the op's Python) gives fastarch.ops.group_norm's bits on the same backend, in x's
    memory layout, with and without scale/shift and SiLU, a NaN kept to its group; it declines
    (None: the op or torch's code runs) with autograd and for what the op would refuse."""
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 16).to(device, dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 16, 5, 7, dtype=dtype, device=device)
    x[0, 0, 1, 2] = float("nan")  # group 0 of sample 0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    scale, shift = torch.randn(3, 16, dtype=dtype, device=device), torch.randn(3, 16, dtype=dtype, device=device)
    backend = fastarch.override.backend_for("group_norm", (device, dtype, 1, 1, 1, 1, False))
    with torch.no_grad():
        for s, t, silu in [(None, None, False), (None, None, True), (scale, shift, True), (scale, None, False)]:
            got = group_norm_direct(x, norm, s, t, silu)
            want = fastarch.ops.group_norm(x, 4, norm.weight, norm.bias, norm.eps, scale=s, shift=t,
                                           activation="silu" if silu else None, backend=backend)
            assert got.stride() == want.stride() == x.stride()
            assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
            assert got[0, :4].isnan().all() and not got[0, 4:].isnan().any() and not got[1:].isnan().any()
        declined = [(x.double(), norm, None, None), (x[:, :8], norm, None, None), (x, norm, scale[:2], None),
                    (x, norm, None, shift.float() if dtype != torch.float32 else shift.half()), (x[:0], norm, None, None),
                    (x, nn.GroupNorm(4, 16, eps=0).to(device, dtype), None, None)]  # (an int eps)
        for args in declined:
            assert group_norm_direct(*args) is None
    assert group_norm_direct(x, norm, scale.requires_grad_(), shift) is None


def test_mixed_dtypes_run_the_original_code():
    """bf16 input, fp32 weight (as under autocast): torch's own promotion, exactly."""
    model = nn.Sequential(nn.LayerNorm(16), LlamaStyleRMSNorm(16), T5StyleLayerNorm(16))
    fast = fastarch.optimize(model, inplace=False).model
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    for a, b in zip(model, fast):
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
        assert b(x).dtype == a(x).dtype


def test_fp64_attention_is_left_alone():
    """No fastarch attention kernel takes fp64 (the norms' CPU kernels do)."""
    model = nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True), nn.LayerNorm(16)).double()
    attn = model[0]
    report = fastarch.optimize(model)
    assert model[0] is attn and type(model[1]) is LayerNorm
    assert report.left_alone[0].detail == "float64 on cpu: no fastarch attention kernel runs it"


def test_fp64_input_runs_torch_attention():
    """A swapped fp32 layer given fp64 input runs torch's code: torch's result, exactly."""
    model = nn.MultiheadAttention(16, 2, batch_first=True)
    fast = fastarch.optimize(nn.Sequential(model), inplace=False).model[0]
    model.double(), fast.double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(fast(x, x, x, need_weights=False)[0], model(x, x, x, need_weights=False)[0],
                               rtol=0, atol=0)


def test_forced_backend_that_cannot_run_is_reported():
    report = fastarch.optimize(nn.Sequential(nn.LayerNorm(8)), backend="cuda")
    assert "backend 'cuda' forced" in report.left_alone[0].detail


class _Attend(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.llama = LlamaStyleRMSNorm(d)
        self.rms = nn.RMSNorm(d)

    def forward(self, x):
        h = self.ln(x)
        return self.rms(self.llama(x + self.attn(h, h, h, need_weights=False)[0]))


def test_compile_fullgraph():
    """torch.compile of the optimized model: no graph break from fastarch."""
    torch._dynamo.reset()
    model = _Attend()
    fast = fastarch.optimize(model, inplace=False).model
    x = torch.randn(4, 9, 32)
    explained = torch._dynamo.explain(fast)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_transformer_encoder(train):
    """torch's own nn.TransformerEncoder: in training our modules run; in inference without
    gradients torch's fused encoder path reads the same parameters."""
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).train(train)
    exact = copy.deepcopy(model).double()
    fast = fastarch.optimize(model, inplace=False).model
    assert sum(type(m) is MultiheadAttention for m in fast.modules()) == 2
    x = torch.randn(2, 9, 32)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    with torch.set_grad_enabled(train):
        ours, theirs = fast(x, src_key_padding_mask=pad), model(x, src_key_padding_mask=pad)
        ref = exact(x.double(), src_key_padding_mask=pad)
    keep = ~pad
    assert_close(ours[keep], theirs[keep], ref[keep])


def _kernels_run(fn, *args) -> list[str]:
    """The product kernels ``fn(*args)`` ran, in order, as the profiler records torch ops:
    fastarch's (fastarch::_linear), oneDNN's (mkldnn::_linear_pointwise) or torch's (aten::addmm,
    aten::mm)."""
    kernels = ("fastarch::_linear", "mkldnn::_linear_pointwise", "aten::addmm", "aten::mm")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    return out, [e.name for e in prof.events() if e.name in kernels]


def test_linear_swap_runs_the_kernel_for_decode_rows_only(monkeypatch):
    """A decode step's few rows run fastarch's kernel (called directly without autograd, through
    fastarch.ops.linear with it); a long sequence, another input dtype and autocast run torch's
    own Linear (PyTorch's GEMM, or its casts). With fp32 products of many rows on oneDNN's matmul
    (FASTARCH_CPU_GEMM, the default on AMD CPUs) the long sequence runs that instead."""
    monkeypatch.setattr(linear_backends, "CPU_GEMM", "torch")
    registry.clear_choices()
    layer = nn.Linear(64, 48)
    model = nn.Sequential(layer)
    report = fastarch.optimize(model)
    assert type(model[0]) is Linear and model[0].weight is layer.weight and model[0].bias is layer.bias
    assert "0" in {e.path for e in report.swapped}
    expect = lambda x: x.double() @ layer.weight.double().t() + layer.bias.double()  # noqa: E731
    with torch.no_grad():
        x = torch.randn(1, 1, 64)
        y, ran = _kernels_run(model, x)
        assert ran == ["fastarch::_linear"] and y.shape == (1, 1, 48)
        assert_close(y, layer(x), expect(x))
        x = torch.randn(2, 200, 64)
        y, ran = _kernels_run(model, x)
        assert "fastarch::_linear" not in ran and ran  # the 400-row call ran PyTorch's GEMM
        assert_close(y, layer(x), expect(x))
        x = torch.randn(1, 64, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="dtype"):
            layer(x)  # torch's own error for mixed dtypes: the swap gives the same
        with pytest.raises(RuntimeError, match="dtype"):
            model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, ran = _kernels_run(model, torch.randn(1, 64))
        assert y.dtype == torch.bfloat16 and "fastarch::_linear" not in ran
        monkeypatch.setattr(linear_backends, "CPU_GEMM", "onednn")
        registry.clear_choices()
        x = torch.randn(3, 1000, 64)  # (3000 x 64 x 48 multiply-adds: past ONEDNN_MIN_MACS)
        y, ran = _kernels_run(model, x)
        assert ran == ["mkldnn::_linear_pointwise"]
        assert_close(y, layer(x), expect(x))
        x = torch.randn(2, 200, 64)  # a small product: PyTorch's GEMM, oneDNN's call costing more
        y, ran = _kernels_run(model, x)
        assert "mkldnn::_linear_pointwise" not in ran and "fastarch::_linear" not in ran and ran
        assert_close(y, layer(x), expect(x))
    # with autograd the same kernel runs through fastarch.ops.linear (its backward: torch's GEMMs)
    x = torch.randn(1, 1, 64, requires_grad=True)
    y, ran = _kernels_run(model, x)
    assert "fastarch::_linear" in ran and y.requires_grad
    assert_close(y.detach(), layer(x).detach(), expect(x.detach()))
    registry.clear_choices()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (1, 1, 64), (3, 5, 64), (4, 64), (64,), (2, 1, 3, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_direct_call_is_the_op(dtype, shape, bias):
    """Without autograd the swapped Linear calls the chosen backend's kernel itself: the same
    bits as fastarch.ops.linear on the same backend (its checks and dispatch skipped, not its
    arithmetic), the output shaped as torch's; a non-contiguous input too. Where no fastarch
    kernel takes the rows, torch's Linear runs: the same bits as the layer unswapped."""
    layer = nn.Linear(64, 40, bias=bias).to(dtype)
    model = nn.Sequential(copy.deepcopy(layer))
    fastarch.optimize(model)
    x = torch.randn(*shape, dtype=dtype)
    strided = torch.randn(*shape[:-1], 128, dtype=dtype)[..., ::2]
    with torch.no_grad():
        for inp in (x, strided):
            got = model(inp)
            backend = fastarch.override.backend_for("linear", ("cpu", dtype, inp.numel() // 64, 64, 40, True))
            want = layer(inp) if not backend else fastarch.ops.linear(inp, layer.weight, layer.bias, backend=backend)
            assert got.shape == layer(inp).shape and got.dtype == dtype
            assert torch.equal(got, want), backend


def test_linear_swap_gradients():
    layer = nn.Linear(16, 8)
    swapped = copy.deepcopy(layer)
    model = nn.Sequential(swapped)
    fastarch.optimize(model)
    x = torch.randn(3, 16)
    dy = torch.randn(3, 8)
    g_ours = torch.autograd.grad(model(x), [swapped.weight, swapped.bias], dy)
    g_torch = torch.autograd.grad(layer(x), [layer.weight, layer.bias], dy)
    for a, b in zip(g_ours, g_torch):
        torch.testing.assert_close(a, b)


def test_report_table_groups_repeated_blocks():
    """The entries of a module list's blocks share a row (index as *) with their count; the
    entries themselves stay one per module."""
    model = nn.Sequential(nn.ModuleList([nn.LayerNorm(8) for _ in range(3)]), nn.LayerNorm(8))
    model[0][1].register_forward_hook(lambda *args: None)
    report = fastarch.optimize(model)
    assert len(report.entries) == 4
    lines = str(report).splitlines()
    swapped = [line for line in lines if line.startswith("0.*") and "fastarch.optimize.LayerNorm" in line]
    assert len(swapped) == 1 and swapped[0].split()[1] == "2"
    hooked = [line for line in lines if line.startswith("0.*") and "hooks" in line]
    assert len(hooked) == 1 and hooked[0].split()[1] == "1"
    assert any(line.startswith("1 ") and line.split()[1] == "1" for line in lines)
