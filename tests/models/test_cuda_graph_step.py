"""The decode step in a CUDA graph (fastarch/models/cuda_graph_step.py): on a GPU, generation
with the graph gives the tokens of generation without it (greedy and seeded sampling; LLaMA
with GQA, Mistral's window, GPT-2), the graph is captured once, checked against the eager step
and replayed for every later token, and the cache is never reallocated. Without a GPU: the
step is never taken on the CPU, and FASTARCH_CUDA_GRAPHS=0 turns it off."""

from __future__ import annotations

import gpt2_tiny
import pytest
import torch
from host_reads import host_reads, on_a_gpu  # tests/host_reads.py
from test_llama import make

from fastarch.models import cuda_graph_step, from_pretrained
from fastarch.models.cuda_graph_step import CudaGraphStep
from fastarch.models.generate import generate

NEW = 24


def test_not_on_the_cpu(tmp_path):
    make(tmp_path)
    model = from_pretrained(tmp_path)
    cache = model.new_cache(2, 40)
    assert CudaGraphStep.for_generation(model, cache, NEW) is None


def test_a_capture_that_fails_runs_eagerly(tmp_path, monkeypatch):
    """Forced onto the CPU, where no graph can be captured: a warning, then every step eagerly,
    the same tokens as without the graph step."""
    make(tmp_path)
    model = from_pretrained(tmp_path)
    ids, mask = gpt2_tiny.prompts([5, 12, 1], "left")
    eager = generate(model, ids, mask, max_new_tokens=NEW)
    monkeypatch.setattr(CudaGraphStep, "for_generation", classmethod(lambda cls, m, cache, n: cls(m, cache)))
    with pytest.warns(RuntimeWarning, match="decoding without a CUDA graph: the capture failed"):
        forced = generate(model, ids, mask, max_new_tokens=NEW)
    assert torch.equal(forced, eager)


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False), (" 0 ", False)])
def test_environment_switch(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("FASTARCH_CUDA_GRAPHS", raising=False)
    else:
        monkeypatch.setenv("FASTARCH_CUDA_GRAPHS", value)
    assert cuda_graph_step.enabled() is on


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_the_step_reads_nothing_on_the_host(tmp_path, family):
    """A capture fails on any read of the device's values on the host: the decode step the graph
    captures reads none a GPU would make (on the CPU, under a dispatch mode that sees every such
    read and sends the step op by op, as a GPU runs it; only its check of the ids, which runs for
    CPU tensors), after a prefill of a left-padded batch."""
    model = _models(tmp_path, family, "cpu")
    ids, mask = gpt2_tiny.prompts([5, 12, 1], "left")
    cache = model.new_cache(3, 12 + NEW)
    with torch.inference_mode():
        logits = model(ids, mask, cache=cache, last_only=True)[:, -1]
    token = logits.argmax(-1)
    readers = host_reads(lambda: model(token[:, None], cache=cache, last_only=True))
    assert readers and on_a_gpu(readers) == [], readers  # (the CPU-only check of the ids)
    assert cache.filled == 13


def _models(tmp_path, family, device="cuda"):
    if family == "gpt2":
        path = tmp_path / "gpt2"
        gpt2_tiny.make(path)
        return from_pretrained(path, device=device)
    kw = {"mistral": dict(sliding_window=5)}.get(family, {})
    make(tmp_path, "mistral" if family == "mistral" else "llama", **kw)
    return from_pretrained(tmp_path, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
@pytest.mark.parametrize("sampling", [{}, dict(do_sample=True, top_k=20, temperature=0.8, seed=3)], ids=["greedy", "sampled"])
def test_graph_gives_the_eager_tokens(tmp_path, monkeypatch, family, sampling):
    model = _models(tmp_path, family)
    ids, mask = gpt2_tiny.prompts([5, 12, 1], "left")
    ids, mask = ids.cuda(), mask.cuda()
    steps = []
    real_init = CudaGraphStep.__init__

    def spy(self, *args):
        real_init(self, *args)
        steps.append(self)

    monkeypatch.setattr(CudaGraphStep, "__init__", spy)
    graphed = generate(model, ids, mask, max_new_tokens=NEW, **sampling)
    assert len(steps) == 1 and steps[0].graph is not None and steps[0].checked and not steps[0].failed
    monkeypatch.setenv("FASTARCH_CUDA_GRAPHS", "0")
    eager = generate(model, ids, mask, max_new_tokens=NEW, **sampling)
    assert len(steps) == 1
    assert torch.equal(graphed, eager)


@pytest.mark.gpu
def test_replays_keep_the_cache(tmp_path):
    """Every replay writes into the cache allocated before the prefill: the same storage."""
    model = _models(tmp_path, "llama")
    ids, mask = gpt2_tiny.prompts([5, 12, 1], "left")
    cache = model.new_cache(3, 12 + NEW)
    pointers = [t.data_ptr() for t in cache.k + cache.v]
    generate(model, ids.cuda(), mask.cuda(), max_new_tokens=NEW, cache=cache)
    assert [t.data_ptr() for t in cache.k + cache.v] == pointers
    assert cache.filled == 12 + NEW - 1  # the last token is chosen, not appended
