"""The ops' eager fast path (fastarch/ops/dispatch.py) and the registry's memo of its choices.

A call that needs nothing from torch's dispatcher runs the op's function directly: the same
bits as the custom op through the dispatcher, for every public op on the CPU. A call that needs
autograd alone runs the op's own autograd.Function: the same outputs and gradients.
torch.compile, fake tensors and dispatch modes still go through the custom op. The registry
remembers its choice per (op, problem, requested backend), and a ``fastarch.backend`` block
still decides inside it and only inside it.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastarch
from fastarch import ops, registry
from fastarch.ops import dispatch


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


class SeeOps(TorchDispatchMode):
    """A dispatch mode that only records what it sees: with it active the ops cannot take the
    fast path, so a call under it is the custom op through the dispatcher."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def decisions(monkeypatch):
    """Every call_path answer during the test, in order."""
    answers = []
    real = dispatch.call_path

    def spy(args):
        answers.append(real(args))
        return answers[-1]

    monkeypatch.setattr(dispatch, "call_path", spy)
    return answers


DIRECT, AUTOGRAD, DISPATCHER = dispatch.DIRECT, dispatch.AUTOGRAD, dispatch.DISPATCHER


def _cases(dtype):
    """name -> (the fastarch:: op a call makes, a function running the public op -> tensors)."""
    x, r = randn(3, 5, 40, seed=1, dtype=dtype), randn(3, 5, 40, seed=2, dtype=dtype)
    w, b = randn(40, seed=3, dtype=dtype), randn(40, seed=4, dtype=dtype)
    gate_up = randn(7, 2 * 24, seed=5, dtype=dtype)
    q, k, v = randn(2, 4, 9, 16, seed=6, dtype=dtype), randn(2, 2, 13, 16, seed=7, dtype=dtype), randn(
        2, 2, 13, 16, seed=8, dtype=dtype)
    cos, sin, _ = ops.rotary_tables(16, 64, 10000.0, None)
    offsets = torch.tensor([3, 11])
    cu = torch.tensor([0, 4, 13], dtype=torch.int32)
    packed = randn(13, 4, 16, seed=9, dtype=dtype), randn(13, 2, 16, seed=10, dtype=dtype), randn(
        13, 2, 16, seed=11, dtype=dtype)
    k_cache, v_cache = randn(2, 2, 20, 16, seed=12, dtype=dtype), randn(2, 2, 20, 16, seed=13, dtype=dtype)
    lens = torch.tensor([5, 13], dtype=torch.int32)

    def append():
        kc, vc = k_cache.clone(), v_cache.clone()
        ops.append_kv(kc, vc, k[:, :, :3], v[:, :, :3], lens)
        return kc, vc

    return {
        "layer_norm": ("layer_norm", lambda: ops.layer_norm(x, w, b)),
        "rms_norm": ("rms_norm", lambda: ops.rms_norm(x, w, eps=1e-6)),
        "add_layer_norm": ("add_layer_norm", lambda: ops.add_layer_norm(x, r, w, b)),
        "add_rms_norm": ("add_rms_norm", lambda: ops.add_rms_norm(x, r, w, eps=1e-6)),
        "bias_gelu": ("bias_gelu", lambda: ops.bias_gelu(x, b)),
        "bias_gelu_tanh": ("bias_gelu", lambda: ops.bias_gelu(x, b, approximate="tanh")),
        "swiglu": ("swiglu", lambda: ops.swiglu(*gate_up.chunk(2, -1))),
        "rotary": ("rotary", lambda: ops.rotary(q, k[:, :, :9], cos, sin, offsets)),
        "attention": ("attention", lambda: ops.attention(q, k, v, causal=True, return_lse=True)),
        "attention_varlen": ("attention", lambda: ops.attention(
            *packed, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, window=5)),
        "attention_decode": ("attention_decode", lambda: ops.attention_decode(
            q[:, :, :2], k_cache, v_cache, lens, return_lse=True)),
        "append_kv": ("append_kv", append),
    }


def _tensors(out):
    return out if isinstance(out, tuple) else (out,)


