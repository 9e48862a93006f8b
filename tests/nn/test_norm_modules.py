"""fastarch.nn.LayerNorm / RMSNorm as drop-in replacements for torch's."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastarch
from fastarch.nn import LayerNorm, RMSNorm


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(normalized_shape=64),
        dict(normalized_shape=64, elementwise_affine=False),
        dict(normalized_shape=64, bias=False),
        dict(normalized_shape=(4, 16), eps=1e-6),
    ],
    ids=["default", "no-affine", "no-bias", "2d-shape"],
)
def test_layer_norm_is_a_drop_in(kwargs):
    torch.manual_seed(0)
    theirs = torch.nn.LayerNorm(**kwargs)
    ours = fastarch.nn.LayerNorm(**kwargs)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours.load_state_dict(theirs.state_dict())
    shape = (3, 5) + ((kwargs["normalized_shape"],) if isinstance(kwargs["normalized_shape"], int) else kwargs["normalized_shape"])
    x = torch.randn(shape, requires_grad=True)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    g_ours = torch.autograd.grad(y_ours.square().sum(), [x, *ours.parameters()])
    g_theirs = torch.autograd.grad(y_theirs.square().sum(), [x, *theirs.parameters()])
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_is_a_drop_in(eps):
    theirs = torch.nn.RMSNorm(32, eps=eps)
    with torch.no_grad():
        theirs.weight.normal_()
    ours = fastarch.nn.RMSNorm(32, eps=eps)
    assert isinstance(ours, torch.nn.RMSNorm)
    ours.load_state_dict(theirs.state_dict())
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(7, 32, dtype=dtype)
        ours.to(dtype), theirs.to(dtype)
        tol = 1e-5 if dtype == torch.float32 else 1.6e-2
        torch.testing.assert_close(ours(x), theirs(x), rtol=tol, atol=tol)


def test_from_torch_shares_parameters_and_mode():
    ln = torch.nn.LayerNorm(16).eval()
    ours = fastarch.nn.LayerNorm.from_torch(ln)
    assert ours.weight is ln.weight and ours.bias is ln.bias and not ours.training
    rms = torch.nn.RMSNorm(16, eps=1e-5)
    ours_rms = fastarch.nn.RMSNorm.from_torch(rms)
    assert ours_rms.weight is rms.weight and ours_rms.eps == 1e-5
    x = torch.randn(2, 16)
    torch.testing.assert_close(ours(x), ln(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_rms(x), rms(x), rtol=1e-5, atol=1e-5)


def test_wrong_input_shape_names_the_module():
    with pytest.raises(ValueError, match=r"LayerNorm: input must end with normalized_shape \(4, 16\)"):
        fastarch.nn.LayerNorm((4, 16))(torch.randn(2, 16, 4))


def test_module_compiles_without_graph_breaks():
    torch._dynamo.reset()
    m = fastarch.nn.LayerNorm(32)
    x = torch.randn(4, 32)
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_what_the_ops_do_not_take_runs_as_torch_runs_it(kind):
    """bf16 input with fp32 parameters (autocast-style models) and an empty normalized shape:
    torch's modules run both; ours hand them to torch's forward (they had raised the op's dtype
    error, or its "at least one column"), so the results are torch's bit for bit."""
    ours_cls, torch_cls = (LayerNorm, torch.nn.LayerNorm) if kind == "layer" else (RMSNorm, torch.nn.RMSNorm)
    torch.manual_seed(7)
    ours, theirs = ours_cls(16), torch_cls(16)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that the mixed dtypes miss its fused kernel
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    empty = torch.randn(3, 0)
    assert ours_cls(0)(empty).shape == torch_cls(0)(empty).shape == (3, 0)


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm", "GroupNorm", "GroupNormSiLU", "Conv2d", "Linear",
                                  "MultiheadAttention"])
def test_from_torch_names_the_module_class_it_takes(name):
    cls = getattr(fastarch.nn, name)
    expected = "GroupNorm" if name == "GroupNormSiLU" else name
    with pytest.raises(TypeError, match=rf"fastarch.nn.{name}.from_torch: module must be a torch.nn.{expected}, got ReLU"):
        cls.from_torch(torch.nn.ReLU())


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_offset_module(kind, dtype):
    """weight_offset=1.0 (Gemma's norms): a new module's weight is zeros and it normalizes as
    torch's does; a trained weight w multiplies by 1 + w (the op's own bits, its gradient
    too), also where torch runs it (a weight of another dtype); bad offsets are errors."""
    cls, torch_cls = (LayerNorm, torch.nn.LayerNorm) if kind == "layer" else (RMSNorm, torch.nn.RMSNorm)
    norm = cls(64, eps=1e-6, weight_offset=1.0).to(dtype)
    assert torch.equal(norm.weight, torch.zeros_like(norm.weight)) and "weight_offset=1.0" in repr(norm)
    x = torch.randn(5, 64, dtype=dtype)
    plain = torch_cls(64, eps=1e-6).to(dtype)
    if kind == "layer":
        with torch.no_grad():
            norm.bias.normal_()
            plain.bias.copy_(norm.bias)
    torch.testing.assert_close(norm(x), plain(x))
    with torch.no_grad():
        norm.weight.normal_(0, 0.3)
    xg = x.clone().requires_grad_()
    y = norm(xg)
    op = fastarch.ops.layer_norm if kind == "layer" else fastarch.ops.rms_norm
    extra = (norm.bias,) if kind == "layer" else ()
    x2 = x.clone().requires_grad_()
    want = op(x2, norm.weight, *extra, 1e-6, weight_offset=1.0)
    assert torch.equal(y, want)
    g = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, xg, g)[0], torch.autograd.grad(want, x2, g)[0])
    # a weight of another dtype than x: torch's own code, with 1 + weight in fp32
    wide = cls(64, eps=1e-6, weight_offset=1.0)
    with torch.no_grad():
        wide.weight.copy_(norm.weight.float())
        if kind == "layer":
            wide.bias.copy_(norm.bias.float())
    xb = x.to(torch.bfloat16)
    extra64 = (wide.bias.double(),) if kind == "layer" else ()
    ref = (torch.nn.functional.layer_norm if kind == "layer" else torch.nn.functional.rms_norm)(
        xb.double(), (64,), wide.weight.double() + 1, *extra64, 1e-6)
    torch.testing.assert_close(wide(xb).double(), ref, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="weight_offset must be a finite float"):
        cls(8, weight_offset=float("nan"))
    with pytest.raises(ValueError, match="needs elementwise_affine=True"):
        cls(8, weight_offset=1.0, elementwise_affine=False)
