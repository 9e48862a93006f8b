"""fastarch.nn.Conv2d's CPU inference paths: fp32 3x3 convolutions (stride 1, padding 1, one
group, 16 or more channels each side) by the Winograd F(2x2, 3x3) kernel
``fastarch::_winograd_conv3x3`` at CPU level avx2 and above, the rest by oneDNN on its packed
weight. The kernel's three builds are each tested whatever FASTARCH_CPU_ISA says, by forcing
the level that runs it (a level this machine cannot run skips): AVX-512 (level avx512 and
above), the portable kernels' AVX2 build (avx2) and their baseline build (generic, where the
module calls oneDNN but the op runs).

Tolerance: against an fp64 convolution, the kernel's max error may be at most 2x torch's own
fp32 conv2d error plus 8 fp32 ulps at the output's scale. The transforms' coefficients are 0,
+-1 and +-1/2, so their only roundings are those of a few sums; the kernel measured at 0.3-0.6x
torch's error. A wrong tile, edge or channel padding lands at 100x or more."""

from __future__ import annotations

import backend_rows
import pytest
import torch
import torch.nn.functional as F

from fastarch._extension import _C
from fastarch.nn import conv as conv_module
from fastarch.nn.conv import Conv2d, winograd_weight

# The level that runs each build of the kernel, and the route the module takes there.
BUILDS = {"avx512": "winograd", "avx2": "winograd", "generic": "onednn"}


@pytest.fixture(params=list(BUILDS))
def build(request):
    """Forces the CPU level of one build of the kernel for the test (skips where it cannot run)."""
    backend_rows.set_cpu_isa(request.param)
    yield request.param
    _C._set_cpu_isa(backend_rows.DEFAULT_ISA)


def channels_last(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last)


def check_error(ours: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias, add) -> None:
    exact = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    theirs = F.conv2d(x, weight, bias, padding=1)
    if add is not None:
        exact, theirs = exact + add.double(), theirs + add
    ours_err = (ours.double() - exact).abs().max().item()
    theirs_err = (theirs.double() - exact).abs().max().item()
    floor = 8 * torch.finfo(torch.float32).eps * max(exact.abs().max().item(), 1.0)
    assert ours_err <= 2 * theirs_err + floor, f"error {ours_err:.3g} > 2 x torch's {theirs_err:.3g} + {floor:.3g}"


