"""``wrap_triton`` for every torch release fastarch supports.

Under TRITON_INTERPRET=1, ``triton.jit`` gives an ``InterpretedFunction`` (and ``triton.autotune``
an Autotuner around one), which torch's ``wrap_triton`` launches as it is in torch 2.14 and
refuses in 2.11 ("only works on functions annotated with triton.jit"). Here such a kernel is
launched as it is on every release: the interpreter runs eagerly, with nothing to trace.
"""

from __future__ import annotations

from torch.library import wrap_triton as _torch_wrap_triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction


def wrap_triton(kernel):
    """torch.library.wrap_triton(kernel), or the kernel itself where it is interpreted."""
    inner = kernel.fn if isinstance(kernel, Autotuner) else kernel
    if isinstance(inner, JITFunction):
        return _torch_wrap_triton(kernel)
    return kernel
