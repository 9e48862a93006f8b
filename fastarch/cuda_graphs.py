"""A module's calls replayed from CUDA graphs. On a GPU a small model's forward issues hundreds of
kernels from Python and the GPU waits on the host between them (measured on an H200: diffusers'
UNet2DModel at batch 4, 32x32, and MiniLM, where optimize's faster kernels gained nothing, see
README "GPU status"); a graph's replay issues the same kernels in one call.

    forward = GraphedCall(model.forward, watch=model)  # what fastarch.optimize(model, cuda_graphs=True) installs
    out = forward(x, t)                                # as model.forward(x, t): the same values, new tensors

A call is keyed by its signature: the structure of its arguments, each tensor's device, dtype,
shape and strides, each other argument's value, and what else decides its kernels (the stream,
inference mode, autocast's dtype, the default dtype, fp32 matmul precision). The first call of a signature runs eagerly;
the second runs eagerly on a side stream (Triton compiles and tunes, cuBLAS and cuDNN set up:
none of it may happen inside a capture) and captures the call on copies of its tensors; the
third runs eagerly and replays the graph on its inputs, and keeps the graph only if the two
agree bit for bit; later calls copy their tensors into the graph's inputs, replay it and return
copies of its outputs. Only what a replay repeats exactly is captured:

- every tensor argument on one CUDA device, every other one None, a bool, number, string, dtype
  or device (a value that changes at every call, as a Python timestep, makes each call a new
  signature: eager), or a state argument (below); no gradient (under torch.no_grad or
  inference_mode), the module in eval mode, not inside torch.compile or another capture;
- the module's parameters and buffers on that device, the same tensors at the addresses they
  had at the capture (a ``.to()``, ``.half()``, a reassigned parameter or one put in place by
  torch.func.functional_call drops the graph; ``load_state_dict`` and other in-place updates
  are seen by the replays), no hooks on the modules inside it (a replay would not call them);
- a call that writes into its tensor arguments or into the module's parameters or buffers (the
  check would write twice), returns anything but tensors and plain values,
  reads the device on the host (the capture refuses it), or whose replay differs from its eager
  call is refused for that signature, with a warning, and runs eagerly from then on. What a
  replay cannot see is the call's Python: a forward whose result depends on host state other
  than its arguments (a counter it keeps, a global) must not be graphed; the check catches such
  a difference only where it shows at the third call. Nor does a replay check the values it is
  given where the eager call would read them on the host (fastarch's UNet's class labels: the
  sampler's are the same at every step, checked by its eager first steps).

State arguments: an object of a kind registered with register_state (transformers'
StaticCache, by fastarch.integrations.transformers) is an argument the call updates in place,
its tensors at fixed addresses: it is keyed by identity and those addresses, the graph writes
into it as the eager call does (the check runs both from the same state and compares the state
after them too), an output that is the object itself is returned as itself, and the graph is
dropped when the object is.

Each kept graph holds its inputs' copies and the memory of one call (a private pool); at most
MAX_GRAPHS signatures are captured per call site. FASTARCH_CUDA_GRAPHS=0 turns every graph off.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.nn.modules import module as _module
from torch.utils.hooks import RemovableHandle

MAX_GRAPHS = 4
"""Signatures captured per call site: each graph keeps one call's memory."""
MAX_SEEN = 256
"""Signatures remembered as seen once (a call site whose arguments never repeat forgets them)."""
_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


_STATE_KINDS: dict[type, Callable[[object], list | None]] = {}


def register_state(kind: type, tensors: Callable[[object], list | None]) -> None:
    """Let a GraphedCall take objects of ``kind`` as state arguments (see above): ``tensors(obj)``
    lists every tensor the call may read or update in it, at addresses that stay, or returns
    None where obj cannot be captured yet (a lazily allocated cache before its first update)."""
    _STATE_KINDS[kind] = tensors


def enabled() -> bool:
    """FASTARCH_CUDA_GRAPHS: "0" turns the graphs off; anything else (or unset) leaves them on."""
    return os.environ.get("FASTARCH_CUDA_GRAPHS", "1").strip() != "0"


_recording = 0


def recording() -> bool:
    """Whether the running call is one a graph is made from or checked against (or a capture):
    a path that reads the device on the host (fastarch's unpadded encoder) steps aside, here
    and in the eager calls beside it, so that they run the same kernels as the graph."""
    return _recording > 0 or _capturing()


@contextlib.contextmanager
def _recording_calls() -> Iterator[None]:
    global _recording
    _recording += 1
    try:
        yield
    finally:
        _recording -= 1


@dataclass(frozen=True)
class _Argument:
    """An output that is the call's own state argument (leaf ``index``): returned as itself."""

    index: int


