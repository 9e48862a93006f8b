"""A faster Triton CPU interpreter for the test suite (TRITON_INTERPRET=1, no GPU).

Triton's interpreter points triton.language's builtins at numpy implementations when a kernel
launch starts (``_patch_lang``) and back when it ends. It also re-runs that patching at every
call of a @triton.jit helper inside the kernel (``tl.sum``, our ``_cast``, ...), once per
program: ``inspect.getmembers`` over the language modules, a fifth of a millisecond each time
and a quarter to a third of the interpreted time of kernels that call helpers in their loops
(group_norm, the attention tables). Inside a running launch the modules are already patched, so
this skips the repeat for a helper whose language modules the launch has already patched; the
first helper that reaches another module (triton.language.core, from tl.sum) still patches it,
as before. What the kernels compute is unchanged: ``test_triton_interpreter.py`` runs kernels
with and without this and compares the bits.

``install()`` is called by conftest.py; with a Triton whose interpreter lacks these hooks it
does nothing (the tests then run at the interpreter's own speed).
"""

from __future__ import annotations

import inspect

_state: dict = {"installed": False}


class _NoPatch:
    def restore(self) -> None:
        pass


def install() -> bool:
    """Installs the shortcut once; True when it is active."""
    if _state["installed"]:
        return True
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch_lang = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if patch_lang is None or executor is None:
        return False
    run_grid = executor.__call__
    launches: list[set[int] | None] = []  # per running launch: the modules patched so far

    def languages(fn) -> set[int]:  # the modules _patch_lang patches for fn
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    def patch_once(fn):
        if _state["enabled"] and launches and launches[-1] is not None and languages(fn) <= launches[-1]:
            return _NoPatch()
        scope = patch_lang(fn)
        if launches:
            launches[-1] = languages(fn) | (launches[-1] or set())
        return scope

    def run_grid_tracked(self, *args, **kwargs):
        launches.append(None)
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            launches.pop()

    interpreter._patch_lang = patch_once
    executor.__call__ = run_grid_tracked
    _state.update(installed=True, enabled=True)
    return True


def set_enabled(enabled: bool) -> None:
    """Turns the shortcut off (every helper call patches again, as Triton does) or back on."""
    _state["enabled"] = enabled


def installed() -> bool:
    return _state["installed"]
