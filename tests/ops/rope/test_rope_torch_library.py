"""rotary as a torch op: opcheck (schema, fake tensors, autograd registration, AOT dispatch)
and torch.compile(fullgraph=True) giving exactly the eager results, forward and backward."""

from __future__ import annotations

import pytest
import torch

from fastarch import ops
from rope_cases import CASES, make


def _args(case, requires_grad=True, dtype=torch.float32):
    q, k, cos, sin, positions = make(case, dtype)
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad), cos, sin, positions


@pytest.mark.parametrize("backend", ["", "reference"], ids=["auto", "reference"])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]], ids=str)
def test_opcheck_rotary(case, backend):
    q, k, cos, sin, positions = _args(case)
    for interleaved in (False, True):
        torch.library.opcheck(torch.ops.fastarch.rotary.default, (q, k, cos, sin, positions, interleaved, backend))


def test_opcheck_backward_and_kernel_op():
    q, k, cos, sin, positions = _args(CASES[2], requires_grad=False)
    torch.library.opcheck(torch.ops.fastarch.rotary_backward.default, (q, k, cos, sin, positions, True, ""))
    torch.library.opcheck(torch.ops.fastarch._rotary.default, (q, k, cos, sin, positions, False, False))
    q, k, cos, sin, positions = _args(CASES[4], requires_grad=False)
    torch.library.opcheck(torch.ops.fastarch._rotary.default, (q, k, cos, sin, positions, True, True))


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["rotary-cuda", "rotary-triton", "_triton_rotary"])
def test_opcheck_on_cuda(op):
    q, k, cos, sin, positions = (t.cuda() if t is not None else None for t in _args(CASES[2], requires_grad=False))
    if op == "_triton_rotary":
        torch.library.opcheck(torch.ops.fastarch._triton_rotary.default, (q, k, cos, sin, positions, True, False))
    else:
        backend = op.split("-")[1]
        torch.library.opcheck(torch.ops.fastarch.rotary.default, (q, k, cos, sin, positions, False, backend))


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=str)
def test_compile_fullgraph_matches_eager(case):
    """Outputs and gradients bit for bit (compared directly: a loss summed by the compiled
    graph would add in another order than eager)."""

    def step(q, k, cos, sin, positions):
        q_out, k_out = ops.rotary(q, k, cos, sin, positions, interleaved=True)
        return q_out * 2, k_out

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    q, k, cos, sin, positions = _args(case)
    grads_out = (torch.randn(q.shape), torch.randn(k.shape))
    eager = step(q, k, cos, sin, positions)
    eager_grads = torch.autograd.grad(eager, (q, k), grads_out)
    outs = compiled(q, k, cos, sin, positions)
    grads = torch.autograd.grad(outs, (q, k), grads_out)
    for a, b in zip(outs + grads, eager + eager_grads):
        assert torch.equal(a, b)
