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
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.autograd import profiler as _profiler

_PLAIN_TENSOR_TYPES = (Tensor, nn.Parameter)
# torch's mode and tracing state queries, looked up once (each call of an op asks all of them)
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_functorch_level = torch._C._functorch.peek_interpreter_stack
_tracing_state = torch._C._get_tracing_state
_grad_enabled = torch.is_grad_enabled


def direct_call_allowed(args: Iterable[object]) -> bool:
    """Whether an op called with ``args`` may skip the dispatcher (see the module docstring)."""
    if (
        torch.compiler.is_compiling()  # first: dynamo folds it and traces nothing after it
        or _dispatch_modes()
        or _function_modes()
        or _functorch_level() is not None
        or _tracing_state() is not None
        or forward_ad._current_level >= 0
    ):
        return False
    grad = _grad_enabled()
    for a in args:
        if isinstance(a, Tensor) and (
            type(a) not in _PLAIN_TENSOR_TYPES or a.is_meta or a.is_nested or (grad and a.requires_grad)
        ):
            return False
    return True


class CustomOp:
    """A torch.library custom op (``op``, what opcheck and torch.ops see) with its Python
    function (``fn``); calling it takes the fast path when direct_call_allowed."""

    def __init__(self, name: str, op: torch.library.CustomOpDef, fn: Callable, mutated: tuple[int, ...]) -> None:
        self.name, self.op, self.fn, self.mutated = name, op, fn, mutated
        self.__doc__ = fn.__doc__

    def __call__(self, *args, **kwargs):
        if kwargs or not direct_call_allowed(args):
            return self.op(*args, **kwargs)
        if self.mutated and not torch.is_inference_mode_enabled():
            torch.autograd.graph.increment_version([args[i] for i in self.mutated])
        if _profiler._is_profiler_enabled:
            with torch.profiler.record_function(self.name):
                return self.fn(*args)
        return self.fn(*args)

    def register_fake(self, fn: Callable) -> Callable:
        return self.op.register_fake(fn)

    def register_autograd(self, backward: Callable, *, setup_context: Callable | None = None) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)


def custom_op(name: str, *, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], CustomOp]:
    """As ``torch.library.custom_op(name, mutates_args=...)`` (a call with keyword arguments
    always goes through the dispatcher)."""

    def wrap(fn: Callable) -> CustomOp:
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        params = list(inspect.signature(fn).parameters)
        return CustomOp(name, op, fn, tuple(params.index(m) for m in mutates_args))

    return wrap