CASES = list(_cases(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_fast_path_gives_the_custom_ops_bits(case, dtype, mode, decisions):
    op, run = _cases(dtype)[case]
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        fast = _tensors(run())
        assert decisions and all(d == DIRECT for d in decisions), "the fast path was not taken"
        with SeeOps() as seen:
            slow = _tensors(run())
    assert f"fastarch.{op}" in seen.seen, "the dispatch mode did not see the custom op"
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
        assert torch.equal(a, b)


def test_fast_path_with_grad_mode_on_and_no_input_that_requires_grad(decisions):
    """Plain eager code (no no_grad block) on constants: no autograd, so the fast path."""
    x, w = randn(4, 8), randn(8)
    y = ops.rms_norm(x, w)
    assert decisions == [DIRECT] and y.grad_fn is None


GRAD_CASES = {
    "layer_norm": lambda x, w: ops.layer_norm(x, w, w),
    "add_rms_norm": lambda x, w: ops.add_rms_norm(x, x.flip(0), w)[0],
    "bias_gelu": lambda x, w: ops.bias_gelu(x, w),
    "swiglu": lambda x, w: ops.swiglu(x, x * w),
    "rotary": lambda x, w: ops.rotary(x.view(2, 2, 3, 8), x.view(2, 2, 3, 8), *ops.rotary_tables(8, 16, 10000.0, None)[:2])[0],
    "attention": lambda x, w: ops.attention(*(x.view(2, 2, 3, 8),) * 3, causal=True),
}


GRAD_CASES["group_norm"] = lambda x, w: ops.group_norm(x.view(2, 8, 6), 4, w, w, activation="silu")


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_autograd_takes_the_ops_own_function(case, decisions):
    """An input that requires grad: the forward runs the op's autograd.Function (autograd
    records it, the dispatcher is not involved); the backward ops, run by the autograd engine
    with grad mode off, take the direct path. Outputs and gradients are the bits of the custom
    op through the dispatcher (torch.library's autograd layer)."""
    fn = GRAD_CASES[case]
    x, w = randn(12, 8, seed=1).requires_grad_(), randn(8, seed=2).requires_grad_()
    y = fn(x, w)
    assert decisions[0] == AUTOGRAD and y.grad_fn is not None
    assert type(y.grad_fn).__name__.startswith("fastarch_")
    grads = torch.autograd.grad(y, (x, w), torch.ones_like(y), allow_unused=True)
    assert DIRECT in decisions[1:], "the backward ops did not take the fast path"
    with SeeOps() as seen:
        y2 = fn(x, w)
        grads2 = torch.autograd.grad(y2, (x, w), torch.ones_like(y2), allow_unused=True)
    assert seen.seen, "the dispatch mode did not see the custom op"
    assert not type(y2.grad_fn).__name__.startswith("fastarch_")
    assert torch.equal(y, y2)
    for a, b in zip(grads, grads2):
        assert (a is None and b is None) or torch.equal(a, b)


def test_autograd_function_gets_every_argument_and_checks_its_gradients():
    """A call leaving trailing arguments to their defaults: setup_context still receives every
    argument (as torch.library's autograd layer gives it them), and an unwanted gradient (w
    does not require grad) is None."""
    x, w = randn(4, 8).requires_grad_(), randn(8)
    y = ops.rms_norm(x, w)
    (dx,) = torch.autograd.grad(y.sum(), (x,))
    with SeeOps():
        (dx2,) = torch.autograd.grad(ops.rms_norm(x, w).sum(), (x,))
    assert torch.equal(dx, dx2)


def test_autograd_function_binds_no_signature_per_call(monkeypatch, decisions):
    """The fast path's autograd.Function gets its arguments complete: a call does not bind
    them to the forward's signature (torch's apply does, with inspect, for a Function that
    defines setup_context: ~70 us of a group_norm forward + backward at batch 1)."""
    import inspect

    x, w = randn(1, 8, 4, 4).requires_grad_(), randn(8).requires_grad_()
    ops.group_norm(x, 4, w, activation="silu").sum().backward()  # first call: imports, memos
    calls = []
    real = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: calls.append(a) or real(*a, **k))
    ops.group_norm(x, 4, w, activation="silu").sum().backward()
    assert decisions[-2:] == [AUTOGRAD, DIRECT] and calls == []


def test_double_backward_is_refused_as_through_the_dispatcher():
    """create_graph=True: the backward ops have no gradient of their own, through either path."""
    x = randn(4, 8).requires_grad_()
    messages = []
    for see in (False, True):
        with SeeOps() if see else contextlib.nullcontext():
            y = ops.rms_norm(x)
            (dx,) = torch.autograd.grad(y.sum(), (x,), create_graph=True)
            with pytest.raises(RuntimeError) as err:
                dx.sum().backward()
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "no autograd formula was registered" in messages[0]


def test_call_path_of_argument_lists():
    x, g = randn(2, 3), randn(2, 3).requires_grad_()
    assert dispatch.call_path((x, 3, [1, 2], None, "cpu")) == DIRECT
    assert dispatch.call_path((x, g, 1e-5)) == AUTOGRAD
    with torch.no_grad():
        assert dispatch.call_path((x, g)) == DIRECT
    assert dispatch.call_path((x, [x, x])) == DISPATCHER  # tensors in a list are not looked into
    assert dispatch.call_path((g, (x,))) == DISPATCHER
    assert dispatch.call_path((torch.empty(2, device="meta"),)) == DISPATCHER


def test_no_grad_with_inputs_that_require_grad_takes_the_fast_path(decisions):
    x = randn(4, 8).requires_grad_()
    with torch.no_grad():
        ops.rms_norm(x)
    assert decisions == [DIRECT]


@pytest.fixture
def checks_run(monkeypatch):
    """How often rms_norm's input check ran during the test."""
    from fastarch.ops.norms import api

    count = [0]
    real = api._check_inputs

    def spy(*args):
        count[0] += 1
        return real(*args)

    monkeypatch.setattr(api, "_check_inputs", spy)
    return count


@pytest.mark.parametrize("path", [DIRECT, AUTOGRAD, DISPATCHER])
def test_the_input_check_runs_once_per_call_on_the_fast_paths(path, checks_run, decisions):
    x, w = randn(4, 8), randn(8)
    if path == AUTOGRAD:
        x.requires_grad_()
    with SeeOps() if path == DISPATCHER else contextlib.nullcontext():
        ops.rms_norm(x, w, eps=1e-6)
    assert decisions == [path]
    # the direct and autograd paths check once, before choosing; the dispatcher path checks
    # again inside the registered op (what a torch.ops.fastarch call runs)
    assert checks_run[0] == (2 if path == DISPATCHER else 1)


@pytest.mark.parametrize("call", ["public", "torch.ops", "dispatcher", "fake"])
def test_bad_input_gets_the_ops_message_on_every_path(call):
    x, w = randn(4, 8), randn(7)
    expected = r"fastarch.rms_norm: weight must have shape \(8,\)"
    with pytest.raises(ValueError, match=expected):
        if call == "public":
            ops.rms_norm(x, w, eps=1e-6)
        elif call == "torch.ops":
            torch.ops.fastarch.rms_norm(x, w, 1e-6)
        elif call == "dispatcher":
            with SeeOps():
                ops.rms_norm(x, w, eps=1e-6)
        else:
            with FakeTensorMode() as mode:
                torch.ops.fastarch.rms_norm(mode.from_tensor(x), mode.from_tensor(w), 1e-6)


def test_torch_compile_sees_the_custom_op():
    """fullgraph: the compiled graph holds the custom op itself (nothing was run directly at
    trace time), and it computes what eager does."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, r, w = randn(4, 16), randn(4, 16, seed=1), randn(16, seed=2)

    def f(x, r):
        y, s = ops.add_rms_norm(x, r, w, eps=1e-6)
        return ops.swiglu(y, s)

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(f, backend=capture, fullgraph=True)(x, r)
        expected = f(x, r)
    targets = {n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.fastarch.add_rms_norm.default in targets and torch.ops.fastarch.swiglu.default in targets
    assert torch.equal(out, expected)


def test_fake_and_meta_tensors_take_the_custom_op(decisions):
    x = randn(4, 8)
    with FakeTensorMode() as mode:
        y = ops.rms_norm(mode.from_tensor(x))
    assert y.shape == (4, 8) and type(y).__name__ == "FakeTensor"
    m = ops.rms_norm(torch.empty(4, 8, device="meta"))
    assert m.device.type == "meta"
    assert decisions == [DISPATCHER, DISPATCHER]


def test_torch_function_mode_takes_the_custom_op(decisions):
    with torch.device("cpu"):  # a TorchFunctionMode
        ops.rms_norm(randn(4, 8))
    assert decisions == [DISPATCHER]


def test_fast_append_kv_bumps_the_caches_versions_like_the_dispatcher():
    """Outside inference mode a mutated input's version counter moves (what autograd checks a
    saved tensor with), as through the dispatcher."""
    k_new = randn(1, 2, 1, 8)
    bumps = []
    for see in (False, True):
        kc, vc = torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8)
        before = kc._version, vc._version
        with torch.no_grad(), SeeOps() if see else contextlib.nullcontext():
            ops.append_kv(kc, vc, k_new, k_new, torch.zeros(1, dtype=torch.int32))
        bumps.append((kc._version - before[0], vc._version - before[1]))
    assert bumps[0] == bumps[1] and bumps[0][0] > 0


def test_the_profiler_records_the_fast_path_under_the_ops_name():
    x = randn(4, 8)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.rms_norm(x)
    assert "fastarch::rms_norm" in {e.key for e in prof.key_averages()}


# ----------------------------------------------------------------------------- the registry's memo


def _spy_table(monkeypatch, op: str):
    """Replaces op's table with copies whose supports and forward record their calls."""
    supports, ran = [], []

    def wrap(b):
        def check(problem):
            supports.append(b.name)
            return b.supports(problem)

        def forward(*args):
            ran.append(b.name)
            return b.forward(*args)

        return dataclasses.replace(b, supports=check, forward=forward)

    monkeypatch.setitem(registry._REGISTRY, op, [wrap(b) for b in registry.backends_of(op)])
    return supports, ran


