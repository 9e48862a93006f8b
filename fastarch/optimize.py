"""``fastarch.optimize(model)``: faster models without edits to their code. It swaps the layers
fastarch runs (torch's LayerNorm, RMSNorm, GroupNorm — with the SiLU after it in a Sequential —,
MultiheadAttention, Conv2d and Linear; Hugging Face RMSNorm-style layers recognised by their
behaviour) for fastarch modules holding the same Parameter objects, sets transformers models'
attention to fastarch's and diffusers' attention processors, ResNet blocks and GEGLUs to
fastarch's, and returns a Report of what it changed and what it left alone, and why.
``fastarch.restore(model)`` puts the original module objects back. ``cuda_graphs=True`` also
replays the model's repeated calls on a GPU from CUDA graphs (fastarch.cuda_graphs).

A swapped layer runs fastarch where one of its kernel backends can run the call (see
fastarch.override) and the original layer's own code otherwise (other dtypes, a weight of
another dtype than the input as under autocast), so its results are the original's within a
rounding.
"""

from __future__ import annotations

import copy
import math
import re
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastarch import nn as fnn
from fastarch import ops, registry
from fastarch.ops.dispatch import direct_call_allowed
from fastarch.ops.group_norms import layout as gn_layout
from fastarch.ops.linear.backends import weight_layout
from fastarch.ops.rows import as_rows, contiguous_or_none
from fastarch.override import backend_for, kernel_for

