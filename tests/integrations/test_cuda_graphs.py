"""fastarch.cuda_graphs.GraphedCall: what it captures, refuses and replays.

No CUDA graph can be captured on the CPU, so the CPU rows run GraphedCall's own logic (the
signatures, the three calls before a replay, the guards, the check, the copies out) over a
stand-in for the device's part: FakeGraph replays by recomputing the captured call on the
graph's input copies and writing the results into the captured output tensors, which is what
a CUDA graph's replay does to its buffers. The gpu rows capture real graphs.
"""

from __future__ import annotations

import copy
import gc
import inspect
import os
import pickle
import sys
import warnings
from dataclasses import dataclass
from unittest import mock
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from dropin_tolerance import assert_close  # tests/integrations/dropin_tolerance.py
from host_reads import PythonReads, host_reads, on_a_gpu  # tests/host_reads.py
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import fastarch
from fastarch import cuda_graphs
from fastarch.cuda_graphs import GraphedCall


class FakeGraph:
    """A CUDA graph's semantics on the CPU: the call traced once into the ops it runs (make_fx
    on real tensors, as a capture records kernels), each replay running those ops again on the
    very tensors they used (the graph's input copies, the module's weights, a state's tensors:
    a replay reads their current values and writes where the capture's ops wrote, and a weight
    replaced since is not seen) and writing its results into the outputs of the capture. What
    the Python decided while tracing (a branch, a value read on the host) is baked in, as in a
    graph. frozen=True: a graph that baked every value in (its replays change nothing)."""

    frozen = False

    def __init__(self, run) -> None:
        self.replays = 0
        traced = {}

        def tensors():
            traced["out"] = run()
            return [t for t in pytree.tree_leaves(traced["out"]) if isinstance(t, torch.Tensor)]

        # Tracing runs the call once, as the stand-in's capture. It sees what a capture sees:
        # transformers told that a stream captures (its is_tracing then skips its reads of mask
        # values), fastarch's direct kernel calls not sent to the dispatcher path by the
        # tracer's own modes (a capture has none; the kernel ops are still recorded).
        with mock.patch("transformers.utils.import_utils.is_cuda_stream_capturing", lambda: True), \
                mock.patch("fastarch.ops.dispatch._dispatch_modes", lambda: 0), \
                mock.patch("fastarch.ops.dispatch._function_modes", lambda: False):
            self.ops = make_fx(tensors)()
        self.out = traced["out"]
        self.buffers = [t for t in pytree.tree_leaves(self.out) if isinstance(t, torch.Tensor)]

    def replay(self) -> None:
        self.replays += 1
        if not self.frozen:
            for mine, new in zip(self.buffers, self.ops()):
                mine.copy_(new)


