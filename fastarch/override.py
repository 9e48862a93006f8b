"""Drop-in dispatch to fastarch: ``sdpa_override()`` routes torch.nn.functional's
scaled_dot_product_attention to fastarch inside a block, and ``scaled_dot_product_attention``
here is the function it installs, which the transformers and diffusers integrations call too.

The rule for every drop-in path: fastarch runs a call when one of its kernel backends can
(a backend forced with ``fastarch.backend`` or ``backend=``, else the first able one other
than the plain-PyTorch reference, which is no faster than torch); every other call runs
torch's own function, so a caller sees torch's results and torch's errors there.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from fastarch import ops, registry
from fastarch.ops.activations.backends import ActivationProblem
from fastarch.ops.attn.args import AttentionArgs, AttentionProblem
from fastarch.ops.dispatch import direct_call_allowed
from fastarch.ops.group_norms.backends import GroupNormProblem
from fastarch.ops.linear.backends import LinearProblem
from fastarch.ops.norms.backends import NormProblem
from fastarch.ops.rope.backends import RotaryProblem

TORCH_SDPA = torch._C._nn.scaled_dot_product_attention
"""torch's own scaled_dot_product_attention (what torch.nn.functional holds when unpatched)."""

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_PROBLEMS = {
    "layer_norm": NormProblem, "rms_norm": NormProblem, "attention": AttentionProblem, "group_norm": GroupNormProblem,
    "geglu_packed": ActivationProblem, "swiglu": ActivationProblem, "linear": LinearProblem, "rotary": RotaryProblem,
    "bias_gelu": ActivationProblem,
}


