"""The backend registry: the one place where fastarch chooses which kernel runs.

Every op lists its backends in priority order, each with a ``supports(problem)`` check that
returns ``None`` when the backend can run the problem and otherwise the reason why not. An op
runs the first backend that supports its inputs, unless the user forces one::

    fastarch.ops.layer_norm(x, w, b, backend="triton")   # per call
    with fastarch.backend("cpu"): ...                     # for a block of code
    FASTARCH_BACKEND=reference python train.py            # for the process (read at import)

When the forced backend (or, in auto mode, every backend) cannot run the inputs, the error
lists every backend with its reason.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

BACKENDS = ("cuda", "cpu", "triton", "reference")
"""Every backend name. Each op's table (its family's backends.py) sets its own priority."""


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``available()`` returns None when the backend can run at all on this machine, else why
    not ("not compiled", "no CUDA device"); ``supports(problem)`` returns None when it can run
    ``problem`` (an op-specific description of the inputs), else a short reason such as
    "input is on cpu". ``forward`` and ``backward`` take the op's kernel-level arguments.
    """

    name: str
    available: Callable[[], str | None]
    supports: Callable[[Any], str | None]
    forward: Callable[..., Any]
    backward: Callable[..., Any] | None = None


class MachineReason(str):
    """A reason a backend cannot run that lies in this machine (no GPU, a CPU without an
    instruction set, a build without some kernels), not in the inputs. Tests skip a row for
    such a reason and fail for any other: a table row a backend declines by design is a wrong
    row."""


class NoBackendError(RuntimeError):
    """No backend (or not the forced one) can run the inputs; the message lists why."""


_REGISTRY: dict[str, list[Backend]] = {}


def register(op: str, backends: list[Backend]) -> None:
    """Declare the backends of ``op`` in priority order."""
    names = [b.name for b in backends]
    unknown = set(names) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backend names {sorted(unknown)} for op {op!r}; known: {BACKENDS}")
    _REGISTRY[op] = list(backends)
    clear_choices()


def ops() -> list[str]:
    """The names of every registered op."""
    return list(_REGISTRY)


def backends_of(op: str) -> list[Backend]:
    """The backends of ``op`` in priority order."""
    try:
        return _REGISTRY[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; registered ops: {sorted(_REGISTRY)}") from None


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"fastarch: {what} must be one of {', '.join(BACKENDS)} (or empty for automatic choice), got {name!r}")
    return name


def _initial_forced() -> list[str]:
    env = os.environ.get("FASTARCH_BACKEND", "").strip()
    return [_check_name(env, "FASTARCH_BACKEND")] if env else []


# A plain module-level list (not thread-local) so that torch.compile can read it while tracing
# and guard on it; it is process-wide.
_forced: list[str] = _initial_forced()


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force every fastarch op inside the block to run ``name`` (cuda, cpu, triton, reference).

    A per-call ``backend=`` argument still takes precedence. Blocks nest.
    """
    _forced.append(_check_name(name, "backend"))
    try:
        yield
    finally:
        _forced.pop()


def requested_backend(explicit: str | None = None) -> str:
    """The backend the caller asked for: ``explicit`` if given, else the innermost
    ``backend(...)`` block, else FASTARCH_BACKEND, else "" (choose automatically)."""
    if explicit:
        return _check_name(explicit, "backend")
    return _forced[-1] if _forced else ""


def device_reason(device: str, runs: str) -> str | None:
    """The reason a backend that runs ``runs`` ("cpu" or "cuda") tensors cannot take a tensor
    on ``device``, or None. For supports checks."""
    if device == runs:
        return None
    return f"input is on {device}; this backend runs {'CPU' if runs == 'cpu' else 'CUDA'} tensors"


def dtype_reason(dtype: Any, allowed: tuple) -> str | None:
    """The reason a backend that takes the ``allowed`` dtypes cannot take ``dtype``, or None."""
    if dtype in allowed:
        return None
    return f"dtype {dtype} is not supported (supported: {', '.join(str(d) for d in allowed)})"


def why_not(b: Backend, problem: Any) -> str | None:
    """None if backend ``b`` can run ``problem``, else the reason."""
    return b.available() or b.supports(problem)


# choose()'s answers: (op, problem, requested) -> (the op's table when chosen, the backend).
# Problems are frozen dataclasses, so equal inputs hit one entry; the requested backend (the
# argument, else the innermost backend() block or FASTARCH_BACKEND) is part of the key, so a
# block's choice never leaks out of it. An entry counts only while the op's table is the same
# list object (register() and a test's monkeypatch.setitem replace it). Availability and the
# supports checks are taken as fixed for the process (they depend on the inputs, the build and
# the machine); a CUDA problem's entry is per current device (supports reads its capability).
_CHOICES: dict[tuple, tuple[list[Backend], Backend]] = {}
_CHOICES_LIMIT = 4096  # distinct problems (shapes) before the memo starts over


_CLEAR_HOOKS: list[Callable[[], None]] = []


def on_clear_choices(hook: Callable[[], None]) -> None:
    """Runs ``hook`` on every clear_choices() (for caches built on the registry's choices)."""
    _CLEAR_HOOKS.append(hook)


def clear_choices() -> None:
    """Forgets every remembered choice (after changing what a supports check reads)."""
    _CHOICES.clear()
    for hook in _CLEAR_HOOKS:
        hook()


def choose(op: str, problem: Any, requested: str = "") -> Backend:
    """The backend that runs ``problem``: ``requested`` if given and able, else the first
    able backend in priority order. Raises NoBackendError listing every backend's reason.
    Remembered per (op, problem, requested)."""
    table = _REGISTRY.get(op)
    try:
        key = (op, problem, requested, _cuda_index(problem))
        hit = _CHOICES.get(key)
    except TypeError:  # an unhashable problem: not remembered
        return _choose(op, problem, requested)
    if hit is not None and hit[0] is table:
        return hit[1]
    chosen = _choose(op, problem, requested)
    if len(_CHOICES) >= _CHOICES_LIMIT:
        _CHOICES.clear()
    _CHOICES[key] = (table, chosen)
    return chosen


def _cuda_index(problem: Any) -> int | None:
    if getattr(problem, "device", None) != "cuda":
        return None
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else None


INTERPRETER_ONLY_WHEN_ASKED = "runs CPU tensors in Triton's interpreter, only when asked for (backend='triton')"
"""Why the automatic choice passes over the Triton backend for CPU tensors: under
TRITON_INTERPRET=1 it can run them, but in Triton's interpreter, for tests and debugging, orders
of magnitude slower than the reference. An automatic choice takes the backend users get."""


def _auto_reason(b: Backend, problem: Any) -> str | None:
    why = why_not(b, problem)
    if why is None and b.name == "triton" and getattr(problem, "device", None) == "cpu":
        return INTERPRETER_ONLY_WHEN_ASKED
    return why


def _choose(op: str, problem: Any, requested: str) -> Backend:
    candidates = backends_of(op)
    if requested:
        _check_name(requested, "backend")
        candidates = [b for b in candidates if b.name == requested]
    reason = why_not if requested else _auto_reason
    for b in candidates:
        if reason(b, problem) is None:
            return b
    lines = [f"  {b.name}: {reason(b, problem) or 'supported'}" for b in backends_of(op)]
    head = f"backend {requested!r} cannot run" if requested else "no backend can run"
    raise NoBackendError(f"fastarch.{op}: {head} {problem}.\n" + "\n".join(lines))