_ORIGINAL = "_fastarch_original"  # a swapped module's __dict__ entry: the module it replaced
_INDEX = re.compile(r"\.\d+(?=\.|$)")  # a module list's index in a path: ".3" of "layers.3.mlp"
# hooks that run when a module is called (a swap, or a path that skips the call, would lose them)
CALL_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOKS = CALL_HOOKS + (
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


# ----------------------------------------------------------------------------- the report


@dataclass
class Entry:
    """One module optimize looked at: its path in the model, its class, and what happened."""

    path: str
    kind: str
    swapped: bool
    detail: str


@dataclass
class Report:
    """What ``optimize`` did: ``entries`` (each module swapped or left alone, with why), and
    ``model``, the optimized model (``inplace=False``: the copy)."""

    model: nn.Module | None = None
    entries: list[Entry] = field(default_factory=list)

    @property
    def swapped(self) -> list[Entry]:
        return [e for e in self.entries if e.swapped]

    @property
    def left_alone(self) -> list[Entry]:
        return [e for e in self.entries if not e.swapped]

    def add(self, path: str, kind: str, swapped: bool, detail: str) -> None:
        self.entries.append(Entry(path or "(model)", kind, swapped, detail))

    def __str__(self) -> str:
        """A table with one row per kind of change: the entries of repeated blocks that differ
        only in their index (layers.0.mlp, layers.1.mlp, ...) share a row (layers.*.mlp) and
        its count."""
        groups: dict[tuple, int] = {}
        for e in self.entries:
            key = (_INDEX.sub(".*", e.path), e.kind, "fastarch" if e.swapped else "left alone", e.detail)
            groups[key] = groups.get(key, 0) + 1
        head = ("module", "count", "type", "result", "detail")
        rows = [(path, str(n), kind, result, detail) for (path, kind, result, detail), n in groups.items()]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
        lines = [f"fastarch.optimize: {len(self.swapped)} swapped, {len(self.left_alone)} left alone"]
        for r in [head, *rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
        return "\n".join(lines)

    __repr__ = __str__


# ----------------------------------------------------------------------------- swapped modules


def _norm_backend(module: nn.Module, x: Tensor, weight: Tensor | None) -> str:
    """The fastarch backend a norm layer runs x on, or "" for its own code: x must end with
    the normalized shape and have the weight's dtype (torch promotes mixed dtypes, as under
    autocast; fastarch's kernels take one dtype)."""
    shape = module.normalized_shape
    k = len(shape)
    if not isinstance(x, Tensor) or x.dim() < k or tuple(x.shape[x.dim() - k:]) != tuple(shape):
        return ""
    if weight is not None and weight.dtype != x.dtype:
        return ""
    # the norms' backends decide by device and dtype alone
    return backend_for(module._fastarch_op, (x.device.type, x.dtype, 1, 1), module._fastarch_backend)


def _norm_direct(module: nn.Module, x: object, rms: bool, weight_offset: float = 0.0) -> Tensor | None:
    """The norm of x over ``module``'s normalized shape (one trailing dim) by the chosen
    backend's kernel called directly, or None where the layer's other paths must run: x not a
    plain tensor ending with the normalized size, a parameter of another dtype (torch promotes
    mixed dtypes, as under autocast; the kernels take one), autograd, torch.compile, a mode, an
    eps the op would refuse, no fastarch kernel backend for x. The op's layers of Python cost
    ~10 us a call, more than a small call's kernel."""
    if type(x) is not Tensor:
        return None
    shape = module.normalized_shape
    if len(shape) != 1 or x.dim() < 1 or x.shape[-1] != shape[0]:
        return None
    params = module._parameters
    weight, bias = params.get("weight"), params.get("bias")
    n, dtype = shape[0], x.dtype
    for p in (weight, bias):
        if p is not None and (p.dtype != dtype or p.dim() != 1 or p.shape[0] != n):
            return None
    eps = module.eps
    if type(eps) is not float or not 0.0 <= eps < math.inf or not direct_call_allowed((x, weight, bias)):
        return None
    kernel = kernel_for(module._fastarch_op, (x.device.type, dtype, 1, 1), module._fastarch_backend)  # by device, dtype
    if kernel is None:
        return None
    y = kernel.forward(as_rows(x), None, contiguous_or_none(weight), contiguous_or_none(bias), eps, rms,
                       weight_offset)[0]
    return y if x.dim() == 2 else y.view_as(x)


def group_norm_backend(x: object, norm: nn.GroupNorm, backend: str | None) -> str:
    """The fastarch backend that runs ``norm`` (a torch GroupNorm) on x, or "" for torch's
    own: x a plain (N, C, ...) tensor of the weight's dtype (torch promotes mixed dtypes, as
    under autocast; fastarch's kernels take one)."""
    if type(x) is not Tensor or x.dim() < 2 or x.shape[1] != norm.num_channels:
        return ""
    if norm.weight is not None and norm.weight.dtype != x.dtype:
        return ""
    # group_norm's backends decide by device and dtype alone
    return backend_for("group_norm", (x.device.type, x.dtype, 1, 1, 1, 1, False), backend)


def group_norm_direct(x: Tensor, norm: nn.GroupNorm, scale: Tensor | None = None, shift: Tensor | None = None,
                      silu: bool = False, backend: str | None = None) -> Tensor | None:
    """``norm`` (a torch GroupNorm) of x, then x̂·(1 + scale) + shift and SiLU as
    fastarch.ops.group_norm computes them, by the chosen backend's kernel called directly; None
    where the op must run (or torch's code): anything it would check or refuse, autograd,
    torch.compile, a mode. The op's layers of Python cost ~10 us a call on a CPU, several times
    its kernel on a UNet's small maps (and what a GPU waits for at batch 1)."""
    if type(x) is not Tensor or x.dim() < 2 or x.numel() == 0:
        return None
    params = norm._parameters
    weight, bias = params.get("weight"), params.get("bias")
    if not direct_call_allowed((x, weight, bias, scale, shift)):
        return None
    n, c = x.shape[0], x.shape[1]
    groups, eps = norm.num_groups, norm.eps
    if c != norm.num_channels or type(groups) is not int or groups < 1 or c % groups:
        return None
    if type(eps) is not float or not 0.0 <= eps < math.inf:
        return None
    dtype, device = x.dtype, x.device
    for p in (weight, bias):
        if p is not None and (p.dtype != dtype or p.device != device or p.shape != (c,)):
            return None
    for t in (scale, shift):
        if t is not None and (type(t) is not Tensor or t.dtype != dtype or t.device != device or t.shape != (n, c)):
            return None
    kernel = kernel_for("group_norm", (device.type, dtype, 1, 1, 1, 1, False), backend)  # by device and dtype
    if kernel is None:
        return None
    channels_last = gn_layout.is_channels_last(x)
    y3 = kernel.forward(gn_layout.to_3d(x, channels_last), groups, contiguous_or_none(weight), contiguous_or_none(bias),
                        contiguous_or_none(scale), contiguous_or_none(shift), eps, silu, channels_last)[0]
    return gn_layout.from_3d(y3, x, channels_last)


def _rows(x: Tensor, k: int) -> Tensor:
    """x (..., *normalized_shape) as (..., prod(normalized_shape)): normalizing over k
    trailing dims is normalizing over their product."""
    return x if k == 1 else x.reshape(*x.shape[: x.dim() - k], -1)


def _vector(p: Tensor | None) -> Tensor | None:
    return p.reshape(-1) if p is not None else None


class LayerNorm(fnn.LayerNorm):
    """fastarch.nn.LayerNorm that runs torch's LayerNorm where fastarch has no kernel."""

    _fastarch_op = "layer_norm"
    _fastarch_backend: str | None = None

    def forward(self, x: Tensor) -> Tensor:
        if (y := _norm_direct(self, x, False)) is not None:
            return y
        chosen = _norm_backend(self, x, self.weight)
        if not chosen:
            return nn.LayerNorm.forward(self, x)
        k = len(self.normalized_shape)
        y = ops.layer_norm(_rows(x, k), _vector(self.weight), _vector(self.bias), self.eps, backend=chosen)
        return y.view(x.shape)


class RMSNorm(fnn.RMSNorm):
    """fastarch.nn.RMSNorm that runs torch's RMSNorm where fastarch has no kernel."""

    _fastarch_op = "rms_norm"
    _fastarch_backend: str | None = None

    def forward(self, x: Tensor) -> Tensor:
        if (y := _norm_direct(self, x, True)) is not None:
            return y
        chosen = _norm_backend(self, x, self.weight)
        if not chosen:
            return nn.RMSNorm.forward(self, x)
        k = len(self.normalized_shape)
        y = ops.rms_norm(_rows(x, k), _vector(self.weight), self.eps, backend=chosen)
        return y.view(x.shape)


class HFRMSNorm(fnn.RMSNorm):
    """A Hugging Face RMSNorm-style layer (LlamaRMSNorm, T5LayerNorm, ...: ``weight``,
    ``variance_epsilon``; GemmaRMSNorm's x̂ * (1 + weight): ``weight``, ``eps``,
    weight_offset 1.0) on fastarch's rms_norm, holding the same weight.

    When the input's dtype is the weight's, LLaMA's and T5's layers compute
    x * rsqrt(mean(x^2) + eps) in fp32 and round it to that dtype, then multiply by the weight
    and round again; fastarch rounds once, at the end (the same value within one rounding,
    never further from the exact one). Gemma's rounds once as fastarch does, 1 + weight added
    in fp32 as fastarch adds it. Other dtype pairs (LLaMA and T5 promote them differently) run
    the original layer.
    """

    _fastarch_op = "rms_norm"
    _fastarch_backend: str | None = None

    @property
    def variance_epsilon(self) -> float:
        return self.eps

    def forward(self, x: Tensor) -> Tensor:
        if (y := _norm_direct(self, x, True, self.weight_offset)) is not None:
            return y
        chosen = _norm_backend(self, x, self.weight)
        if not chosen:
            original = self.__dict__[_ORIGINAL]
            if original._parameters["weight"] is not self.weight:  # reassigned since the swap
                original._parameters["weight"] = self.weight
            return original(x)
        return ops.rms_norm(x, self.weight, self.eps, weight_offset=self.weight_offset, backend=chosen)


class Linear(fnn.Linear):
    """fastarch.nn.Linear that runs torch's Linear where fastarch's kernels would not
    (linear_or_none)."""

    _fastarch_backend: str | None = None

    def forward(self, x: Tensor) -> Tensor:
        w, b = self._parameters["weight"], self._parameters["bias"]
        y = linear_or_none(x, w, b, self._fastarch_backend)
        return F.linear(x, w, b) if y is None else y


def linear_or_none(x: Tensor, w: Tensor, b: Tensor | None, backend: str | None) -> Tensor | None:
    """x W^T + b on fastarch's linear op or its kernel, or None where torch's product must run
    it: an input of another dtype than the weight, autocast (which would cast both), a problem
    no fastarch backend takes (more rows than the kernels take: PyTorch's GEMM is the faster
    there). w: contiguous (out_features, in_features), or the K-major transpose of a contiguous
    (in_features, out_features) weight (transformers' Conv1D)."""
    # A decode step calls this a few hundred times, and a product of one row takes ~20 us: each
    # step below is the cheapest form found (Module.__getattr__, which self.weight goes through,
    # costs ~0.5 us a parameter; a view back by *shape ~2 us).
    if not isinstance(x, Tensor) or x.dtype != w.dtype or x.ndim == 0 or b is not None and b.dtype != x.dtype:
        return None
    shape = x.shape
    k = shape[-1]
    device = x.device.type
    if k != w.shape[1] or torch.is_autocast_enabled(device):
        return None
    problem = (device, x.dtype, x.numel() // k if k else 0, k, w.shape[0], *weight_layout(w))  # LinearProblem's
    if direct_call_allowed((x, w, b)):
        # the op's kernel call without its checks (done above; the C++ op checks devices)
        kernel = kernel_for("linear", problem, backend)
        if kernel is None:
            return None
        y = kernel.forward(as_rows(x), w, None if b is None else b.contiguous())
        if x.ndim == 2:
            return y
        return y.view(shape[0], shape[1], w.shape[0]) if x.ndim == 3 else y.view(*shape[:-1], w.shape[0])
    chosen = backend_for("linear", problem, backend)
    return ops.linear(x, w, b, backend=chosen) if chosen else None


class GroupNorm(fnn.GroupNorm):
    """fastarch.nn.GroupNorm that runs torch's GroupNorm where fastarch has no kernel; as
    GroupNormSiLU (a Sequential's GroupNorm with the SiLU that followed it folded in), the
    SiLU too."""

    _fastarch_backend: str | None = None
    _activation: str | None = None

    def forward(self, x: Tensor) -> Tensor:
        silu = self._activation is not None
        if (y := group_norm_direct(x, self, None, None, silu, self._fastarch_backend)) is not None:
            return y
        chosen = group_norm_backend(x, self, self._fastarch_backend)
        if not chosen:
            y = nn.GroupNorm.forward(self, x)
            return nn.functional.silu(y) if silu else y
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, activation=self._activation,
                              backend=chosen)


class GroupNormSiLU(GroupNorm):
    """GroupNorm then SiLU (the SiLU's slot in the Sequential holds a FoldedSiLU)."""

    _activation = "silu"


class FoldedSiLU(nn.Identity):
    """Where a SiLU was: the GroupNormSiLU before it applies it."""


class MultiheadAttention(fnn.MultiheadAttention):
    """fastarch.nn.MultiheadAttention that runs torch's where fastarch has no kernel."""

    _fastarch_backend: str | None = None

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        run_torch = need_weights or not isinstance(query, Tensor) or query.dtype != self.out_proj.weight.dtype
        if not run_torch:
            problem = (query.device.type, query.dtype, self.head_dim, self.head_dim, self.num_heads, self.num_heads,
                       attn_mask is not None, key_padding_mask is not None, False, self.training and self.dropout > 0,
                       False, False)  # AttentionProblem's fields
            run_torch = not backend_for("attention", problem, self._fastarch_backend)
        forward = super(fnn.MultiheadAttention, self).forward if run_torch else super().forward
        return forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                       attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)


# ----------------------------------------------------------------------------- recognising layers

_PROBE_EPS = 1e-6  # fp32 probe: the same formula in another order differs by a few ulps


def _hf_rms_norm_eps(module: nn.Module) -> object:
    """The eps of a Hugging Face RMSNorm-style layer: ``variance_epsilon`` (LLaMA, T5, ...) or
    ``eps`` (Gemma)."""
    eps = getattr(module, "variance_epsilon", None)
    return getattr(module, "eps", None) if eps is None else eps


def _hf_rms_norm_kind(module: nn.Module) -> tuple[float | None, str | None]:
    """(weight_offset, None) when ``module`` computes x * rsqrt(mean(x^2) + eps) * (weight +
    weight_offset) over the last dim, weight_offset 0 (LLaMA, T5, ...) or 1 (Gemma's
    1 + weight), checked on a probe input with a random weight, in fp32; else (None, why not)."""
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    eps = _hf_rms_norm_eps(module)
    if set(params) != {"weight"} or weight is None or weight.dim() != 1 or not weight.is_floating_point():
        return None, "not a single 1-D float weight (an RMSNorm-style layer has exactly one)"
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        return None, "no float variance_epsilon or eps (the Hugging Face RMSNorm attributes)"
    if list(module.children()) or list(module.buffers(recurse=False)):
        return None, "has submodules or buffers"
    if weight.device.type == "meta":
        return None, "parameters on the meta device: its behaviour cannot be checked"
    n = weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, n, generator=gen).to(weight.device)
    w = torch.rand(n, generator=gen).add(0.5).to(weight.device)
    try:
        with torch.no_grad():
            got = torch.func.functional_call(module, {"weight": w}, (x,))
    except Exception as e:  # noqa: BLE001  (any failure means: not a layer we understand)
        return None, f"its forward failed on a probe input ({type(e).__name__})"
    if not isinstance(got, Tensor) or got.shape != x.shape or got.dtype != torch.float32:
        return None, "its output on a probe input is not x's shape and dtype"
    x64 = x.double()
    xhat = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + eps)
    for offset in (0.0, 1.0):
        if torch.allclose(got.double(), xhat * (w.double() + offset), rtol=_PROBE_EPS, atol=_PROBE_EPS):
            return offset, None
    return None, "its output differs from x * rsqrt(mean(x^2) + eps) * weight (or * (1 + weight)) on a probe input"