def test_choices_are_remembered_per_problem(monkeypatch):
    supports, ran = _spy_table(monkeypatch, "rms_norm")
    x = randn(4, 8)
    for _ in range(3):
        ops.rms_norm(x)
    first = list(supports)
    assert ran == ["cpu"] * 3 and first  # asked once, then remembered
    ops.rms_norm(randn(5, 8))  # another shape: another problem, asked again
    assert len(supports) > len(first) and ran[-1] == "cpu"


def test_choices_follow_backend_blocks(monkeypatch):
    _, ran = _spy_table(monkeypatch, "rms_norm")
    x = randn(4, 8)
    ops.rms_norm(x)
    with fastarch.backend("reference"):
        ops.rms_norm(x)
        ops.rms_norm(x)
        ops.rms_norm(x, backend="cpu")
    ops.rms_norm(x)
    with fastarch.backend("reference"):
        ops.rms_norm(x)
    assert ran == ["cpu", "reference", "reference", "cpu", "cpu", "reference"]


def test_a_replaced_table_is_not_answered_from_the_memo(monkeypatch):
    x = randn(4, 8)
    ops.rms_norm(x)  # remembered for the registered table
    _, ran = _spy_table(monkeypatch, "rms_norm")
    ops.rms_norm(x)
    assert ran == ["cpu"]


def test_no_backend_is_an_error_every_time(monkeypatch):
    never = registry.Backend("reference", lambda: None, lambda p: "never in this test", None)
    monkeypatch.setitem(registry._REGISTRY, "rms_norm", [never])
    for _ in range(2):
        with pytest.raises(fastarch.NoBackendError, match="no backend can run .*\n  reference: never in this test"):
            ops.rms_norm(randn(2, 4))
    with pytest.raises(fastarch.NoBackendError, match="backend 'cpu' cannot run"):
        ops.rms_norm(randn(2, 4), backend="cpu")
