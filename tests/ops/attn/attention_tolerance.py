"""The absolute error floor of the attention tests, added to FACTOR x the same-dtype error.

bf16/fp16: flash-attention's own test atol, 2 x max |((x + 0.3) - 0.3) - x| over x = the fp64
truth rounded to the dtype: twice the error of one rounding of values of the truth's
magnitude (plus 0.3, so that outputs near 0 still get a rounding of a value near the
probabilities' scale), and at least one ulp of 0.3. It follows the truth's scale: small decode outputs (~0.1) get a floor
of ~1e-3 in bf16, not an absolute 1e-2 that would hide a dropped key.
fp32: 1e-5 of max |truth| (at least 1e-5): our fp32 kernels sum over thousands of keys in
another order than the reference, a few ulps at the output's scale; the same-dtype error of
the math path is of the same size, so the floor only keeps tiny cases from failing on one ulp.
"""

from __future__ import annotations

import torch

RELATIVE = {torch.float32: 1e-5, torch.float64: 1e-12}


def floor(truth: torch.Tensor, dtype: torch.dtype, grad: bool = False) -> float:
    """The floor for a result whose fp64 truth is ``truth``. grad: a gradient, whose floor is
    at least two ulps of 1.0: dS = P (dP - delta) subtracts two O(1) fp32 sums (dO V^T, and
    rowsum(dO * O) over the output rounded to the dtype), so a gradient whose truth cancels to
    ~0 (e.g. a query that sees one key) keeps an error at the scale of those terms."""
    if truth.numel() == 0:
        return 0.0
    if dtype in RELATIVE:
        return RELATIVE[dtype] * max(truth.abs().max().item(), 1.0)
    x = truth.to(dtype)
    # at least one ulp of 0.3: the formula gives 0 where the truth is exactly 0
    least = (2.0 if grad else 0.3) * torch.finfo(dtype).eps
    return max(2 * ((x + 0.3) - 0.3 - x).abs().max().item(), least)