def _constant_while_compiling(fn):
    """torch.compiler.assume_constant_result(fn) without importing torch._dynamo when fastarch
    is imported (~1 s of it): the mark that function sets, which torch.compile reads when it
    traces (tests/integrations check that the drop-in paths compile without a graph break)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_while_compiling
def _backend_for(op: str, requested: str, *fields: object) -> str:
    """The fastarch backend that runs ``op`` on the problem made of ``fields`` (the op's
    problem class's fields, in order), or "" when torch should: the requested backend if it
    can, else (nothing requested) the first able kernel backend.

    Depends only on plain values (dtype, device, head dims: no tensor), so torch.compile
    evaluates it once while tracing instead of tracing the registry."""
    chosen = _choose(op, requested, fields)
    return chosen.name if chosen is not None else ""


@functools.lru_cache(maxsize=256)
def _choose(op: str, requested: str, fields: tuple) -> registry.Backend | None:
    try:
        chosen = registry.choose(op, _PROBLEMS[op](*fields), requested)
    except registry.NoBackendError:
        return None
    return None if chosen.name == "reference" and not requested else chosen


registry.on_clear_choices(_choose.cache_clear)


def backend_for(op: str, fields: tuple, backend: str | None = None) -> str:
    """The fastarch backend a drop-in path runs ``op`` on ("" for torch's own). fields: the
    op's problem (fastarch.ops.norms.backends.NormProblem or
    fastarch.ops.attn.args.AttentionProblem) as a tuple of its fields. backend: forced for
    this call (default: the innermost fastarch.backend block, else FASTARCH_BACKEND, else
    automatic)."""
    return _backend_for(op, registry.requested_backend(backend), *fields)


def kernel_for(op: str, fields: tuple, backend: str | None = None) -> registry.Backend | None:
    """backend_for's choice as the registry's Backend, None for torch's own. A drop-in layer
    whose call needs nothing from torch's dispatcher (fastarch.ops.dispatch.direct_call_allowed)
    and whose inputs it has checked as the op would runs the backend's ``forward`` on them
    directly: in a decode step of a small model, the op's layers of Python cost as much as its
    kernel. Only where direct_call_allowed (dynamo would trace the registry here; compiled code
    asks backend_for)."""
    return _choose(op, registry.requested_backend(backend), fields)


def attention_direct(query: Tensor, key: Tensor, value: Tensor, scale: float | None, backend: str | None,
                     cu_seqlens: Tensor | None = None, max_seqlen: int = 0) -> Tensor | None:
    """Attention without a mask, causality or dropout (every query sees every key of its
    sequence: a decode step's one query, a UNet's self- and cross-attention, a padded batch's
    packed real tokens) by the kernel called directly. None where fastarch.ops.attention must
    run: anything it would check or refuse, autograd, torch.compile, a mode. The op's layers of
    Python cost ~20-30 us a call, several times a small call's kernel (a decode step's few
    hundred keys, a UNet's 8x8 map), and its checks of packed offsets on a GPU launch a dozen
    small kernels.

    Dense: (B, H, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, Dv) with contiguous last dims ->
    (B, H, Sq, Dv). Packed self-attention (cu_seqlens given): (total, H, D), (total, Hkv, D),
    (total, Hkv, Dv) -> (total, H, Dv), the sequences at int32 offsets cu_seqlens (N + 1,) on
    the tensors' device, the longest max_seqlen: offsets the caller made and vouches for (as
    fastarch.models.packing makes them from a padding mask), which are not read here."""
    if not (type(query) is Tensor and type(key) is Tensor and type(value) is Tensor):
        return None
    dtype = query.dtype
    if dtype not in _KERNEL_DTYPES or key.dtype != dtype or value.dtype != dtype:
        return None
    device = query.device
    if key.device != device or value.device != device:
        return None
    packed = cu_seqlens is not None
    if packed:
        if (query.dim() != 3 or key.dim() != 3 or value.dim() != 3 or key.shape[0] != query.shape[0]
                or type(cu_seqlens) is not Tensor or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1
                or cu_seqlens.numel() < 2 or cu_seqlens.device != device or not cu_seqlens.is_contiguous()
                or type(max_seqlen) is not int or max_seqlen < 1):
            return None
        query, key, value = (t.permute(1, 0, 2).unsqueeze(0) for t in (query, key, value))  # (1, H, total, D)
    elif query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return None
    batch, heads, queries, head_dim = query.shape
    _, kv_heads, keys, _ = key.shape
    if (key.shape[0] != batch or value.shape[0] != batch or value.shape[1] != kv_heads or value.shape[2] != keys
            or key.shape[3] != head_dim or keys < 1 or queries < 1 or heads % kv_heads != 0 or head_dim < 1
            or value.shape[3] < 1):
        return None
    if query.stride(3) != 1 or key.stride(3) != 1 or value.stride(3) != 1:
        return None
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if type(scale) is not float or not -math.inf < scale < math.inf or not direct_call_allowed((query, key, value)):
        return None
    # AttentionProblem's fields
    problem = (device.type, dtype, head_dim, value.shape[3], heads, kv_heads, False, False, packed, False, False, False)
    kernel = kernel_for("attention", problem, backend)
    if kernel is None:
        return None
    if not packed:
        return kernel.forward(query, key, value, AttentionArgs(scale=scale))[0]
    args = AttentionArgs(cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                         max_seqlen_k=max_seqlen, scale=scale)
    return kernel.forward(query, key, value, args)[0][0].permute(1, 0, 2)


def _plain_tensor(t: object) -> bool:
    # subclasses (DTensor, quantized wrappers) and nested tensors keep torch's path
    return (type(t) is Tensor or type(t) is torch.nn.Parameter) and not t.is_nested


def _float_in_range(x: object, low: float, high: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and low <= x <= high


def _broadcasts(*shapes: tuple[int, ...]) -> bool:
    rank = max(len(s) for s in shapes)
    for i in range(1, rank + 1):
        sizes = {s[-i] for s in shapes if len(s) >= i} - {1}
        if len(sizes) > 1:
            return False
    return True


def _sdpa_backend(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, dropout_p: float, is_causal: bool,
    scale: float | None, enable_gqa: bool, backend: str | None,
) -> str:
    """The fastarch backend for one scaled_dot_product_attention call, or "" where torch's own
    must run it: anything fastarch would refuse or compute differently (a mask that needs a
    gradient, an argument torch rejects) goes to torch, which gives its answer or its error."""
    if not (_plain_tensor(query) and _plain_tensor(key) and _plain_tensor(value)):
        return ""
    if not (query.dtype == key.dtype == value.dtype and query.dtype in _KERNEL_DTYPES):
        return ""
    if not (query.device == key.device == value.device and query.dim() == key.dim() == value.dim() >= 3):
        return ""
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        return ""
    if not _float_in_range(dropout_p, 0.0, 1.0):
        return ""
    if scale is not None and not _float_in_range(scale, -float("inf"), float("inf")):
        return ""  # torch takes an infinite or NaN scale (NaN fails every comparison); fastarch refuses it
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2] or query.shape[-1] < 1 or value.shape[-1] < 1:
        return ""
    lead_q, lead_k, lead_v = query.shape[:-2], key.shape[:-2], value.shape[:-2]
    if enable_gqa:
        heads, kv_heads = lead_q[-1], lead_k[-1]
        if lead_v[-1] != kv_heads or kv_heads < 1 or heads % kv_heads != 0:
            return ""
        if not _broadcasts(lead_q[:-1], lead_k[:-1], lead_v[:-1]):
            return ""
    else:
        if not _broadcasts(lead_q, lead_k, lead_v):
            return ""
        heads = kv_heads = max(lead_q[-1], lead_k[-1], lead_v[-1])
    if attn_mask is not None:
        if is_causal or not _plain_tensor(attn_mask) or attn_mask.device != query.device:
            return ""
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            return ""
        if attn_mask.requires_grad and torch.is_grad_enabled():
            return ""  # fastarch gives no gradient to the mask (T5's learned position bias needs one)
        if attn_mask.dim() > query.dim() or not _broadcasts(attn_mask.shape, (*query.shape[:-1], key.shape[-2])):
            return ""
    problem = (query.device.type, query.dtype, int(query.shape[-1]), int(value.shape[-1]), int(heads), int(kv_heads),
               attn_mask is not None, False, False, dropout_p > 0, False, False)
    return backend_for("attention", problem, backend)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *args,
    scale: float | None = None,
    enable_gqa: bool = False,
    **kwargs,
) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, run by fastarch where a kernel backend
    can (see fastarch.ops.scaled_dot_product_attention for the shapes and its two documented
    differences: its own dropout mask, zeros for a query that sees no key) and by torch's own
    function otherwise (other dtypes, subclasses, a mask needing a gradient, an argument torch
    rejects, any argument this version does not know)."""
    if args or kwargs:
        return TORCH_SDPA(query, key, value, attn_mask, dropout_p, is_causal, *args, scale=scale, enable_gqa=enable_gqa,
                          **kwargs)
    chosen = _sdpa_backend(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, None)
    if not chosen:
        return TORCH_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    # the op's own choice is ``chosen``: the same problem, the same requested backend
    return ops.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


@contextlib.contextmanager
def sdpa_override() -> Iterator[None]:
    """Inside the block, torch.nn.functional.scaled_dot_product_attention is fastarch's (see
    ``scaled_dot_product_attention`` above); on exit, also by an exception, it is whatever it
    was before. Blocks nest. The patch is process-wide (every thread), and reaches callers
    that look the function up on torch.nn.functional at call time (transformers, diffusers
    and torch.nn do), not a name imported before the block (``from torch.nn.functional
    import scaled_dot_product_attention``)."""
    previous = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = scaled_dot_product_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = previous