def call_hooked(modules) -> bool:
    """Whether any of ``modules`` has a hook that runs when it is called (a path that skips
    the call would lose it). Asked at every call of the paths that skip calls: each module's
    four hook dicts read from its __dict__ (a generator of getattr took ~1 us a module)."""
    for m in modules:
        d = m.__dict__
        if d.get("_forward_hooks") or d.get("_forward_pre_hooks") or d.get("_backward_hooks") or d.get(
                "_backward_pre_hooks"):
            return True
    return False


def tree_call_hooked(root: nn.Module) -> bool:
    """call_hooked over root and every module under it, walked through their ``_modules``
    (Module.modules(), a recursive generator keeping a set of the modules seen, took ~3 us a
    module: ~0.3 ms of every call of a 6-layer BERT's unpadded encoder)."""
    stack = [root]
    while stack:
        d = stack.pop().__dict__
        if d.get("_forward_hooks") or d.get("_forward_pre_hooks") or d.get("_backward_hooks") or d.get(
                "_backward_pre_hooks"):
            return True
        stack.extend(m for m in d["_modules"].values() if m is not None)
    return False


def _hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in _HOOKS)


def _no_kernel(module: nn.Module, backend: str | None) -> str | None:
    """Why no fastarch kernel backend runs ``module`` in its parameters' dtype and device
    (its swap would only ever run the original code), or None."""
    if isinstance(module, nn.MultiheadAttention):
        p, op = module.out_proj.weight, "attention"
        fields = (p.device.type, p.dtype, module.head_dim, module.head_dim, module.num_heads, module.num_heads,
                  False, False, False, False, False, False)
    elif isinstance(module, nn.GroupNorm):
        p, op = module.weight, "group_norm"
        if p is None:
            return None
        fields = (p.device.type, p.dtype, 1, 1, 1, 1, False)
    elif isinstance(module, nn.Linear):
        return linear_no_kernel(module.weight, backend)
    elif isinstance(module, nn.Conv2d):
        p = module.weight
        if p.device.type != "cpu" or p.dtype not in (torch.float32, torch.bfloat16) or module.padding_mode != "zeros":
            return (f"{str(p.dtype).removeprefix('torch.')} on {p.device.type}, padding_mode {module.padding_mode!r}: "
                    "fastarch's packed convolution runs float32 and bfloat16 on the CPU with zero padding")
        return None
    else:
        p = module.weight
        op = "layer_norm" if isinstance(module, nn.LayerNorm) else "rms_norm"
        if p is None:
            return None  # no parameters: the input's dtype decides, call by call
        fields = (p.device.type, p.dtype, 1, 1)
    if p.device.type == "meta" or backend_for(op, fields, backend):
        return None
    forced = f" (backend {backend!r} forced)" if backend else ""
    return f"{str(p.dtype).removeprefix('torch.')} on {p.device.type}: no fastarch {op} kernel runs it{forced}"


