"""fastarch.optimize on diffusers UNets (tiny random configs): FastarchAttnProcessor on every
Attention module (self- and cross-attention, with the encoder attention mask diffusers turns
into an additive bias), every ResnetBlock2D a FastarchResnetBlock2D (its GroupNorms, time
scale/shift and SiLUs on fastarch.ops.group_norm), LayerNorms and GroupNorms swapped; outputs
against the unmodified model, both judged against the fp64 model (dropin_tolerance.py)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from dropin_tolerance import assert_close  # tests/integrations/dropin_tolerance.py

import fastarch
from fastarch.integrations import diffusers as integration
from fastarch.integrations.diffusers import FastarchAttention, FastarchAttnProcessor, FastarchGEGLU, FastarchResnetBlock2D
from fastarch.optimize import GroupNorm


def _unet(**config):
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, **config,
    ).eval()


def _conditional_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8,
    ).eval()


class _Counting:
    """Counts the calls of fastarch.ops.<name> from the integration and of the direct kernel
    paths that stand for it (<name>_direct, counted when they ran: not None)."""

    def __init__(self, mp, name="attention"):
        self.calls = 0

        def counted(module, attr, ran=lambda out: True):
            real = getattr(module, attr)

            def counting(*args, **kwargs):
                out = real(*args, **kwargs)
                self.calls += ran(out)
                return out

            mp.setattr(module, attr, counting)

        counted(integration.ops, name)
        direct = f"{name}_direct"
        for module in (integration, sys.modules["fastarch.optimize"]):
            if hasattr(module, direct):
                counted(module, direct, lambda out: out is not None)


def _compare(model, run, monkeypatch, dtype=torch.float32):
    exact = copy.deepcopy(model).double()
    model.to(dtype)
    report = fastarch.optimize(model, inplace=False)
    fast = report.model
    attention = [m for m in fast.modules() if isinstance(m, Attention)]
    assert attention and all(isinstance(m.processor, FastarchAttnProcessor) for m in attention)
    resnets = [m for m in fast.modules() if isinstance(m, ResnetBlock2D)]
    assert resnets and all(type(m) is FastarchResnetBlock2D for m in resnets)
    assert not report.left_alone, str(report)
    assert any(e.kind == "GroupNorm" for e in report.swapped)
    counting, norms = _Counting(monkeypatch), _Counting(monkeypatch, "group_norm")
    with torch.no_grad():
        ours, theirs, ref = run(fast, dtype), run(model, dtype), run(exact, torch.float64)
    assert counting.calls == len(attention)
    in_resnets = {id(n) for r in resnets for n in (r.norm1, r.norm2)}  # the fused forward calls group_norm itself
    others = [m for m in fast.modules() if isinstance(m, GroupNorm) and id(m) not in in_resnets]
    assert norms.calls == 2 * len(resnets) + len(others)
    assert_close(ours, theirs, ref)
    return report


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unet2d(dtype, monkeypatch):
    x = torch.randn(2, 3, 16, 16)
    _compare(_unet(), lambda m, dt: m(x.to(dt), 10).sample, monkeypatch, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unet2d_scale_shift_and_class_labels(dtype, monkeypatch):
    """The "scale_shift" time embedding norm (DDPM-style UNets): the time scale and shift go
    into group_norm with the SiLU."""
    x = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([1, 3])
    model = _unet(resnet_time_scale_shift="scale_shift", num_class_embeds=4)
    _compare(model, lambda m, dt: m(x.to(dt), 10, class_labels=labels).sample, monkeypatch, dtype)


def test_unet2d_training_step_matches():
    """One training step's gradients through the fused ResNet blocks, fp32."""
    model = _unet(resnet_time_scale_shift="scale_shift").train()
    exact = copy.deepcopy(model).double()
    fast = fastarch.optimize(model, inplace=False).model
    x = torch.randn(2, 3, 16, 16)
    grads = []
    for m, dt in ((model, torch.float32), (fast, torch.float32), (exact, torch.float64)):
        m(x.to(dt), 10).sample.double().square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    theirs, ours, ref = grads
    for name in ref:
        assert_close(ours[name], theirs[name], ref[name], factor=3.0)


