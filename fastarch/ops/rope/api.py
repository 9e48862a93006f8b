"""rotary: the rotary position embedding of q and k in one pass, as one torch op
(``torch.ops.fastarch.rotary``) with a fake implementation and autograd through
``fastarch::rotary_backward`` (the inverse rotation); both ask the registry for a backend
(backends.py). The semantics are reference.py's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import registry
from fastarch.ops import dispatch
from fastarch.ops.rope.backends import RotaryProblem
from fastarch.ops.rope.reference import compute_dtype
from fastarch.ops.rows import last_dim_contiguous

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TABLE_DTYPES = (torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)
OP = "fastarch.rotary"


def _check(q: object, k: object, cos: object, sin: object, positions: object, interleaved: object) -> None:
    """Raises a ValueError/TypeError naming the bad argument and what was expected: the op's
    check (dispatch.custom_op), run once per call before torch's own argument parsing. The
    positions' values are checked in the op itself (_check_position_values: no fake has them)."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{OP}: q must be float32, float16, bfloat16 or float64, got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"{OP}: k must have q's dtype {q.dtype}, got {k.dtype}")
    if q.dim() not in (3, 4):
        raise ValueError(
            f"{OP}: q must be (batch, heads, seqlen, head_dim) or packed (total, heads, head_dim), got shape"
            f" {tuple(q.shape)}"
        )
    if k.dim() != q.dim():
        raise ValueError(f"{OP}: k must have q's rank {q.dim()}, got shape {tuple(k.shape)}")
    packed = q.dim() == 3
    if packed and (k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]):
        raise ValueError(
            f"{OP}: k must be (total, heads, head_dim) with q's total {q.shape[0]} and head_dim {q.shape[2]}, got"
            f" {tuple(k.shape)}"
        )
    if not packed and (k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or k.shape[3] != q.shape[3]):
        raise ValueError(
            f"{OP}: k must be (batch, heads, seqlen, head_dim) with q's batch {q.shape[0]}, seqlen {q.shape[2]} and"
            f" head_dim {q.shape[3]}, got {tuple(k.shape)}"
        )
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{OP}: {name} must be on q's device {q.device}, got {t.device}")
    if cos.dim() != 2 or cos.shape[1] < 1:
        raise ValueError(f"{OP}: cos must be a (max_pos, rot_dim / 2) table, got shape {tuple(cos.shape)}")
    if tuple(sin.shape) != tuple(cos.shape):
        raise ValueError(f"{OP}: sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype not in _TABLE_DTYPES:
            raise TypeError(f"{OP}: {name} must be float32 (or float64), got {t.dtype}; make the table with .float()")
    head_dim = q.shape[-1]
    if 2 * cos.shape[1] > head_dim:
        raise ValueError(
            f"{OP}: the rotary dim 2 * cos.shape[1] = {2 * cos.shape[1]} exceeds q's and k's head_dim {head_dim}"
        )
    if positions is not None:
        if not isinstance(positions, Tensor):
            raise TypeError(f"{OP}: positions must be a torch.Tensor or None, got {type(positions).__name__}")
        if positions.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{OP}: positions must be int32 or int64, got {positions.dtype}")
        if positions.device != q.device:
            raise ValueError(f"{OP}: positions must be on q's device {q.device}, got {positions.device}")
        shapes = [(q.shape[0],)] if packed else [(q.shape[0],), (q.shape[0], q.shape[2])]
        if tuple(positions.shape) not in shapes:
            what = "(total,)" if packed else "(batch,) offsets or (batch, seqlen)"
            expected = " or ".join(map(str, shapes))
            raise ValueError(f"{OP}: positions must be {what} = {expected}, got {tuple(positions.shape)}")
    elif (q.shape[0] if packed else q.shape[2]) > cos.shape[0]:
        raise ValueError(
            f"{OP}: positions None numbers the tokens 0 .. {(q.shape[0] if packed else q.shape[2]) - 1}, past the"
            f" table's {cos.shape[0]} positions"
        )
    if not isinstance(interleaved, bool):
        raise TypeError(f"{OP}: interleaved must be a bool, got {type(interleaved).__name__}")


def _check_position_values(q: Tensor, cos: Tensor, positions: Tensor | None) -> None:
    """Every token's position in 0 .. max_pos - 1: checked on the host for CPU tensors, asserted
    on the device for GPU ones (no wait; the kernels also never read outside the table)."""
    if positions is None or positions.numel() == 0:
        return
    offsets = q.dim() == 4 and positions.dim() == 1
    steps = q.shape[2] if offsets else 1  # an offset covers positions[b] .. positions[b] + S - 1
    if offsets and steps == 0:
        return
    max_pos = cos.shape[0]
    why = (f"positions must lie in 0 .. {max_pos - steps} (the table's {max_pos} positions less the {steps - 1}"
           f" tokens after each offset)" if offsets else f"positions must lie in 0 .. {max_pos - 1} (the table's rows)")
    if positions.device.type == "cpu":
        if positions.numel() <= 4096:  # decoding's few offsets: one read, no reduction ops
            values = positions.flatten().tolist()
            lo, hi = min(values), max(values)
        else:
            lo, hi = (int(v) for v in torch.aminmax(positions))
        if lo < 0 or hi > max_pos - steps:
            raise ValueError(f"{OP}: {why}, got {lo} .. {hi}")
    else:
        torch._assert_async(((positions >= 0) & (positions <= max_pos - steps)).all(), f"{OP}: {why}")


def _kernel_args(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None):
    """What every backend takes: last dims contiguous, tables contiguous in the compute dtype,
    positions int64."""
    acc = compute_dtype(q.dtype)

    def table(t: Tensor) -> Tensor:
        return t if t.dtype == acc and t.is_contiguous() else t.to(acc).contiguous()

    if positions is not None and (positions.dtype != torch.int64 or not positions.is_contiguous()):
        positions = positions.to(torch.int64).contiguous()
    return (
        last_dim_contiguous(q),
        last_dim_contiguous(k),
        table(cos),
        table(sin),
        positions,
    )


def _run(q, k, cos, sin, positions, interleaved: bool, inverse: bool, backend: str) -> tuple[Tensor, Tensor]:
    impl = registry.choose("rotary", RotaryProblem.of(q, cos), backend)
    return impl.forward(*_kernel_args(q, k, cos, sin, positions), interleaved, inverse)


def _fake(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    return torch.empty_like(q), torch.empty_like(k)


@dispatch.custom_op(
    "fastarch::rotary",
    check=lambda q, k, cos, sin, positions, interleaved, backend="", check_positions=True: _check(
        q, k, cos, sin, positions, interleaved
    ),
)
def _rotary(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None, interleaved: bool, backend: str = "",
    check_positions: bool = True,
) -> tuple[Tensor, Tensor]:
    if check_positions:
        _check_position_values(q, cos, positions)
    return _run(q, k, cos, sin, positions, interleaved, False, backend)


@_rotary.register_fake
def _(q, k, cos, sin, positions, interleaved, backend="", check_positions=True):
    return _fake(q, k)


@dispatch.custom_op("fastarch::rotary_backward", mutates_args=())
def _rotary_backward(
    dq_out: Tensor, dk_out: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None, interleaved: bool,
    backend: str = "",
) -> tuple[Tensor, Tensor]:
    """dq, dk: the output gradients turned back by the same angles (a rotation's transpose is
    its inverse); the pass-through channels' gradients pass through."""
    return _run(dq_out, dk_out, cos, sin, positions, interleaved, True, backend)


@_rotary_backward.register_fake
def _(dq_out, dk_out, cos, sin, positions, interleaved, backend=""):
    return _fake(dq_out, dk_out)


def _setup(ctx, inputs, output):
    _, _, cos, sin, positions, interleaved, backend, _ = inputs
    ctx.save_for_backward(cos, sin, positions)
    ctx.interleaved, ctx.backend = interleaved, backend


def _grad(ctx, dq_out, dk_out):
    cos, sin, positions = ctx.saved_tensors
    dq, dk = _rotary_backward(dq_out, dk_out, cos, sin, positions, ctx.interleaved, ctx.backend)
    return dq, dk, None, None, None, None, None, None


_rotary.register_autograd(_grad, setup_context=_setup)


def rotary(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    positions: Tensor | None = None,
    interleaved: bool = False,
    *,
    backend: str | None = None,
    positions_checked: bool = False,
) -> tuple[Tensor, Tensor]:
    """Rotary position embedding of q and k in one pass. Returns (q_out, k_out), new tensors of
    q's and k's shapes and dtype (contiguous for contiguous inputs).

    q: (B, Hq, S, D) or packed (total, Hq, D); k: the same with Hk heads (GQA/MQA: Hk may
    differ); float32/float16/bfloat16 (float64 on the cpu and reference backends).
    cos, sin: (max_pos, rot_dim / 2) tables, float32 (or float64; converted to fp32 for other
    inputs, a copy per call), e.g. from ``fastarch.ops.rotary_tables``. rot_dim <= D: only the
    first rot_dim channels rotate, the rest pass through (partial rotary).
    positions: None (token s at position s; packed: token t at t); a (B,) int32/int64 tensor of
    offsets (decode with a cache: token s of sequence b at positions[b] + s); or every token's
    position, (B, S) or (total,) for packed sequences. Positions past the table are an error.
    interleaved: False for the GPT-NeoX / LLaMA layout (transformers' rotate_half: channel i
    pairs with i + rot_dim / 2), True for GPT-J's (rotate_every_two: 2i with 2i + 1).

    Computed in fp32 and rounded once. Gradients flow to q and k (the inverse rotation); cos and
    sin are constants (an error if they require grad). backend: force "cuda", "cpu", "triton"
    or "reference". positions_checked: the caller vouches that every position fits the table
    (a decoder that bounds its cache's lengths on the host), so the values are neither read on
    the host (CPU) nor asserted on the device (GPU); the C++ and GPU kernels never read
    outside the table either way.
    """
    if torch.is_grad_enabled() and (getattr(cos, "requires_grad", False) or getattr(sin, "requires_grad", False)):
        raise ValueError(f"{OP}: cos and sin get no gradient; pass them detached (cos.detach())")
    return _rotary(q, k, cos, sin, positions, interleaved, registry.requested_backend(backend), not positions_checked)
