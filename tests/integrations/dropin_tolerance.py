"""How the drop-in tests judge a result, as tests/ops/attn/test_attention.py judges kernels:
against an fp64 run of the same model, fastarch's error may be at most FACTOR x torch's own
error in the same dtype, plus a floor of a few roundings of the dtype at the output's scale
(an honest kernel rounds once where torch rounds several times: it lands near 1x; a wrong
mask, scale or layout lands at 100x or more)."""

from __future__ import annotations

import torch

FACTOR = 2.0
FLOOR_ULPS = {torch.float32: 8, torch.bfloat16: 2, torch.float16: 2}


def errors(ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor) -> tuple[float, float, float]:
    """(our max error, torch's max error, the floor), all against ``exact`` (fp64)."""
    exact = exact.double()
    ours_err = (ours.double() - exact).abs().max().item()
    theirs_err = (theirs.double() - exact).abs().max().item()
    floor = FLOOR_ULPS[ours.dtype] * torch.finfo(ours.dtype).eps * max(exact.abs().max().item(), 1.0)
    return ours_err, theirs_err, floor


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor, factor: float = FACTOR) -> None:
    """ours: fastarch's result; theirs: torch's in the same dtype; exact: the fp64 result."""
    assert ours.shape == theirs.shape == exact.shape and ours.dtype == theirs.dtype
    assert not ours.isnan().any()
    ours_err, theirs_err, floor = errors(ours, theirs, exact)
    assert ours_err <= factor * theirs_err + floor, (
        f"fastarch's error {ours_err:.3g} > {factor} x torch's {theirs_err:.3g} + {floor:.3g}"
    )