@dataclass
class _Graph:
    """One signature's capture: the graph, its input copies and its outputs."""

    graph: object
    inputs: list  # the call's leaves, tensors replaced by the graph's copies (state arguments: None)
    outputs: list  # the output's leaves (tensors: the graph's buffers)
    out_spec: pytree.TreeSpec
    device: torch.device  # its arguments' (the replay runs there)
    watched: tuple  # the watched module's tensors' addresses at the capture (_watched)
    tensors: list  # those tensors
    slots: list  # where each was found: (its module's _parameters or _buffers, its name)
    marks: tuple  # _marks() when watched was last taken
    checked: bool = False


@dataclass
class GraphedCall:
    """``fn`` (a module, or its forward) with its repeated calls replayed from CUDA graphs.

    watch: the module whose parameters, buffers and hooks the graphs depend on (fn's module)."""

    fn: Callable
    watch: nn.Module
    what: str = ""
    graphs: dict = field(default_factory=dict)  # signature -> _Graph
    seen: dict = field(default_factory=dict)  # signatures called once
    refused: dict = field(default_factory=dict)  # signature -> why it runs eagerly
    side: object = None  # the warm-up stream
    replays: int = 0  # every replay so far (the checks' too)

    def __post_init__(self) -> None:
        self.what = self.what or f"{type(self.watch).__name__}'s calls"
        # fn's parameters, as inspect.signature reports them: callers read them (transformers'
        # generate passes position_ids and logits_to_keep only to a forward that names them)
        try:
            self.__signature__ = inspect.signature(self.fn)
        except (TypeError, ValueError):
            pass

    @property
    def kept(self) -> int:
        """How many graphs replay (checked against their eager call)."""
        return sum(g.checked for g in self.graphs.values())

    # --------------------------------------------------------------- the call

    def __call__(self, *args, **kwargs):
        if not self._may_capture():
            return self.fn(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = self._signature(leaves, spec)
        if key is None or key in self.refused:
            return self.fn(*args, **kwargs)
        entry = self.graphs.get(key)
        if entry is not None and not self._unchanged(entry, leaves):
            del self.graphs[key]  # the module's tensors moved (or got hooks): capture again
            entry = None
        if entry is None:
            if key not in self.seen or len(self.graphs) >= MAX_GRAPHS:
                if len(self.seen) >= MAX_SEEN:
                    self.seen.clear()
                self.seen[key] = True
                return self.fn(*args, **kwargs)
            return self._capture(key, leaves, spec)
        if not entry.checked:
            return self._check(key, entry, leaves, args, kwargs)
        return self._replay(entry, leaves)

    def _may_capture(self) -> bool:
        return (not torch.compiler.is_compiling() and not torch.is_grad_enabled() and not self.watch.training
                and enabled() and not _capturing())

    def _signature(self, leaves: list, spec: pytree.TreeSpec) -> tuple | None:
        """The call's key, or None when it cannot be captured."""
        autocast = torch.is_autocast_enabled("cuda")
        parts: list = [spec, torch.is_inference_mode_enabled(), torch.get_default_dtype(),
                       torch.get_float32_matmul_precision(), autocast and torch.get_autocast_dtype("cuda")]
        device, state = None, []
        for leaf in leaves:
            if isinstance(leaf, Tensor):
                if not self._on_graph_device(leaf) or (device is not None and leaf.device != device):
                    return None
                device = leaf.device
                parts.append((leaf.device, leaf.dtype, leaf.shape, leaf.stride()))
            elif type(leaf) in _PLAIN:
                parts.append((type(leaf), leaf))
            elif type(leaf) in _STATE_KINDS:
                tensors = _STATE_KINDS[type(leaf)](leaf)
                if tensors is None or not all(type(t) is Tensor for t in tensors):
                    return None
                state += tensors
                parts.append((type(leaf), id(leaf), tuple((t.data_ptr(), t.dtype, t.shape) for t in tensors)))
            else:
                return None
        if device is None or any(t.device != device for t in state):
            return None
        parts.append(self._stream(device))  # (a graph's buffers serve one stream's calls in order)
        return tuple(parts)

    def _unchanged(self, entry: _Graph, leaves: list) -> bool:
        """Whether the watched module is as the graph was captured: the same tensors at the same
        addresses, no hooks. The walk of every module (_watched: ~0.45 ms for a 135M LLaMA's 397
        modules on a CPU core, more than a decode step's replay) runs only when a hook or a
        module, parameter or buffer was registered anywhere since it last ran (_marks); else the
        tensors it found are looked up where it found them and their addresses compared (a .to()
        or .half() moves them; torch.func.functional_call puts others in their place)."""
        if _marks() == entry.marks:  # (a tensor put into a module's dict directly passes no hook)
            return all([d.get(name) is t for (d, name), t in zip(entry.slots, entry.tensors)]) and tuple(
                [t.data_ptr() for t in entry.tensors]) == entry.watched
        found = self._watched(leaves)
        if found is None or found[0] != entry.watched:
            return False
        entry.marks = _marks()
        return True

    def _watched(self, leaves: list) -> tuple | None:
        """(the addresses of the watched module's tensors, those tensors, where each was found:
        (its module's dict, its name)), or None: one is off the arguments' device, or a module
        inside it has hooks. Walked through ``_modules``."""
        device = next(t.device for t in leaves if isinstance(t, Tensor))
        if any(getattr(_module, name) for name in _GLOBAL_HOOKS):
            return None
        found, slots = [], []
        stack = [self.watch]
        while stack:
            m = stack.pop()
            d = m.__dict__
            if (m is not self.watch or self.fn is self.watch) and any(d.get(h) for h in _HOOK_DICTS):
                return None
            for tensors in (d["_parameters"], d["_buffers"]):
                for name, t in tensors.items():
                    if t is not None:
                        if t.device != device:
                            return None
                        found.append(t)
                        slots.append((tensors, name))
            stack.extend(c for c in d["_modules"].values() if c is not None)
        return tuple([t.data_ptr() for t in found]), found, slots

    @staticmethod
    def _state_tensors(leaves: list) -> list:
        return [t for leaf in leaves if type(leaf) in _STATE_KINDS for t in _STATE_KINDS[type(leaf)](leaf)]

    # --------------------------------------------------------------- capture, check, replay

    def _capture(self, key: tuple, leaves: list, spec: pytree.TreeSpec):
        """The second call of a signature: eager on the side stream (its result returned), then captured."""
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        for leaf in leaves:  # (its graph, or its refusal, goes with it)
            if type(leaf) in _STATE_KINDS:
                weakref.finalize(leaf, _forget, weakref.ref(self), key)
        _counting_registrations()
        marks, watched = _marks(), self._watched(leaves)
        if watched is None:
            return self._refuse(key, "a module inside it has hooks, or a parameter is off the inputs' device",
                                self.fn(*args, **kwargs))
        arguments = [t for t in leaves if isinstance(t, Tensor)]
        device = arguments[0].device
        with _recording_calls(), self._on(device):
            given = [(t, _written_mark(t, copy=True)) for t in arguments]
            held = [(t, _written_mark(t)) for t in watched[1]]  # (an inference-mode weight: unwatched)
            out = self._warm_up(lambda: self.fn(*args, **kwargs))
            if any(_written(t, mark) for t, mark in given):
                return self._refuse(key, "it writes into its tensor arguments", out)
            if any(_written(t, mark) for t, mark in held):  # (the check's eager call and replay would write twice)
                return self._refuse(key, "it writes into the module's parameters or buffers", out)
            copies = [t.clone() if isinstance(t, Tensor) else t for t in leaves]
            a, k = pytree.tree_unflatten(copies, spec)
            try:
                graph, captured = self._record(lambda: self.fn(*a, **k), self._state_tensors(leaves))
            except Exception as e:  # noqa: BLE001  (anything the capture refuses runs eagerly)
                return self._refuse(key, f"the capture failed ({type(e).__name__}: {e})", out)
        outputs, out_spec = pytree.tree_flatten(captured)
        states = {id(leaf): i for i, leaf in enumerate(leaves) if type(leaf) in _STATE_KINDS}
        for i, o in enumerate(outputs):
            if id(o) in states:
                outputs[i] = _Argument(states[id(o)])
            elif not isinstance(o, Tensor) and type(o) not in _PLAIN:
                return self._refuse(key, f"it returns a {type(o).__name__}, which a replay cannot copy out", out)
        inputs = [None if type(t) in _STATE_KINDS else t for t in copies]  # (held by no graph: see _forget)
        self.graphs[key] = _Graph(graph, inputs, outputs, out_spec, device, *watched, marks)
        self.seen.pop(key, None)
        return out

    def _check(self, key: tuple, entry: _Graph, leaves: list, args: tuple, kwargs: dict):
        """The first replay against the eager call on this call's inputs (not the captured
        call's: a value the capture baked in would differ here)."""
        state = self._state_tensors(leaves)
        try:
            before = [t.clone() for t in state]
        except torch.OutOfMemoryError:  # (two copies of a state, a cache, beside it: eager instead)
            return self._refuse(key, "no memory for the check's copies of its state", self.fn(*args, **kwargs))
        with _recording_calls():
            eager = self.fn(*args, **kwargs)
        try:
            after = [t.clone() for t in state]  # the eager call's updates; the replay starts where it did
        except torch.OutOfMemoryError:
            return self._refuse(key, "no memory for the check's copies of its state", eager)
        for t, saved in zip(state, before):
            t.copy_(saved)
        del before
        replayed = self._replay(entry, leaves)
        mine, theirs = pytree.tree_leaves(replayed), pytree.tree_leaves(eager)
        same = len(mine) == len(theirs) and all(
            a is b or (_identical(a, b) if isinstance(a, Tensor) and isinstance(b, Tensor) else a == b)
            for a, b in zip(mine, theirs)
        ) and all(_identical(t, want) for t, want in zip(state, after))
        if not same:
            for t, want in zip(state, after):  # the state the eager call left
                t.copy_(want)
            return self._refuse(key, "its first replay differed from the eager call", eager)
        entry.checked = True
        return eager

    def _replay(self, entry: _Graph, leaves: list):
        for mine, given in zip(entry.inputs, leaves):
            if isinstance(mine, Tensor):
                mine.copy_(given)
        with self._on(entry.device):
            entry.graph.replay()
        self.replays += 1
        return pytree.tree_unflatten(
            [o.clone() if isinstance(o, Tensor) else leaves[o.index] if type(o) is _Argument else o
             for o in entry.outputs], entry.out_spec)

    def _refuse(self, key: tuple, why: str, out):
        self.graphs.pop(key, None)
        self.seen.pop(key, None)
        if not self.refused:  # once per call site: a model of many signatures would warn at each
            warnings.warn(f"fastarch: {self.what} without a CUDA graph: {why}", RuntimeWarning, stacklevel=4)
        self.refused[key] = why
        return out

    # --------------------------------------------------------------- the device's part (the CPU tests replace it)

    def _on_graph_device(self, t: Tensor) -> bool:
        return t.is_cuda

    def _stream(self, device: torch.device) -> int:
        """The stream the call runs on (part of the signature)."""
        return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0

    def _on(self, device: torch.device | None):
        """A context in which device is the current one (its stream the current stream)."""
        if device is None or device.index is None or device.index == torch.cuda.current_device():
            return contextlib.nullcontext()
        return torch.cuda.device(device)

    def _warm_up(self, run: Callable):
        """run() on a side stream, the current stream waiting for it (as a capture's warm-up must)."""
        current = torch.cuda.current_stream()
        if self.side is None:
            self.side = torch.cuda.Stream()
        self.side.wait_stream(current)  # (so the side stream's memory is never reused under the current's work)
        with torch.cuda.stream(self.side):
            out = run()
        current.wait_stream(self.side)
        return out

    def _record(self, run: Callable, state: list) -> tuple:
        """run() captured: (the graph, its outputs). A capture records the kernels without
        running them: the state arguments' tensors (``state``) are as they were."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # on torch's capture stream, its own memory pool: recorded, not run
            out = run()
        return graph, out

    # --------------------------------------------------------------- copies keep no graphs

    def __getstate__(self) -> dict:
        return {"fn": self.fn, "watch": self.watch, "what": self.what}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


_registrations = -1  # -1: its hooks not yet installed (_counting_registrations)


def _count_registration(*args) -> None:
    global _registrations
    _registrations += 1  # (returns None: the registered value stays)


def _counting_registrations() -> None:
    """Installs, once, the global hooks torch calls for every parameter, buffer or submodule set
    on any module (at the first capture: until then nothing watches)."""
    global _registrations
    if _registrations < 0:
        _registrations = 0
        for register in (_module.register_module_parameter_registration_hook,
                         _module.register_module_buffer_registration_hook,
                         _module.register_module_module_registration_hook):
            register(_count_registration)


def _marks() -> tuple[int, int]:
    """Changes since which a watched module must be walked again: torch numbers every hook
    handle it makes (RemovableHandle.next_id: any module hook, global or not), and every
    parameter, buffer or submodule set on any module passes the registration hooks counted
    here. (An assignment into a module's dicts directly passes neither: addresses only.)"""
    return RemovableHandle.next_id, _registrations


def _written_mark(t: Tensor, copy: bool = False) -> object:
    """What changes when t is written: its version counter; an inference tensor keeps none: a
    copy of it (copy=True), or None (not watched)."""
    if t.is_inference():
        return t.clone() if copy else None
    return t._version


def _written(t: Tensor, mark: object) -> bool:
    if mark is None:
        return False
    return not _identical(t, mark) if isinstance(mark, Tensor) else t._version != mark


def _forget(graphed: weakref.ref, key: tuple) -> None:
    """A state argument's object is gone: the graph that wrote into it goes too (its memory, and
    a key a new object at the same id and addresses could match)."""
    call = graphed()
    if call is not None:
        call.graphs.pop(key, None)
        call.seen.pop(key, None)
        call.refused.pop(key, None)


def _identical(a: Tensor, b: Tensor) -> bool:
    """The same values bit for bit, NaN where NaN (torch.equal calls NaN unequal)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(torch.all((a == b) | (a.isnan() & b.isnan())))
    return torch.equal(a, b)


def _capturing() -> bool:
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()