def test_unet2d_condition_with_mask(monkeypatch):
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 7, 24)
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0  # the second prompt is 4 tokens long

    def run(m, dt):
        return m(x.to(dt), 10, encoder_hidden_states=context.to(dt), encoder_attention_mask=mask.to(dt)).sample

    geglu = _Counting(monkeypatch, "geglu_packed")
    report = _compare(_conditional_unet(), run, monkeypatch)
    assert any("attn2" in e.path for e in report.swapped)  # cross-attention
    assert any(e.kind == "LayerNorm" for e in report.swapped)
    swapped_geglu = [e for e in report.swapped if e.kind == "GEGLU"]
    assert swapped_geglu and all(type(report.model.get_submodule(e.path)) is FastarchGEGLU for e in swapped_geglu)
    assert geglu.calls == len(swapped_geglu)  # one feed-forward per transformer block


def test_restore_puts_the_processors_back():
    model = _conditional_unet()
    modules = dict(model.named_modules())
    before = {name: m.processor for name, m in model.named_modules() if isinstance(m, Attention)}
    fastarch.optimize(model)
    assert all(type(m) is FastarchAttention for m in model.modules() if isinstance(m, Attention))
    fastarch.restore(model)
    after = {name: m.processor for name, m in model.named_modules() if isinstance(m, Attention)}
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert all(type(m) is Attention for m in model.modules() if isinstance(m, Attention))
    assert all(type(m) is ResnetBlock2D for m in model.modules() if isinstance(m, ResnetBlock2D))
    assert all(m is modules[name] for name, m in model.named_modules())  # the GEGLUs too


def test_attention_calls_its_processor_directly_and_keeps_hooks_and_kwargs(monkeypatch):
    """An optimized Attention hands FastarchAttnProcessor its call without Attention.forward's
    inspection of the processor; its hooks still run; a call with cross_attention_kwargs, or
    with another processor set later, goes through Attention.forward as before."""
    model = _unet()
    fast = fastarch.optimize(model, inplace=False).model
    attn = fast.down_blocks[1].attentions[0]
    assert type(attn) is FastarchAttention
    h = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        want = model.down_blocks[1].attentions[0](h)
    seen = []
    original = Attention.forward

    def spied(self, *args, **kwargs):
        seen.append("Attention.forward")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Attention, "forward", spied)
    hook = attn.register_forward_hook(lambda *args: seen.append("hook"))
    with torch.no_grad():
        direct = attn(h)
        assert seen == ["hook"]  # the processor called directly, the hook run
        from_kwargs = attn(h, scale=1.0)  # (Attention.forward drops it, with a warning: the processor does not name it)
        assert seen == ["hook", "Attention.forward", "hook"]
        torch.testing.assert_close(from_kwargs, want, rtol=1e-5, atol=1e-5)
        attn.set_processor(AttnProcessor2_0())
        torch.testing.assert_close(attn(h), want, rtol=1e-5, atol=1e-5)
        assert seen[-2:] == ["Attention.forward", "hook"]
    hook.remove()
    torch.testing.assert_close(direct, from_kwargs, rtol=0, atol=0)


def test_resnet_blocks_with_hooks_are_left_alone():
    model = _unet()
    hooked = model.down_blocks[0].resnets[0]
    hooked.norm1.register_forward_hook(lambda m, i, o: o)
    report = fastarch.optimize(model)
    assert type(hooked) is ResnetBlock2D
    assert any("hooks on norm1" in e.detail for e in report.left_alone)


def test_eval_dropouts_are_skipped_unless_hooked(monkeypatch):
    """In eval a plain Dropout returns its input, so the fused ResNet block and the attention
    processor skip calling it; a hook on it, even one added after optimize, is still run."""
    model = _unet()
    fast = fastarch.optimize(model, inplace=False).model
    resnet, attn = fast.down_blocks[1].resnets[0], fast.down_blocks[1].attentions[0]
    x, temb, h = torch.randn(2, 16, 8, 8), torch.randn(2, 64), torch.randn(2, 32, 4, 4)
    calls, seen = [], []
    forward = nn.Dropout.forward
    monkeypatch.setattr(nn.Dropout, "forward", lambda self, t: calls.append(1) or forward(self, t))
    with torch.no_grad():
        resnet(x, temb), attn(h)
        assert calls == []
        for dropout in (resnet.dropout, attn.to_out[1]):
            dropout.register_forward_hook(lambda *args: seen.append(1))
        resnet(x, temb), attn(h)
    assert calls == seen == [1, 1]


def test_compile_fullgraph_in_inference():
    """torch.compile(fullgraph=True) of an optimized UNet without gradients: no graph break
    (fastarch.nn.Conv2d asked torch.backends.mkldnn, which dynamo cannot trace, before asking
    whether it was being compiled), the eager optimized model's outputs."""
    torch._dynamo.reset()
    fast = fastarch.optimize(_unet(), inplace=False).model
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    with torch.inference_mode():
        eager = fast(x, t).sample
        compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")(x, t).sample
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
