"""What the group_norm tests share: inputs, PyTorch's own computation of the op, the run of
ours with gradients, and the tolerance (as tests/ops/activations): the error of ours against an
fp64 computation on the same inputs must be at most FACTOR x the error of PyTorch's own
same-dtype computation (F.group_norm, then the scale/shift and F.silu, each rounded to the
dtype) plus a floor of two ulps of the dtype at the result's scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FORWARD_FACTOR = 2.0
GRAD_FACTOR = 3.0
# dtype -> floor of the error, relative to max |reference|: two ulps at 1.0; fp64: the fp64
# statistics are summed in another order than PyTorch's (a few ulps times the reduction's
# condition).
FLOOR = {torch.float32: 2.4e-7, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}

# Which of weight, bias, scale, shift and silu a case uses.
OPTIONS = {
    "plain": (),
    "affine": ("weight", "bias"),
    "affine-silu": ("weight", "bias", "silu"),
    "all": ("weight", "bias", "scale", "shift", "silu"),
    "scale-silu": ("scale", "silu"),
    "shift": ("shift",),
}


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x (N, C, *spatial) with channels-last memory (channel dim of stride 1) when asked."""
    if not channels_last:
        return x.contiguous()
    d = x.dim()
    return x.permute(0, *range(2, d), 1).contiguous().permute(0, d - 1, *range(1, d - 1))


def make_inputs(shape, options, dtype, device="cpu", channels_last=False, seed=0):
    """x (offset from 0, as activations entering a norm), and the tensors `options` names
    (scale around 0, as a time embedding's), all rounded to dtype."""
    g = torch.Generator().manual_seed(seed + 7919 * len(shape) + sum(shape))
    n, c = shape[0], shape[1]

    def rand(*size, mul=1.0, add=0.0):
        return (torch.randn(*size, generator=g, dtype=torch.float64) * mul + add).to(dtype).to(device)

    x = to_layout(rand(*shape, mul=2.0, add=0.5), channels_last)
    tensors = {
        "weight": rand(c, mul=0.5, add=1.0) if "weight" in options else None,
        "bias": rand(c, mul=0.5) if "bias" in options else None,
        "scale": rand(n, c, mul=0.5) if "scale" in options else None,
        "shift": rand(n, c, mul=0.5) if "shift" in options else None,
    }
    return x, tensors, "silu" in options


def torch_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, scale=None, shift=None, activation=None):
    """The PyTorch code fastarch.ops.group_norm replaces (diffusers' scale_shift norm + SiLU)."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1 + scale.view(view))
    if shift is not None:
        y = y + shift.view(view)
    return F.silu(y) if activation == "silu" else y


def run_with_grads(fn, x, num_groups, tensors, silu, dy):
    """fn's output and the gradients of x and every given tensor (None for absent ones)."""
    x = x.detach().clone().requires_grad_()
    given = {k: v.detach().clone().requires_grad_() for k, v in tensors.items() if v is not None}
    y = fn(x, num_groups, given.get("weight"), given.get("bias"), scale=given.get("scale"), shift=given.get("shift"),
           activation="silu" if silu else None)
    wrt = [x, *given.values()]
    grads = torch.autograd.grad(y, wrt, dy)
    out = {"y": y.detach(), "dx": grads[0]}
    out.update({f"d{k}": gr for k, gr in zip(given, grads[1:])})
    return out


def err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(name, ours, theirs, ref, dtype, factor):
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == dtype, f"{name}: dtype {ours.dtype} != {dtype}"
    scale = ref.abs().max().item() if ref.numel() else 1.0
    e_ours, e_torch = err(ours, ref), err(theirs, ref)
    bound = factor * e_torch + FLOOR[dtype] * max(scale, 1.0)
    assert e_ours <= bound, f"{name}: error {e_ours:.3g} vs fp64 > {factor} x torch's {e_torch:.3g} + floor = {bound:.3g}"
