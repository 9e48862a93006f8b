"""group_norm's Triton and CUDA kernel ops at the kernel interface, against the fp64 reference.

The Triton rows run in Triton's interpreter here (small shapes) and on the GPU where there is
one; the CUDA rows (torch.ops.fastarch._group_norm_fwd/_bwd on CUDA tensors) are gpu-marked.

How a result is judged: its error against the reference evaluated in fp64 must be at most
FACTOR x the error of the same reference evaluated in the inputs' dtype (statistics in fp32,
rounded once), plus a floor of two ulps of the dtype at the output's scale. An honest kernel
lands near 1x; a wrong split combine, mask or channel index lands at 100x or more.
"""

from __future__ import annotations

import pytest
import torch

from fastarch.ops.group_norms.reference import group_norm_backward_ref, group_norm_forward_ref

HAS_CUDA = torch.cuda.is_available()
GPU = pytest.mark.gpu

FLOOR = {torch.float32: 2.4e-7, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FORWARD_FACTOR = 2.0
GRAD_FACTOR = 3.0
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (N, C, S, G): N = 1 with 32 groups (the split path), a group per channel, one group, one
# position, odd sizes, a group longer than a tile (several tiles per program).
SHAPES = [(1, 64, 37, 32), (2, 6, 5, 3), (1, 12, 7, 12), (3, 10, 1, 1), (2, 40, 19, 4), (1, 4, 2500, 2)]
# (weight, bias, scale, shift, silu): diffusers' scale_shift + SiLU, plain, partial sets.
OPTIONS = [
    (True, True, True, True, True),
    (False, False, False, False, False),
    (True, False, True, False, True),
    (False, True, False, True, False),
]


def _triton_ops():
    from fastarch.ops.group_norms import triton as gn_triton

    return gn_triton.group_norm_forward, gn_triton.group_norm_backward


def _cuda_ops():
    from fastarch.ops.group_norms import cpp

    missing = cpp.kernels_missing("CUDA")  # a machine reason: a build without the CUDA kernels
    if missing is not None:
        pytest.skip(str(missing))
    return torch.ops.fastarch._group_norm_fwd, torch.ops.fastarch._group_norm_bwd


BACKENDS = [
    pytest.param(_triton_ops, "cuda" if HAS_CUDA else "cpu", id="triton"),
    pytest.param(_cuda_ops, "cuda", id="cuda", marks=GPU),
]


def make_inputs(shape, dtype, device, options, channels_last):
    N, C, S, G = shape
    has_w, has_b, has_scale, has_shift, _ = options
    g = torch.Generator().manual_seed(N * 1009 + C * 31 + S)

    def rand(*size, scale=1.0, shift=0.0):
        return (torch.randn(*size, generator=g, dtype=torch.float64) * scale + shift).to(dtype).to(device)

    x = rand(N, S, C, scale=2.0, shift=0.5) if channels_last else rand(N, C, S, scale=2.0, shift=0.5)
    return (
        x,
        rand(C, scale=0.5, shift=1.0) if has_w else None,
        rand(C, scale=0.5) if has_b else None,
        rand(N, C, scale=0.3) if has_scale else None,
        rand(N, C, scale=0.5) if has_shift else None,
        rand(*x.shape),
    )


def f64(t):
    return t.double() if t is not None else None


def err(a, ref) -> float:
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


def check(name, ours, theirs, ref, dtype, factor):
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    floor = FLOOR[dtype] * max(ref.abs().max().item() if ref.numel() else 1.0, 1.0)
    e_ours, e_theirs = err(ours, ref), err(theirs, ref)
    bound = factor * e_theirs + floor
    assert e_ours <= bound, f"{name}: error {e_ours:.3g} > {factor} x the reference's {e_theirs:.3g} + floor = {bound:.3g}"


def _cases():
    """fp32: every shape with the fused options, every option on one shape; 16-bit dtypes: the
    fused options on one shape (the interpreter's time: each case runs four kernels)."""
    for dtype in DTYPES:
        for shape in SHAPES:
            for options in OPTIONS:
                fused = options == OPTIONS[0]
                if dtype == torch.float32 and not (fused or shape == SHAPES[1]):
                    continue
                if dtype != torch.float32 and not (fused and shape == SHAPES[4]):
                    continue
                for channels_last in (False, True):
                    opts = "".join("wbStz"[i] if v else "-" for i, v in enumerate(options))
                    layout = "nhwc" if channels_last else "nchw"
                    case_id = f"{str(dtype)[6:]}-{'x'.join(map(str, shape))}-{opts}-{layout}"
                    yield pytest.param(dtype, shape, options, channels_last, id=case_id)


@pytest.mark.parametrize("dtype, shape, options, channels_last", list(_cases()))
@pytest.mark.parametrize("ops_of, device", BACKENDS)
def test_forward_backward_match_reference(ops_of, device, dtype, shape, options, channels_last):
    forward, backward = ops_of()
    G = shape[3]
    silu = options[4]
    x, w, b, scale, shift, dy = make_inputs(shape, dtype, device, options, channels_last)
    eps = 1e-5

    y, mean, rstd = forward(x, G, w, b, scale, shift, eps, silu, channels_last)
    assert y.dtype == dtype and mean.dtype == rstd.dtype == torch.float32
    y64, mean64, rstd64 = group_norm_forward_ref(f64(x), G, f64(w), f64(b), f64(scale), f64(shift), eps, silu, channels_last)
    y_d, mean_d, rstd_d = group_norm_forward_ref(x, G, w, b, scale, shift, eps, silu, channels_last)
    check("y", y, y_d, y64, dtype, FORWARD_FACTOR)
    check("mean", mean, mean_d, mean64, torch.float32, FORWARD_FACTOR)
    check("rstd", rstd, rstd_d, rstd64, torch.float32, FORWARD_FACTOR)

    ours = backward(dy, x, mean, rstd, G, w, b, scale, shift, silu, channels_last, True, True)
    ref64 = group_norm_backward_ref(
        f64(dy), f64(x), mean64, rstd64, G, f64(w), f64(b), f64(scale), f64(shift), silu, channels_last, True, True
    )
    ref_d = group_norm_backward_ref(dy, x, mean_d, rstd_d, G, w, b, scale, shift, silu, channels_last, True, True)
    for name, o, t, r in zip(("dx", "dweight", "dbias", "dscale", "dshift"), ours, ref_d, ref64):
        if r is None:
            assert o.numel() == 0, f"{name}: not wanted (its parameter is absent), got shape {tuple(o.shape)}"
            continue
        assert o.dtype == dtype, f"{name}: dtype {o.dtype}"
        check(name, o, t, r, dtype, GRAD_FACTOR)


@pytest.mark.parametrize("ops_of, device", BACKENDS)
def test_unwanted_gradients_are_empty(ops_of, device):
    forward, backward = ops_of()
    x, w, b, scale, shift, dy = make_inputs((2, 8, 6, 4), torch.float32, device, OPTIONS[0], False)
    y, mean, rstd = forward(x, 4, w, b, scale, shift, 1e-5, True, False)
    dx, dweight, dbias, dscale, dshift = backward(dy, x, mean, rstd, 4, w, b, scale, shift, True, False, False, False)
    assert dx.shape == x.shape
    assert dweight.numel() == dbias.numel() == dscale.numel() == dshift.numel() == 0
    # Each gradient alone gives what it gives with the others.
    _, dweight, dbias, dscale, dshift = backward(dy, x, mean, rstd, 4, w, b, scale, shift, True, False, True, False)
    assert dweight.shape == dbias.shape == (8,) and dscale.numel() == dshift.numel() == 0
    _, dweight2, dbias2, dscale2, dshift2 = backward(dy, x, mean, rstd, 4, w, b, scale, shift, True, False, True, True)
    assert torch.equal(dweight, dweight2) and torch.equal(dbias, dbias2)
    assert dscale2.shape == dshift2.shape == (2, 8)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("ops_of, device", BACKENDS)
def test_nan_stays_in_its_group(ops_of, device, channels_last):
    """A NaN makes its own group's outputs, statistics and dx NaN, and no other group's."""
    forward, backward = ops_of()
    N, C, S, G = 1, 64, 37, 32  # the split path: the NaN is in one of a group's slices
    x, w, b, scale, shift, dy = make_inputs((N, C, S, G), torch.float32, device, OPTIONS[0], channels_last)
    n, c, s = 0, 2 * 5 + 1, 30  # channel 11: group 5
    x[(n, s, c) if channels_last else (n, c, s)] = float("nan")
    y, mean, rstd = forward(x, G, w, b, scale, shift, 1e-5, True, channels_last)
    dx = backward(dy, x, mean, rstd, G, w, b, scale, shift, True, channels_last, True, True)[0]
    in_group = torch.zeros(C, dtype=torch.bool, device=device)
    in_group[10:12] = True
    for name, t in (("y", y), ("dx", dx)):
        t = t.transpose(1, 2) if channels_last else t  # (N, C, S)
        assert t[:, in_group].isnan().all(), f"{name}: the NaN's group is not all NaN"
        assert not t[:, ~in_group].isnan().any(), f"{name}: NaN leaked out of its group"
    assert mean[0, 5].isnan() and rstd[0, 5].isnan()
    assert not mean[0, torch.arange(G) != 5].isnan().any()


def test_split_path_is_taken_at_batch_one():
    """At N = 1, G = 32 a group's reduction is split over several programs (interpreter
    settings here; on a GPU the SM count decides)."""
    from fastarch.kernels import group_norms as kernels

    device = "cuda" if HAS_CUDA else "cpu"
    x = torch.empty(1, 64, 37, device=device)
    assert kernels._Plan(x, 1, 64, 37, 32, False).split > 1
    if HAS_CUDA:  # a diffusion UNet's 64x64 feature map at batch 1
        plan = kernels._Plan(torch.empty(1, device=device), 1, 320, 4096, 32, False)
        assert plan.split * 32 >= torch.cuda.get_device_properties(device).multi_processor_count


@GPU
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ops_of", [pytest.param(_triton_ops, id="triton"), pytest.param(_cuda_ops, id="cuda")])
def test_unet_shapes_on_gpu(ops_of, dtype, channels_last):
    """Shapes of a diffusion UNet's norms at batch 1 and 2, against the fp64 reference, and
    the same bits on a second run (the reductions are in a fixed order)."""
    forward, backward = ops_of()
    for shape in [(1, 320, 64 * 64, 32), (2, 640, 32 * 32, 32), (1, 1280, 8 * 8, 32), (1, 96, 4999, 32)]:
        G = shape[3]
        x, w, b, scale, shift, dy = make_inputs(shape, dtype, "cuda", OPTIONS[0], channels_last)
        y, mean, rstd = forward(x, G, w, b, scale, shift, 1e-5, True, channels_last)
        y64, mean64, rstd64 = group_norm_forward_ref(f64(x), G, f64(w), f64(b), f64(scale), f64(shift), 1e-5, True, channels_last)
        y_d, mean_d, rstd_d = group_norm_forward_ref(x, G, w, b, scale, shift, 1e-5, True, channels_last)
        check("y", y, y_d, y64, dtype, FORWARD_FACTOR)
        ours = backward(dy, x, mean, rstd, G, w, b, scale, shift, True, channels_last, True, True)
        again = backward(dy, x, mean, rstd, G, w, b, scale, shift, True, channels_last, True, True)
        ref64 = group_norm_backward_ref(
            f64(dy), f64(x), mean64, rstd64, G, f64(w), f64(b), f64(scale), f64(shift), True, channels_last, True, True
        )
        ref_d = group_norm_backward_ref(dy, x, mean_d, rstd_d, G, w, b, scale, shift, True, channels_last, True, True)
        for name, o, o2, t, r in zip(("dx", "dweight", "dbias", "dscale", "dshift"), ours, again, ref_d, ref64):
            check(name, o, t, r, dtype, GRAD_FACTOR)
            assert torch.equal(o, o2), f"{name}: two runs differ"
