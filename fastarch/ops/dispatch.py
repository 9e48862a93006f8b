"""The ops' eager fast path: ``custom_op`` is torch.library.custom_op, except that a call that
needs nothing from torch's dispatcher runs the op's Python function directly.

A custom op's call through the dispatcher costs tens of microseconds of Python (the autograd
and ADInplaceOrView layers, the aliasing checks of the result) before the op's own function
runs; a decode step of a small model makes a few hundred such calls, and on a CPU that time is
comparable to the kernels'. The dispatcher is only needed when something must see the op:
autograd (grad mode on and an input that requires grad, or forward-mode AD), torch.compile and
tracing (dynamo, make_fx, torch.jit.trace), fake and meta tensors (the fake implementations),
nested tensors and tensor subclasses, torch function and dispatch modes (FakeTensorMode,
FlopCounterMode, ``with torch.device(...)``) and functorch transforms (vmap, grad). Any of
those takes the custom op as before; otherwise the op's function runs with the same arguments,
so the result is the same computation (tests/ops/test_fast_path.py checks the bits). An op
that mutates an input bumps its version counter as the dispatcher would; under the profiler
the direct call is recorded under the op's name.

When autograd is all that is needed (an input requires grad, nothing else above), an op with a
registered backward runs as a ``torch.autograd.Function`` of its own: the op's function
forward, the registered setup_context and backward, as torch.library's autograd layer runs
them (gradients materialized, one per input), without the dispatcher's layers around them
(~40 us of a group_norm forward + backward on the CPU).

An op's input check (``custom_op(..., check=...)``) runs first in every call, before the path
is chosen, so that bad arguments get the op's own message rather than the dispatcher's; the
direct and autograd paths then run the unchecked body (one check a call). The op registered
with torch.library (a ``torch.ops.fastarch`` call; the dispatcher path, which checks twice) and
its fake implementation (torch.compile, fake tensors) run the check as well.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.autograd import profiler as _profiler

_PLAIN_TENSOR_TYPES = frozenset((Tensor, nn.Parameter))
# arguments that need nothing from the dispatcher, tested by exact type (isinstance on each of
# an op's arguments cost attention's call ~2 us)
_SCALAR_TYPES = frozenset((type(None), bool, int, float, str))
# torch's mode and tracing state queries, looked up once (each call of an op asks all of them)
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_functorch_level = torch._C._functorch.peek_interpreter_stack
_tracing_state = torch._C._get_tracing_state
_grad_enabled = torch.is_grad_enabled


# How an op call runs (call_path): its function directly, its own autograd.Function, or the
# custom op through the dispatcher.
DIRECT, AUTOGRAD, DISPATCHER = "direct", "autograd", "dispatcher"


def call_path(args: Iterable[object]) -> str:
    """How an op called with ``args`` runs (see the module docstring): DIRECT when it needs
    nothing from the dispatcher, AUTOGRAD when it needs autograd alone (grad mode on and some
    input requiring grad; plain dense tensors, none in a list), else DISPATCHER."""
    if (
        torch.compiler.is_compiling()  # first: dynamo folds it and traces nothing after it
        or _dispatch_modes()
        or _function_modes()
        or _functorch_level() is not None
        or _tracing_state() is not None
        or forward_ad._current_level >= 0
    ):
        return DISPATCHER
    grad = _grad_enabled()
    path = DIRECT
    for a in args:
        kind = type(a)
        if kind in _SCALAR_TYPES:  # most of an op's arguments (attention has 13 such of 16)
            continue
        if kind in _PLAIN_TENSOR_TYPES:
            if a.is_meta or a.is_nested:
                return DISPATCHER
            if grad and a.requires_grad:
                path = AUTOGRAD
        elif isinstance(a, Tensor):  # a subclass
            return DISPATCHER
        elif isinstance(a, (list, tuple)) and any(isinstance(t, Tensor) for t in a):
            return DISPATCHER  # (a list's tensors: not looked into, left to the dispatcher)
    return path


def direct_call_allowed(args: Iterable[object]) -> bool:
    """Whether an op called with ``args`` may skip the dispatcher altogether."""
    return call_path(args) is DIRECT


def _autograd_function(name: str, fn: Callable, backward: Callable, setup_context: Callable | None) -> type:
    """An autograd.Function running ``fn`` forward and the op's registered backward.

    Its forward takes ctx and calls setup_context itself, rather than defining setup_context:
    for a Function with setup_context, ``apply`` binds the arguments to the forward's signature
    with inspect at every call (a group_norm forward + backward at batch 1 took ~75 us more on
    an AMD EPYC); the arguments here are already complete."""

    def forward(ctx, *args):
        output = fn(*args)
        if setup_context is not None:
            setup_context(ctx, args, output)
        return output

    return type(
        f"{name.replace('::', '_')}_Function",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )


class CustomOp:
    """A torch.library custom op (``op``, what opcheck and torch.ops see) with its Python
    function (``fn``); a call runs ``fn`` directly, its autograd.Function (``function``) or
    ``op``, as call_path says."""

    def __init__(
        self, name: str, op: torch.library.CustomOpDef, fn: Callable, mutated: tuple[int, ...], defaults: tuple,
        check: Callable | None = None,
    ) -> None:
        self.name, self.op, self.fn, self.mutated, self.check = name, op, fn, mutated, check
        self.defaults = defaults  # each parameter's default (inspect.Parameter.empty: none)
        self.required = sum(d is inspect.Parameter.empty for d in defaults)
        self.function: type | None = None  # the autograd.Function, once a backward is registered
        self.__doc__ = fn.__doc__

    def __call__(self, *args, **kwargs):
        if self.check is not None:
            self.check(*args, **kwargs)
        path = DISPATCHER if kwargs else call_path(args)
        if path is AUTOGRAD and self.function is not None:
            # every argument, as torch.library's autograd layer hands them to setup_context
            if len(args) >= self.required:
                return self._run(self.function.apply, args + self.defaults[len(args):])
        if path is not DIRECT:
            return self.op(*args, **kwargs)
        if self.mutated and not torch.is_inference_mode_enabled():
            torch.autograd.graph.increment_version([args[i] for i in self.mutated])
        return self._run(self.fn, args)

    def _run(self, fn: Callable, args: tuple):
        if _profiler._is_profiler_enabled:
            with torch.profiler.record_function(self.name):
                return fn(*args)
        return fn(*args)

    def register_fake(self, fn: Callable) -> Callable:
        self.op.register_fake(_checked(self.check, fn))
        return fn

    def register_autograd(self, backward: Callable, *, setup_context: Callable | None = None) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        if not self.mutated:
            self.function = _autograd_function(self.name, self.fn, backward, setup_context)


def _checked(check: Callable | None, fn: Callable) -> Callable:
    """fn, running check on its arguments first (fn itself without a check)."""
    if check is None:
        return fn

    @functools.wraps(fn)  # (torch's messages name the op's function)
    def checked(*args, **kwargs):
        check(*args, **kwargs)
        return fn(*args, **kwargs)

    return checked


def custom_op(
    name: str, *, mutates_args: tuple[str, ...] = (), check: Callable | None = None
) -> Callable[[Callable], CustomOp]:
    """As ``torch.library.custom_op(name, mutates_args=...)`` (a call with keyword arguments
    always goes through the dispatcher). check: takes the op's arguments and raises on bad ones
    (see the module docstring); the decorated function then need not check them."""

    def wrap(fn: Callable) -> CustomOp:
        schema = torch.library.infer_schema(fn, mutates_args=mutates_args)
        op = torch.library.custom_op(name, _checked(check, fn), mutates_args=mutates_args, schema=schema)
        params = inspect.signature(fn).parameters
        names = list(params)
        defaults = tuple(p.default for p in params.values())
        return CustomOp(name, op, fn, tuple(names.index(m) for m in mutates_args), defaults, check)

    return wrap