def linear_no_kernel(w: Tensor, backend: str | None) -> str | None:
    """Why no fastarch linear kernel runs weight w ((out_features, in_features), contiguous or
    K-major) at a decode step's rows (1 or 4) in its dtype and device, or None."""
    fields = [(w.device.type, w.dtype, rows, w.shape[1], w.shape[0], *weight_layout(w)) for rows in (1, 4)]
    if w.device.type == "meta" or any(backend_for("linear", f, backend) for f in fields):
        return None
    forced = f" (backend {backend!r} forced)" if backend else ""
    return f"{str(w.dtype).removeprefix('torch.')} on {w.device.type}: no fastarch linear kernel runs it{forced}"


def _swap(module: nn.Module, backend: str | None) -> tuple[nn.Module | None, str | None]:
    """(replacement, None), or (None, why it is left alone), or (None, None): not ours to judge."""
    kind = type(module)
    if isinstance(module, (LayerNorm, RMSNorm, HFRMSNorm, GroupNorm, MultiheadAttention, FoldedSiLU, fnn.Conv2d,
                           fnn.Linear)):
        return None, "already optimized"
    candidates = {
        nn.LayerNorm: LayerNorm, nn.RMSNorm: RMSNorm, nn.GroupNorm: GroupNorm, nn.MultiheadAttention: MultiheadAttention,
        nn.Conv2d: fnn.Conv2d, nn.Linear: Linear,
    }
    if kind in candidates or any(issubclass(kind, c) for c in candidates):
        if kind not in candidates:
            base = next(c for c in candidates if issubclass(kind, c))
            return None, f"a subclass of {base.__name__} (its behaviour may differ)"
        if _hooks(module):
            return None, "has hooks (they would not run on a new module)"
        if why := _no_kernel(module, backend):
            return None, why
        new = candidates[kind].from_torch(module)
    elif kind.__name__.endswith(("RMSNorm", "LayerNorm")) and not kind.__module__.startswith("torch."):
        if _hooks(module):
            return None, "has hooks (they would not run on a new module)"
        offset, why = _hf_rms_norm_kind(module)
        if why := why or _no_kernel(module, backend):
            return None, why
        new = HFRMSNorm(module.weight.shape[0], eps=float(_hf_rms_norm_eps(module)), device="meta")
        new.weight = module.weight
        if offset:
            new.weight_offset = offset
        new.train(module.training)
    else:
        return None, None
    new._fastarch_backend = backend
    new.__dict__[_ORIGINAL] = module
    return new, None