# (N, Ci, Co, H, W): channel counts off the 16 / 32 blocks, odd and one-pixel maps, several tile
# blocks and panel groups (the work plan depends on the tile count and the panels).
SHAPES = [(1, 16, 16, 8, 8), (2, 20, 33, 7, 9), (1, 48, 64, 1, 1), (1, 32, 40, 5, 2), (3, 64, 32, 16, 16),
          (1, 16, 96, 33, 31), (2, 130, 17, 4, 6)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("with_add", [False, True], ids=["", "add"])
def test_winograd_kernel_against_fp64(shape, with_bias, with_add, build):
    n, ci, co, h, w = shape
    torch.manual_seed(sum(shape))
    x, weight = channels_last(n, ci, h, w), torch.randn(co, ci, 3, 3) / (9 * ci) ** 0.5
    bias = torch.randn(co) if with_bias else None
    add = channels_last(n, co, h, w) if with_add else None
    y = torch.ops.fastarch._winograd_conv3x3(x, winograd_weight(weight), co, bias, add)
    assert y.shape == (n, co, h, w) and y.is_contiguous(memory_format=torch.channels_last)
    check_error(y, x, weight, bias, add)


def test_result_does_not_depend_on_the_thread_count(build):
    """The work plan changes with the threads, but every output is the same sums in the same
    order (its tile's transform, the products over the input channels in order)."""
    torch.manual_seed(0)
    x, weight = channels_last(2, 64, 12, 10), torch.randn(64, 64, 3, 3)
    u, threads = winograd_weight(weight), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.fastarch._winograd_conv3x3(x, u, 64, None, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, torch.ops.fastarch._winograd_conv3x3(x, u, 64, None, None))


def test_avx2_build_has_the_avx512_builds_bits():
    """The AVX2 build makes the AVX-512 build's sums in the same order, with fused
    multiply-adds: the same bits, also in the channels past the last whole vector."""
    torch.manual_seed(4)
    x, add = channels_last(2, 20, 7, 9), channels_last(2, 36, 7, 9)
    u, bias, ys = winograd_weight(torch.randn(36, 20, 3, 3)), torch.randn(36), []
    try:
        for level in ("avx512", "avx2"):
            backend_rows.set_cpu_isa(level)
            ys.append(torch.ops.fastarch._winograd_conv3x3(x, u, 36, bias, add))
    finally:
        _C._set_cpu_isa(backend_rows.DEFAULT_ISA)
    assert torch.equal(ys[0], ys[1])


@pytest.mark.parametrize("where", [(4, 5), (0, 0), (8, 6)], ids=["inside", "corner", "last-row"])
@pytest.mark.parametrize("channel", [3, 18], ids=["channel3", "channel18"])
def test_nan_reaches_exactly_its_receptive_field(where, channel, build):
    """A NaN input makes NaN the outputs whose 3x3 window holds it, in every output channel,
    and no other (a Winograd tile's four outputs do not all see its 4x4 patch); 20 input and
    36 output channels: the NaN in a whole vector of channels or in the last, partial one."""
    torch.manual_seed(1)
    conv = Conv2d(20, 36, 3, padding=1)
    x = channels_last(1, 20, 9, 7)
    x[0, channel, where[0], where[1]] = float("nan")
    with torch.no_grad():
        y = torch.ops.fastarch._winograd_conv3x3(x, winograd_weight(conv.weight), 36, conv.bias, None)
        by_module = conv(x)
    expected = torch.zeros(9, 7, dtype=torch.bool)
    expected[max(where[0] - 1, 0):where[0] + 2, max(where[1] - 1, 0):where[1] + 2] = True
    assert torch.equal(y.isnan(), expected.expand_as(y))
    assert torch.equal(by_module.isnan(), expected.expand_as(y))
    assert route(conv, x) == BUILDS[build]


def route(conv: Conv2d, x: torch.Tensor, add=None) -> str:
    conv._packed = None
    with torch.no_grad():
        conv(x, add)
    return "winograd" if conv._packed is not None and conv._packed[0][3] == "winograd" else "onednn"  # (its layout)


def test_module_takes_winograd_only_where_it_fits(build, monkeypatch):
    torch.manual_seed(2)
    x = channels_last(2, 16, 8, 8)
    fits = Conv2d(16, 16, 3, padding=1)
    assert route(fits, x) == BUILDS[build]
    assert route(fits, x.contiguous()) == route(fits, x)  # NCHW input: made channels-last first
    for other in (Conv2d(16, 16, 3, stride=2, padding=1), Conv2d(16, 16, 3, padding=2, dilation=2),
                  Conv2d(16, 16, 3, padding=1, groups=2), Conv2d(16, 16, 1), Conv2d(16, 3, 3, padding=1)):
        assert route(other, x) == "onednn", other
    assert route(Conv2d(3, 16, 3, padding=1), channels_last(2, 3, 8, 8)) == "onednn"  # 3 input channels
    monkeypatch.setattr(conv_module, "WINOGRAD", False)
    assert route(fits, x) == "onednn"


def test_module_matches_torch_and_follows_weight_updates():
    """Winograd (or oneDNN) without autograd, torch's conv2d with it; an in-place weight update
    bumps the weight's version and the transformed copy is remade."""
    torch.manual_seed(3)
    conv = Conv2d(24, 40, 3, padding=1)
    x, add = channels_last(2, 24, 11, 6), channels_last(2, 40, 11, 6)
    with torch.no_grad():
        check_error(conv(x, add), x, conv.weight, conv.bias, add)
        conv.weight.mul_(-0.5)
        check_error(conv(x), x, conv.weight, conv.bias, None)
    y = conv(x.requires_grad_())
    assert y.requires_grad and torch.equal(y, F.conv2d(x, conv.weight, conv.bias, padding=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ci,co,h,w", [(32, 32, 1, 1), (3, 8, 1, 1), (32, 1, 3, 3), (32, 1, 1, 5)],
                         ids=["one-pixel", "one-pixel-3ch", "one-channel", "one-channel-row"])
@pytest.mark.parametrize("k", [1, 3])
def test_onednn_add_where_the_layout_is_ambiguous(ci, co, h, w, k, dtype):
    """One pixel or one output channel: the addend is both NCHW- and channels-last-contiguous,
    which oneDNN's fused add refused in torch 2.11; conv(x, add) still equals torch's conv2d plus
    add against fp64 (bf16: two roundings, of the convolution and of the sum, each at most 2**-9
    of the scale: bound 2**-7; fp32: 1e-5 of the scale, ~100 ulps of sums of at most 288 terms)."""
    torch.manual_seed(4)
    conv = Conv2d(ci, co, k, padding=k // 2).to(dtype).eval()
    x, add = torch.randn(2, ci, h, w, dtype=dtype), torch.randn(2, co, h, w, dtype=dtype)
    with torch.no_grad():
        ours = conv(x, add)
        theirs = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=k // 2) + add.double()
    assert ours.shape == theirs.shape and ours.dtype == dtype
    bound = (2**-7 if dtype == torch.bfloat16 else 1e-5) * max(theirs.abs().max().item(), 1.0)
    assert (ours.double() - theirs).abs().max().item() <= bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("k", [3, 1])
def test_16bit_widened_at_level_avx2(dtype, k):
    """At level avx2 (no AVX-512: neither oneDNN nor torch's conv2d has a 16-bit vector path,
    ~80x slower than fp32 on a Zen 3) a 16-bit convolution runs the fp32 kernels on its tensors
    widened, rounded once: exactly the fp32 module on them, then rounded (Winograd for the 3x3,
    oneDNN for the 1x1; the add fused in fp32), NaN kept in its receptive field; the fp32
    weight is transformed once. Where oneDNN runs bf16 (AVX512-BF16), bf16 stays on it."""
    backend_rows.set_cpu_isa("avx2")
    try:
        torch.manual_seed(5)
        conv = Conv2d(24, 40, k, padding=k // 2).eval()
        wide = Conv2d(24, 40, k, padding=k // 2).eval()
        wide.load_state_dict(conv.state_dict())
        conv = conv.to(dtype)
        wide.load_state_dict({n: t.float() for n, t in conv.state_dict().items()})  # (the rounded values)
        x, add = channels_last(2, 24, 9, 7).to(dtype), channels_last(2, 40, 9, 7).to(dtype)
        x[1, 3, 4, 5] = float("nan")
        with torch.no_grad():
            ours, ours_add = conv(x), conv(x, add)
            expected = wide(x.float()).to(dtype)
            assert torch.equal(ours.isnan(), expected.isnan()) and ours[1].isnan().any() and not ours[0].isnan().any()
            if dtype == torch.bfloat16 and conv_module._BF16_CONV:
                assert route(conv, x) == "onednn" and conv._packed[0][4] is False  # oneDNN's bf16
                return
            assert torch.equal(ours.nan_to_num(), expected.nan_to_num())
            assert torch.equal(ours_add.nan_to_num(), wide(x.float(), add.float()).to(dtype).nan_to_num())
            assert route(conv, x) == ("winograd" if k == 3 else "onednn") and conv._packed[0][4] is True
            # the error against fp64: that of rounding the output once (torch's own 16-bit conv2d rounds once too)
            x = x.nan_to_num()
            exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=k // 2)
            ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
            assert ((conv(x).double() - exact).abs() <= ulp + 1e-4 * exact.abs().max()).all()
    finally:
        _C._set_cpu_isa(backend_rows.DEFAULT_ISA)


BAD = [
    ("x dtype", lambda x, u, b, a: (x.double(), u, b, a), "x must be a float32"),
    ("x layout", lambda x, u, b, a: (x.contiguous(), u, b, a), "x must be channels-last"),
    ("x rank", lambda x, u, b, a: (x[0], u, b, a), r"x must be \(N, C, H, W\)"),
    ("u shape", lambda x, u, b, a: (x, u[:, :, :16], b, a), "u must be the contiguous float32"),
    ("bias shape", lambda x, u, b, a: (x, u, b[:5], a), r"bias must be a contiguous float32 \(40,\)"),
    ("add shape", lambda x, u, b, a: (x, u, b, a[:, :, :3]), "add must have shape"),
]


@pytest.mark.parametrize("name,change,match", BAD, ids=[b[0] for b in BAD])
def test_kernel_op_names_bad_arguments(name, change, match):
    x, weight = channels_last(2, 24, 6, 6), torch.randn(40, 24, 3, 3)
    args = change(x, winograd_weight(weight), torch.randn(40), channels_last(2, 40, 6, 6))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastarch._winograd_conv3x3(args[0], args[1], 40, args[2], args[3])


def test_winograd_weight_needs_a_3x3_filter():
    with pytest.raises(ValueError, match=r"\(out, in, 3, 3\)"):
        winograd_weight(torch.randn(4, 4, 5, 5))


@pytest.mark.parametrize("ci,k", [(20, 3), (4, 1)], ids=["winograd-shape", "onednn-shape"])
def test_bad_input_gets_torchs_error(ci, k, build):
    """What torch's conv2d refuses, the module refuses with torch's own message, on both inference
    paths: an input of another channel count (the Winograd kernel sees the channels padded to
    16, so 24 into 20 had run on the first 20), an addend that does not broadcast to the output
    (oneDNN's fused add had read it as if it did)."""
    torch.manual_seed(5)
    conv = Conv2d(ci, 16, k, padding=k // 2).eval()
    wrong = torch.randn(1, ci + 4, 6, 6)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=rf"expected input\[1, {ci + 4}, 6, 6\] to have {ci} channels"):
            conv(wrong)
        x = torch.randn(2, ci, 6, 6)
        for add in (torch.randn(2, 7, 6, 6), torch.randn(2, 16, 2, 2), torch.randn(3, 16, 6, 6)):
            with pytest.raises(RuntimeError, match="must match the size of tensor"):
                conv(x, add)


@pytest.mark.parametrize("ci,k", [(20, 3), (4, 1)], ids=["winograd-shape", "onednn-shape"])
def test_addends_that_broadcast_and_unbatched_input(ci, k, build):
    """conv(x, add) is conv2d(x) + add by torch's rules for any addend that broadcasts (a
    per-channel (1, C, 1, 1), a scalar, another dtype: added after the call), and an unbatched
    (C, H, W) input runs as torch's module runs it. fp32 tolerance as check_error's."""
    torch.manual_seed(6)
    conv = Conv2d(ci, 16, k, padding=k // 2).eval()
    x = torch.randn(2, ci, 6, 6)
    with torch.no_grad():
        exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=k // 2)
        for add in (torch.randn(1, 16, 1, 1), torch.tensor(1.5), torch.randn(6), torch.randn(2, 16, 6, 6).double()):
            ours = conv(x, add)
            assert ours.shape == exact.shape and ours.dtype == torch.promote_types(x.dtype, add.dtype)
            expected = exact + add.double()
            assert (ours.double() - expected).abs().max().item() <= 1e-5 * max(expected.abs().max().item(), 1.0)
        one = conv(x[0])
    assert one.shape == (16, 6, 6)
    assert (one.double() - exact[0]).abs().max().item() <= 1e-5 * max(exact.abs().max().item(), 1.0)
