"""LayerNorm and RMSNorm modules: subclasses of torch's, so they take the same constructor
arguments, hold the same parameters and state_dict keys, and pass isinstance checks. Each also
takes ``weight_offset`` (keyword): the rows are multiplied by weight + weight_offset (the ops'
weight_offset, added in fp32), and the weight starts at 1 - weight_offset, so that a new
module normalizes as torch's does (Gemma's norms: weight_offset=1.0, a weight of zeros)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastarch import ops
from fastarch.nn._source import check_source


def _flatten_normalized(x: Tensor, normalized_shape: tuple[int, ...], module: torch.nn.Module) -> Tensor:
    """x (..., *normalized_shape) as (..., prod(normalized_shape)): our kernels normalize the
    last dimension, and normalizing over k trailing dims is the same as over their product."""
    k = len(normalized_shape)
    if tuple(x.shape[x.dim() - k :]) != normalized_shape:
        raise ValueError(
            f"{type(module).__name__}: input must end with normalized_shape {normalized_shape}, got shape {tuple(x.shape)}"
        )
    return x if k == 1 else x.reshape(*x.shape[: x.dim() - k], math.prod(normalized_shape))


def _torch_runs_it(x: Tensor, module: torch.nn.Module) -> bool:
    """What the ops do not take and torch's module does, which runs it as torch would: parameters
    of another dtype than x (bf16 activations with fp32 weights: torch normalizes in fp32 and
    returns x's dtype), an empty normalized shape."""
    if math.prod(module.normalized_shape) == 0:
        return True
    params = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
    return isinstance(x, Tensor) and any(p.dtype != x.dtype for p in params)


def _flat(p: Tensor | None) -> Tensor | None:
    return p if p is None or p.dim() == 1 else p.reshape(-1)


class _WeightOffset:
    """weight_offset for a torch norm module subclass (mixed in before it)."""

    weight_offset = 0.0

    def __init__(self, *args, weight_offset: float = 0.0, **kwargs) -> None:
        if isinstance(weight_offset, bool) or not isinstance(weight_offset, (int, float)) or not math.isfinite(
                weight_offset):
            raise ValueError(f"{type(self).__name__}: weight_offset must be a finite float, got {weight_offset!r}")
        self.weight_offset = float(weight_offset)  # (before torch's __init__, which resets the parameters)
        super().__init__(*args, **kwargs)
        if self.weight_offset and self.weight is None:
            raise ValueError(f"{type(self).__name__}: weight_offset={weight_offset} needs elementwise_affine=True")

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.weight_offset and self.weight is not None:
            with torch.no_grad():
                self.weight.fill_(1.0 - self.weight_offset)

    def _torch_weight(self) -> Tensor | None:
        """The weight torch's own forward multiplies by: weight + weight_offset, in fp32 (or
        the weight's wider dtype) as the ops add it."""
        w = self.weight
        if w is None or not self.weight_offset:
            return w
        return w.to(torch.promote_types(w.dtype, torch.float32)) + self.weight_offset

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return f"{text}, weight_offset={self.weight_offset}" if self.weight_offset else text


class LayerNorm(_WeightOffset, torch.nn.LayerNorm):
    """torch.nn.LayerNorm running fastarch.ops.layer_norm (any backend; see fastarch.backend)."""

    def forward(self, x: Tensor) -> Tensor:
        if _torch_runs_it(x, self):
            return torch.nn.functional.layer_norm(x, self.normalized_shape, self._torch_weight(), self.bias, self.eps)
        flat = _flatten_normalized(x, tuple(self.normalized_shape), self)
        y = ops.layer_norm(flat, _flat(self.weight), _flat(self.bias), self.eps, weight_offset=self.weight_offset)
        return y if flat is x else y.view(x.shape)  # (the ops keep x's shape: a view only for k > 1 dims)

    @classmethod
    def from_torch(cls, module: torch.nn.LayerNorm) -> LayerNorm:
        """A fastarch LayerNorm sharing ``module``'s parameters (no copy)."""
        check_source(cls, module, torch.nn.LayerNorm)
        new = cls(
            module.normalized_shape,
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            bias=module.bias is not None,
            device="meta",
        )
        new.weight, new.bias = module.weight, module.bias
        return new.train(module.training)


class RMSNorm(_WeightOffset, torch.nn.RMSNorm):
    """torch.nn.RMSNorm running fastarch.ops.rms_norm (eps=None: finfo(x.dtype).eps, as torch)."""

    def forward(self, x: Tensor) -> Tensor:
        if _torch_runs_it(x, self):
            return torch.nn.functional.rms_norm(x, self.normalized_shape, self._torch_weight(), self.eps)
        flat = _flatten_normalized(x, tuple(self.normalized_shape), self)
        y = ops.rms_norm(flat, _flat(self.weight), self.eps, weight_offset=self.weight_offset)
        return y if flat is x else y.view(x.shape)

    @classmethod
    def from_torch(cls, module: torch.nn.RMSNorm) -> RMSNorm:
        """A fastarch RMSNorm sharing ``module``'s parameters (no copy)."""
        check_source(cls, module, torch.nn.RMSNorm)
        new = cls(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine, device="meta")
        new.weight = module.weight
        return new.train(module.training)