def _describe(new: nn.Module) -> str:
    return f"-> fastarch.optimize.{type(new).__name__}"


def _fold_silu(parent: nn.Module, prefix: str, shared: set[int], report: Report) -> None:
    """In a plain nn.Sequential, a swapped GroupNorm followed by a SiLU becomes one
    GroupNormSiLU and a FoldedSiLU in the SiLU's slot (neither shared with another parent,
    the SiLU without hooks, not in place: its input is the norm's own output)."""
    if type(parent) is not nn.Sequential:
        return
    names = list(parent._modules)
    for first, second in zip(names, names[1:]):
        norm, act = parent._modules[first], parent._modules[second]
        if type(norm) is not GroupNorm or type(act) is not nn.SiLU or _hooks(act):
            continue
        if id(norm.__dict__[_ORIGINAL]) in shared or id(act) in shared:
            continue
        fused = GroupNormSiLU.from_torch(norm.__dict__[_ORIGINAL])
        fused._fastarch_backend = norm._fastarch_backend
        fused.__dict__[_ORIGINAL] = norm.__dict__[_ORIGINAL]
        folded = FoldedSiLU()
        folded.__dict__[_ORIGINAL] = act
        folded.train(act.training)
        setattr(parent, first, fused)
        setattr(parent, second, folded)
        path = f"{prefix}.{second}" if prefix else second
        report.add(path, "SiLU", True, f"-> fastarch.optimize.FoldedSiLU (applied by the GroupNormSiLU at {first})")


