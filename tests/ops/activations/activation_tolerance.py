"""How the activation tests judge a result (as tests/ops/norms/test_norms.py): the error of ours
against an fp64 computation on the same inputs must be at most ``factor`` x the error of
PyTorch's own same-dtype computation against it, plus a floor of two ulps of the dtype at the
output's scale (for when PyTorch happens to be nearly exact)."""

from __future__ import annotations

import torch

# dtype -> floor of the error, relative to max |reference|: two ulps at 1.0
FLOOR = {torch.float32: 2.4e-7, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-14}


def err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(name, ours, theirs, ref, dtype, factor):
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == dtype, f"{name}: dtype {ours.dtype} != {dtype}"
    scale = ref.abs().max().item() if ref.numel() else 1.0
    e_ours, e_torch = err(ours, ref), err(theirs, ref)
    bound = factor * e_torch + FLOOR[dtype] * max(scale, 1.0)
    assert e_ours <= bound, f"{name}: error {e_ours:.3g} vs fp64 > {factor} x torch's {e_torch:.3g} + floor = {bound:.3g}"
