"""Row ops (and rotary) on inputs with no rows (tokens), through autograd as a user reaches them (``.sum().backward()``):
the gradient arrives expanded (strides 0), which counts as contiguous for an empty tensor; every
backend gives empty gradients of the inputs' shapes and zero weight and bias gradients."""

import pytest
import torch

from backend_rows import rows
from fastarch import backend as forced
from fastarch import ops

N = 8
CASES = {  # name -> (the registry op, a function of (x, w) -> output)
    "layer_norm": ("layer_norm", lambda x, w: ops.layer_norm(x, w, w)),
    "rms_norm": ("rms_norm", lambda x, w: ops.rms_norm(x, w, 1e-6)),
    "add_layer_norm": ("add_layer_norm", lambda x, w: ops.add_layer_norm(x, x, w, w)[0]),
    "add_rms_norm": ("add_rms_norm", lambda x, w: ops.add_rms_norm(x, x, w, 1e-6)[0]),
    "bias_gelu": ("bias_gelu", lambda x, w: ops.bias_gelu(x, w)),
    "swiglu": ("swiglu", lambda x, w: ops.swiglu(x, x * w)),
    "geglu": ("geglu", lambda x, w: ops.geglu(x, x * w)),
    "geglu_packed": ("geglu_packed", lambda x, w: ops.geglu_packed(torch.cat([x, x * w], -1))),
}
cos, sin, _ = ops.rotary_tables(N, 16, 10000.0, None)
# (each output summed over its last dim: their gradients arrive expanded, as from .sum())
# (the tables on the inputs' device: the CUDA kernel reads them there)
CASES["rotary"] = ("rotary", lambda x, w: torch.cat(
    [t.sum(-1) for t in ops.rotary((x * w).view(1, 1, -1, N), x.view(1, 1, -1, N), cos.to(x.device),
                                   sin.to(x.device))], -1))
PARAMS = [pytest.param(case, *row.values, marks=row.marks, id=f"{case}-{row.id}")
          for case, (op, _) in CASES.items() for row in rows(op)]


@pytest.mark.parametrize("case,backend,device", PARAMS)
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["0-rows", "2x0-rows"])
def test_no_rows_forward_and_backward(case, backend, device, lead):
    _, fn = CASES[case]
    x = torch.randn(*lead, N, device=device, requires_grad=True)
    w = torch.randn(N, device=device, requires_grad=True)
    with forced(backend):
        y = fn(x, w)
        y.sum().backward()
    assert y.numel() == 0
    assert x.grad.shape == x.shape
    assert w.grad is not None and torch.equal(w.grad, torch.zeros_like(w))