def _shared_modules(model: nn.Module) -> set[int]:
    """ids of the modules that are a child of more than one parent slot."""
    seen: set[int] = set()
    shared: set[int] = set()
    for m in model.modules():
        for child in m._modules.values():
            if child is not None:
                (shared if id(child) in seen else seen).add(id(child))
    return shared


# ----------------------------------------------------------------------------- optimize / restore


def optimize(model: nn.Module, *, backend: str | None = None, inplace: bool = True, cuda_graphs: bool = False) -> Report:
    """Swap the layers of ``model`` that fastarch runs for fastarch modules, in place.

    The swapped modules hold the same Parameter objects (state_dict keys and tensors are
    unchanged; training updates the same parameters). transformers models also get
    ``set_attn_implementation("fastarch")`` and diffusers models fastarch's attention
    processors, where the library is imported. backend: force one fastarch backend for the
    optimized layers ("cuda", "cpu", "triton", "reference"; default automatic). inplace=False:
    optimize a deep copy and leave ``model`` as it is. cuda_graphs=True: on a GPU, the
    model's calls without gradients in eval mode are replayed from CUDA graphs once a call of
    the same signature repeats (fastarch.cuda_graphs.GraphedCall: what it captures and what it
    refuses; the outputs are new tensors each call, as eagerly). Returns the Report
    (``print(report)`` is a table); ``report.model`` is the optimized model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastarch.optimize: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        registry.requested_backend(backend)  # a clear error for an unknown name
    if not inplace:
        model = copy.deepcopy(model)
    report = Report(model)
    done: dict[int, nn.Module | None] = {}
    shared = _shared_modules(model)

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            if id(child) in done:  # a module shared by several parents: swap it everywhere
                if done[id(child)] is not None:
                    setattr(parent, name, done[id(child)])
                continue
            new, why = _swap(child, backend)
            done[id(child)] = new
            if new is not None:
                setattr(parent, name, new)
                report.add(path, type(child).__name__, True, _describe(new))
                continue
            if why is not None:
                report.add(path, type(child).__name__, False, why)
            walk(child, path)
        _fold_silu(parent, prefix, shared, report)

    _, why = _swap(model, backend)
    if why and why != "already optimized":
        report.add("", type(model).__name__, False, why)
    walk(model, "")
    if "transformers" in sys.modules:
        from fastarch.integrations import transformers as hf

        hf.optimize_model(model, report, backend)
    if "diffusers" in sys.modules:
        from fastarch.integrations import diffusers as df

        df.optimize_model(model, report, backend)
    if cuda_graphs:
        _graph_forward(model, report)
    return report


def _graph_forward(model: nn.Module, report: Report) -> None:
    """model.forward, as an instance attribute, becomes a GraphedCall of the one it had."""
    from fastarch.cuda_graphs import GraphedCall

    kind = type(model).__name__
    if isinstance(model.__dict__.get("forward"), GraphedCall):
        return
    if not torch.cuda.is_available():
        report.add("", kind, False, "cuda_graphs: no CUDA device here")
        return
    model.forward = GraphedCall(model.forward, model, f"{kind}.forward")
    report.add("", kind, True, "forward replayed from CUDA graphs where a call repeats (fastarch.cuda_graphs)")


def _ungraph_forward(model: nn.Module) -> None:
    from fastarch.cuda_graphs import GraphedCall

    graphed = model.__dict__.get("forward")
    if not isinstance(graphed, GraphedCall):
        return
    original = graphed.fn
    if getattr(original, "__self__", None) is model and getattr(original, "__func__", None) is type(model).forward:
        del model.__dict__["forward"]  # the class's forward, as before
    else:
        model.__dict__["forward"] = original  # an instance forward it had (an accelerate hook's)


def restore(model: nn.Module) -> nn.Module:
    """Undo ``optimize``: the original module objects go back where they were (holding the
    swapped modules' current parameters, the same objects unless reassigned since), and
    transformers' attention implementation and diffusers' processors are set back. Returns model."""
    done: set[int] = set()

    def walk(parent: nn.Module) -> None:
        if id(parent) in done:
            return
        done.add(id(parent))
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            original = child.__dict__.get(_ORIGINAL)
            if original is not None:
                for pname, p in child._parameters.items():
                    if pname in original._parameters:
                        original._parameters[pname] = p
                original.train(child.training)
                setattr(parent, name, original)
                walk(original)  # swaps made inside it before it was swapped (a GEGLU's projection)
            else:
                walk(child)

    walk(model)
    _ungraph_forward(model)
    if "transformers" in sys.modules:
        from fastarch.integrations import transformers as hf

        hf.restore_model(model)
    if "diffusers" in sys.modules:
        from fastarch.integrations import diffusers as df

        df.restore_model(model)
    return model