class CpuGraphedCall(GraphedCall):
    """GraphedCall with the CPU as its graph device and FakeGraph as its graphs."""

    def _on_graph_device(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu"

    def _warm_up(self, run):
        return run()

    def _record(self, run, state):
        saved = [t.clone() for t in state]
        graph = FakeGraph(run)  # (which runs the call: a capture does not, the state stays)
        for t, s in zip(state, saved):
            t.copy_(s)
        return graph, graph.out


@dataclass
class Output:
    sample: torch.Tensor


# (not a pytree node: to a replay, an object it cannot copy out)


class Net(nn.Module):
    """Two layers and a dropout: an output that depends on every argument kind graphed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("shift", torch.full((4,), 0.25))

    def forward(self, x, t=None, *, scale: float = 1.0, labels=None):
        h = torch.nn.functional.gelu(self.inner(self.drop(x)))
        if t is not None:
            h = h + t.reshape(-1, 1)
        y = self.out(h) * scale + self.shift
        return {"y": y, "labels": labels, "scale": scale}


def graphed(model: nn.Module) -> CpuGraphedCall:
    return CpuGraphedCall(model, model.eval(), "the test's calls")


def _same(a: dict, b: dict) -> bool:
    return torch.equal(a["y"], b["y"]) and a["scale"] == b["scale"] and (
        a["labels"] is b["labels"] is None or torch.equal(a["labels"], b["labels"]))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_third_call_checks_then_replays_new_tensors(mode):
    """Call 1 eager, 2 captures, 3 checks the first replay against eager, 4 on replay; every
    result is the eager call's, in tensors of its own (a later replay does not overwrite it).
    Under inference_mode too, whose tensors keep no version counter."""
    model = Net()
    call = graphed(model)
    outs = []
    for i in range(6):
        with getattr(torch, mode)():
            x, t = torch.randn(3, 8), torch.randn(3)
            labels = torch.tensor([i, i + 1, i + 2])
            got = call(x, t, scale=2.0, labels=labels)
        with torch.no_grad():
            want = model(x, t, scale=2.0, labels=labels)
        assert _same(got, want)
        outs.append((got, want))
        assert len(call.graphs) == (i >= 1) and call.kept == (i >= 2)
    graph = next(iter(call.graphs.values())).graph
    assert graph.replays == 4  # the check's and three more
    for got, want in outs:  # nothing a replay wrote reached an earlier result
        assert _same(got, want)
    assert len({o["y"].data_ptr() for o, _ in outs}) == len(outs)


@torch.no_grad()
def test_signatures_and_their_limit(monkeypatch):
    """A new shape, dtype, stride or plain value is another signature; past MAX_GRAPHS graphs
    the rest run eagerly; a plain value that changes each call never repeats a signature."""
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 2)
    model = Net()
    call = graphed(model)
    for rows in (2, 3, 5):
        x = torch.randn(rows, 8)
        for _ in range(3):
            assert _same(call(x), model(x))
    assert len(call.graphs) == 2 and call.kept == 2
    fresh = graphed(model)
    for scale in (0.5, 1.5, 2.5, 3.5):  # a Python number changing every call: no graph
        x = torch.randn(2, 8)
        assert _same(fresh(x, scale=scale), model(x, scale=scale))
    assert not fresh.graphs and len(fresh.seen) == 4
    wide = torch.randn(8, 2).t()  # the same shape in other strides: another signature
    assert call._signature(*pytree.tree_flatten(((wide,), {}))) != call._signature(
        *pytree.tree_flatten(((wide.contiguous(),), {})))


def test_eager_when_a_replay_could_not_repeat_the_call(monkeypatch):
    """Gradients, training mode, a tensor off the graph device, an argument of another kind,
    no tensor at all, the switch off: every call eager, no graph."""
    model = Net()
    call = graphed(model)
    x = torch.randn(2, 8, requires_grad=True)
    for _ in range(3):
        call(x).get("y").sum().backward()  # grad enabled
    assert x.grad is not None and not call.graphs and not call.seen
    with torch.no_grad():
        model.train()
        for _ in range(3):
            call(x)
        model.eval()
        for _ in range(3):
            call(x, labels=[1, 2])  # a list leaf is fine (pytree), an object is not:
            call(x, labels=object())
        assert len(call.graphs) == 1  # (the list's calls)
        call.graphs.clear()
        monkeypatch.setenv("FASTARCH_CUDA_GRAPHS", "0")
        for _ in range(3):
            call(x)
        assert not call.graphs
    real = GraphedCall(model, model)  # the device's own part: CPU tensors are never graphed
    with torch.no_grad():
        monkeypatch.setenv("FASTARCH_CUDA_GRAPHS", "1")
        for _ in range(3):
            assert _same(real(x), model(x))
    assert not real.graphs and not real.seen


@torch.no_grad()
def test_the_modules_tensors_are_watched():
    """In-place updates reach the replays; a parameter's data replaced (as .to() and .half() do),
    a parameter put into its module's dict directly (as torch.func.functional_call does) or
    assigned drops the graph and captures again; a hook on a module inside refuses. (On the
    stand-in every result is right anyway: the assertions on the graphs are what could fail.)"""
    model = Net()
    call = graphed(model)
    x = torch.randn(2, 8)
    for _ in range(3):
        call(x)
    assert call.kept == 1
    model.out.weight.add_(1.0)  # in place: the same graph, its replay sees the new values
    assert _same(call(x), model(x)) and call.kept == 1
    model.out.weight.data = model.out.weight.data * 3  # new memory, no registration (as .to() does)
    assert _same(call(x), model(x)) and not call.graphs  # dropped, eager
    for _ in range(2):
        assert _same(call(x), model(x))
    assert call.kept == 1  # captured again
    model.out._parameters["weight"] = nn.Parameter(model.out.weight * 2)  # no hook sees it (functional_call's way)
    assert _same(call(x), model(x)) and not call.graphs  # dropped, eager
    for _ in range(2):
        assert _same(call(x), model(x))
    assert call.kept == 1
    model.out.weight = nn.Parameter(model.out.weight * 2)
    assert _same(call(x), model(x)) and not call.graphs  # dropped, eager
    for _ in range(2):
        assert _same(call(x), model(x))
    assert call.kept == 1  # captured again
    model.inner.register_forward_hook(lambda m, i, o: None)
    with pytest.warns(RuntimeWarning, match="has hooks"):
        for _ in range(3):
            assert _same(call(x), model(x))
    assert not call.graphs and call.refused


@pytest.mark.parametrize("case", ["writes its input", "writes its module", "capture fails", "baked in", "odd output"])
def test_refused_calls_warn_once_and_run_eagerly(case, monkeypatch):
    model = Net()
    call = graphed(model)

    def fn(x):
        if case == "writes its input":
            x.mul_(1.0)
        if case == "writes its module":  # (a buffer the check's eager call and replay would both write)
            model.shift.mul_(1.0)
        if case == "capture fails" and getattr(call, "capturing", False):
            raise RuntimeError("operation not permitted when stream is capturing")
        y = model(x)["y"]
        return Output(y) if case == "odd output" else y

    call.fn = fn
    if case == "capture fails":
        real = CpuGraphedCall._record

        def record(self, run, state):
            self.capturing = True
            try:
                return real(self, run, state)
            finally:
                self.capturing = False

        monkeypatch.setattr(CpuGraphedCall, "_record", record)
    if case == "baked in":
        monkeypatch.setattr(FakeGraph, "frozen", True)
    why = {"writes its input": "writes into its tensor arguments",
           "writes its module": "writes into the module's parameters or buffers", "capture fails": "the capture failed",
           "baked in": "first replay differed", "odd output": "returns a Output"}[case]
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for i in range(6):
            x = torch.randn(2, 8)
            got = call(x)
            got = got.sample if isinstance(got, Output) else got
            assert torch.equal(got, model(x)["y"])
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and why in messages[0], messages
    assert not call.kept and len(call.refused) == 1


@torch.no_grad()
def test_nan_in_nan_out_and_kept():
    """A NaN in the inputs gives the eager call's NaNs, and a graph whose replay gives NaN where
    the eager call does is kept (torch.equal would call them different)."""
    model = Net()
    call = graphed(model)
    x = torch.randn(2, 8)
    x[1, 3] = float("nan")
    for _ in range(4):
        got = call(x)["y"]
        assert torch.isnan(got[1]).all() and not torch.isnan(got[0]).any()
        torch.testing.assert_close(got, model(x)["y"], equal_nan=True, rtol=0, atol=0)
    assert call.kept == 1


@torch.no_grad()
def test_copies_keep_no_graphs():
    """A deep copy or a pickle of the module (optimize(inplace=False) deep-copies) calls its
    own forward and starts without graphs."""
    model = Net().eval()
    call = CpuGraphedCall(model.forward, model)
    model.__dict__["forward"] = call
    x = torch.randn(2, 8)
    for _ in range(3):
        model(x)
    twin = copy.deepcopy(model)
    loaded = pickle.loads(pickle.dumps(model))
    for other in (twin, loaded):
        graphed_twin = other.__dict__["forward"]
        assert isinstance(graphed_twin, CpuGraphedCall) and not graphed_twin.graphs
        assert graphed_twin.watch is other and graphed_twin.fn.__self__ is other
        other.out.bias.add_(1.0)
        assert _same(other(x), type(other).forward(other, x)) and not _same(other(x), model(x))


def test_keeps_the_signature_callers_read():
    """inspect.signature of a GraphedCall is its function's: transformers' generate passes
    position_ids and logits_to_keep only to a forward that names them (without them, GPT-2's
    left-padded rows got other logits)."""
    model = _tiny_llama()
    call = CpuGraphedCall(model.forward, model)
    assert inspect.signature(call) == inspect.signature(model.forward)
    seen = []
    real = model.forward
    model.__dict__["forward"] = call
    call.fn = lambda *args, **kwargs: seen.append(sorted(kwargs)) or real(*args, **kwargs)
    call.__signature__ = inspect.signature(real)
    ids = torch.randint(1, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert seen and all("position_ids" in kw and "logits_to_keep" in kw for kw in seen), seen


def test_compiles_without_graph_break_or_graphs():
    """Under torch.compile the call is traced through (fullgraph), no graph of ours taken: the
    compiled code is torch's to run, and its results the eager model's within inductor's
    roundings (fp32: its fused GELU)."""
    model = Net().eval()
    model.__dict__["forward"] = graphed = CpuGraphedCall(model.forward, model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 8)
    with torch.no_grad():
        for _ in range(4):
            got = compiled(x)["y"]
        torch.testing.assert_close(got, Net.forward(model, x)["y"], rtol=1e-6, atol=1e-6)
    assert not graphed.graphs and not graphed.seen


def test_optimize_cuda_graphs(monkeypatch):
    """optimize(cuda_graphs=True): without a CUDA device the report says so and forward is left;
    with one, forward becomes a GraphedCall (the same state_dict, the same results, the report's
    row), restore takes it away, and an instance forward the model had comes back."""
    model = Net().eval()
    report = fastarch.optimize(model, cuda_graphs=True)
    assert "forward" not in model.__dict__
    assert any(e.path == "(model)" and not e.swapped and "no CUDA device" in e.detail for e in report.entries)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_graphs, "GraphedCall", CpuGraphedCall)
    keys = list(model.state_dict())
    report = fastarch.optimize(model, cuda_graphs=True)
    assert isinstance(model.__dict__["forward"], CpuGraphedCall) and list(model.state_dict()) == keys
    assert any(e.path == "(model)" and e.swapped and "CUDA graphs" in e.detail for e in report.entries)
    assert "CUDA graphs" in str(report)
    x = torch.randn(2, 8)
    with torch.no_grad():
        want = type(model).forward(model, x)
        for _ in range(4):
            assert _same(model(x), want)
    assert model.__dict__["forward"].kept == 1
    fastarch.optimize(model, cuda_graphs=True)  # again: the same GraphedCall, not one around it
    assert model.__dict__["forward"].fn.__func__ is Net.forward
    fastarch.restore(model)
    assert "forward" not in model.__dict__

    def own(x, *args, **kwargs):  # an instance forward, as accelerate's hooks install
        return Net.forward(model, x, *args, **kwargs)

    model.forward = own
    fastarch.optimize(model, cuda_graphs=True)
    assert model.__dict__["forward"].fn is own
    fastarch.restore(model)
    assert model.__dict__["forward"] is own


# ----------------------------------------------------------------------------- models people have


def _bert_and_padded_batch(device: str):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    model = BertModel(config).to(device).eval()
    ids = torch.randint(1, 64, (3, 11), device=device)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return model, ids, mask


def _five_calls_match_transformers(model, ids, mask):
    """A check, to run once model is optimized, that five calls (eager, capture, check, two
    replays) give the hidden states of model as it is now (transformers') at the real tokens,
    judged against its fp64 run as the drop-in tests judge (dropin_tolerance)."""
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(ids, attention_mask=mask).last_hidden_state
        theirs = model(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()

    def check() -> None:
        with torch.no_grad():
            for _ in range(5):
                ours = model(ids, attention_mask=mask).last_hidden_state
                assert_close(ours[real], theirs[real], exact[real])

    return check


def test_unpadded_encoder_steps_aside_while_recording(monkeypatch):
    """The unpadded encoder reads the mask on the host, which a capture may not: in the calls a
    graph is made from and checked against it steps aside (transformers' own layers run, with
    fastarch's attention), so that eager and replay run the same kernels; other calls pack.
    Replays give transformers' hidden states at the real tokens."""
    from fastarch.integrations import unpadded_encoder

    model, ids, mask = _bert_and_padded_batch("cpu")
    check = _five_calls_match_transformers(model, ids, mask)
    fastarch.optimize(model)
    model.__dict__["forward"] = graphed = CpuGraphedCall(model.forward, model)
    packed = []
    real_unpad = unpadded_encoder.unpad
    monkeypatch.setattr(unpadded_encoder, "unpad",
                        lambda real: packed.append(cuda_graphs.recording()) or real_unpad(real))
    check()
    assert graphed.kept == 1 and not graphed.refused
    assert packed == [False]  # the first call, before any recording; then the capture, the check, replays


def test_what_a_graph_captures_reads_nothing_on_the_host():
    """A capture fails on any read of the device's values on the host: the optimized diffusers
    UNet and fastarch's UNet2D read none (on the CPU, under a dispatch mode that sees every
    such read); the optimized padded BERT reads only in transformers' mask code, which skips
    that read while a stream captures (transformers' is_tracing), not in fastarch's."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16, norm_num_groups=8,
    ).eval()
    fastarch.optimize(unet)
    assert host_reads(lambda: unet(torch.randn(2, 3, 16, 16), torch.tensor([10, 20]))) == []

    from fastarch.models.unet2d import UNet2D

    sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
    from test_unet2d import CONFIGS, randomize

    for name in ("uncond", "cross", "cross_linear"):
        kind, config = CONFIGS[name]
        model = UNet2D.from_config({"_class_name": kind.__name__, **config}).eval()
        randomize(model)
        kw = {"encoder_hidden_states": torch.randn(2, 7, config["cross_attention_dim"])} if name != "uncond" else {}
        if name == "cross_linear":
            kw["class_labels"] = torch.tensor([1, 3])
        x = torch.randn(2, config["in_channels"], config["sample_size"], config["sample_size"])
        # (the class labels' range check is made by the first call of a signature, not while
        # a graph is made: cuda_graphs.recording())
        assert host_reads(lambda: model(x, torch.tensor(5), **kw)) == [], name

    bert, ids, mask = _bert_and_padded_batch("cpu")
    fastarch.optimize(bert)
    readers = host_reads(lambda: bert(ids, attention_mask=mask))
    assert readers and all(f"transformers{os.sep}masking_utils.py" in r for r in readers), readers


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("case", ["one prompt", "padded batch", "replay differs"])
def test_generate_with_a_static_cache_replays_its_decode_step(case, monkeypatch):
    """transformers' generate with cache_implementation="static" on an optimized LLaMA whose
    forward is graphed: the decode step, its StaticCache a state argument (updated in place by
    the replay as by the eager step), is captured at the second step, checked at the third and
    replayed for the rest: the eager generate's tokens. A replay that differs is refused with
    the cache as the eager step left it: the same tokens."""
    model = _tiny_llama()
    fastarch.optimize(model)
    ids = torch.randint(1, 64, (1, 5) if case != "padded batch" else (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if case == "padded batch":
        mask[0, :3] = 0  # left padding
    kw = dict(attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False, cache_implementation="static",
              disable_compile=True, pad_token_id=0)
    eager = model.generate(ids, **kw)
    replays = []
    real_replay = FakeGraph.replay
    monkeypatch.setattr(FakeGraph, "replay", lambda self: replays.append(1) or real_replay(self))
    if case == "replay differs":
        monkeypatch.setattr(FakeGraph, "frozen", True)
    model.__dict__["forward"] = graphed = CpuGraphedCall(model.forward, model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model.generate(ids, **kw)
    assert torch.equal(got, eager)
    refused = [str(w.message) for w in caught if "without a CUDA graph" in str(w.message)]
    if case == "replay differs":
        assert len(replays) == 1 and len(refused) == 1 and "first replay differed" in refused[0]
    else:
        assert len(replays) == 13 and not refused  # 15 decode steps: eager, capture, check, 12 replays


def test_a_static_cache_decode_step_reads_nothing_on_the_host():
    """The decode step generate graphs with a StaticCache reads nothing on the host, on the path
    a GPU runs (the decoder layers' direct step: Tensor methods patched, no dispatch mode), as
    GraphedCall calls what it captures: fastarch's layers nothing a GPU would read,
    transformers' code nothing."""
    model = _tiny_llama()
    fastarch.optimize(model)
    forward, readers, steps = model.forward, [], []

    def spied(*args, **kwargs):
        steps.append(1)
        if len(steps) == 1:
            return forward(*args, **kwargs)  # the prefill
        with cuda_graphs._recording_calls(), PythonReads() as reads:
            out = forward(*args, **kwargs)
        readers.extend(reads.readers)
        return out

    model.forward = spied
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                   cache_implementation="static", pad_token_id=0)
    assert len(steps) == 4 and readers == []


class Tally:
    """A state argument: a running total the call adds into (registered in the test below)."""

    def __init__(self) -> None:
        self.total = torch.zeros(8)


def test_a_state_argument(monkeypatch):
    """A registered state kind: keyed by identity (another object is another signature), updated
    in place by each replay as by the eager call (the check runs both from the same state), an
    output that is the object itself returned as itself, and the graph dropped with the object."""
    monkeypatch.setitem(cuda_graphs._STATE_KINDS, Tally, lambda tally: [tally.total])
    model = Net().eval()

    def step(x, tally):
        tally.total.add_(x.sum(0))
        return {"y": model(x)["y"] * tally.total.sum(), "tally": tally}

    call = CpuGraphedCall(step, model)
    tally, twin = Tally(), Tally()
    with torch.no_grad():
        for i in range(6):
            x = torch.randn(2, 8)
            before = twin.total.clone()
            twin.total.add_(x.sum(0))
            out = call(x, tally)
            assert out["tally"] is tally and torch.equal(tally.total, twin.total)
            twin.total.copy_(before)
            assert torch.equal(out["y"], step(x, twin)["y"])
        assert call.kept == 1
        call(torch.randn(2, 8), Tally())  # another object: another signature
        assert len(call.graphs) == 1 and len(call.seen) == 1
    monkeypatch.setattr(CpuGraphedCall, "_record", lambda self, run, state: (object(), run()))  # holds nothing
    other = Tally()
    with torch.no_grad():
        call(torch.randn(2, 8), other)
        call(torch.randn(2, 8), other)
    assert len(call.graphs) == 2
    del other
    gc.collect()
    assert len(call.graphs) == 1  # the graph went with its object


# ----------------------------------------------------------------------------- on a GPU


def _diffusers_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16, norm_num_groups=8,
    ).cuda().eval()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_optimized_diffusers_unet_replays_its_graph(mode):
    """diffusers' UNet2DModel, optimized with cuda_graphs=True: from the fourth call on a
    replay, every result the optimized model's eager call, bit for bit, for new inputs each call."""
    model = _diffusers_unet()
    fastarch.optimize(model, cuda_graphs=True)
    graphed = model.__dict__["forward"]
    with getattr(torch, mode)():
        for i in range(6):
            x = torch.randn(2, 3, 16, 16, device="cuda")
            t = torch.full((2,), 100 * i, device="cuda")
            got = model(x, t).sample
            want = type(model).forward(model, x, t).sample
            assert torch.equal(got, want)
    assert graphed.kept == 1 and not graphed.refused


@pytest.mark.gpu
def test_optimized_bert_with_padding_replays_its_graph():
    """transformers' BERT with a padded batch, optimized with cuda_graphs=True: the graph is
    kept (transformers reads no mask on the host while a stream captures, the unpadded encoder
    steps aside) and its replays give transformers' hidden states at the real tokens."""
    model, ids, mask = _bert_and_padded_batch("cuda")
    check = _five_calls_match_transformers(model, ids, mask)
    fastarch.optimize(model, cuda_graphs=True)
    check()
    graphed = model.__dict__["forward"]
    assert graphed.kept == 1 and not graphed.refused


@pytest.mark.gpu
def test_optimized_llama_generate_with_a_static_cache_replays_its_graph(monkeypatch):
    """transformers' generate with a StaticCache on an optimized LLaMA with cuda_graphs=True:
    its decode step replays from the fourth step on, and gives the tokens of the same generate
    without graphs (FASTARCH_CUDA_GRAPHS=0), batched and left-padded."""
    model = _tiny_llama().cuda()
    fastarch.optimize(model, cuda_graphs=True)
    graphed = model.__dict__["forward"]
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False,
              cache_implementation="static", disable_compile=True, pad_token_id=0)  # (else transformers compiles)
    got = model.generate(ids, **kw)
    assert graphed.replays == 21 and not graphed.refused  # 23 decode steps: eager, capture, then replays
    monkeypatch.setenv("FASTARCH_CUDA_GRAPHS", "0")
    assert torch.equal(got, model.generate(ids, **kw))
