"""fastarch in diffusers models: an attention processor and fused ResNet blocks::

    from fastarch.integrations.diffusers import FastarchAttnProcessor
    unet.set_attn_processor(FastarchAttnProcessor())     # or fastarch.optimize(unet)

FastarchAttnProcessor computes what diffusers' AttnProcessor2_0 computes for its Attention
module (self- and cross-attention, the spatial and group norms, q/k norms, the additive
attention mask diffusers prepares, the residual and output rescaling) with the attention
itself on fastarch.ops.attention where a fastarch kernel backend can run it (without a mask,
its kernel called directly: fastarch.override.attention_direct), and hands every other call to
the processor it replaced (or AttnProcessor2_0). FastarchAttention is diffusers' Attention
calling such a processor without inspecting its signature first (optimize changes a plain
Attention's class to it).

FastarchResnetBlock2D is diffusers' ResnetBlock2D with each GroupNorm, its time-embedding
scale/shift and the SiLU after it as one fastarch.ops.group_norm (and, once optimize has made
conv2 a fastarch.nn.Conv2d, the residual added inside that convolution); fastarch.optimize turns a
plain ResnetBlock2D into one by changing its class (the same object, parameters and hooks), and
fastarch.restore changes it back. FastarchGEGLU takes the place of diffusers' GEGLU (the
transformer blocks' feed-forward gate) on fastarch.ops.geglu_packed, sharing its projection.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from torch import Tensor, nn
from torch.nn import functional as F

from fastarch import nn as fnn
from fastarch import ops
from fastarch.optimize import _ORIGINAL, _hooks, call_hooked, group_norm_backend, group_norm_direct
from fastarch.override import _sdpa_backend, attention_direct, backend_for


class FastarchAttnProcessor:
    """A diffusers attention processor on fastarch. previous: the processor to run where
    fastarch cannot (and for fastarch.restore); default AttnProcessor2_0. backend: force a
    fastarch backend (default automatic)."""

    def __init__(self, previous: object | None = None, backend: str | None = None) -> None:
        self.previous = previous if previous is not None else AttnProcessor2_0()
        self.backend = backend

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        if args or kwargs or unsupported_reason(attn):
            return self.previous(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image = hidden_states.dim() == 4
        if image:  # (B, C, H, W) -> (B, H * W, C)
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, source = context.shape[:2]
        if attention_mask is not None:
            # (B or B * heads, 1 or Sq, Sk) additive -> (B, heads, 1 or Sq, Sk), as diffusers prepares it
            attention_mask = attn.prepare_attention_mask(attention_mask, source, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = attention_direct(q, k, v, None, self.backend) if attention_mask is None else None
        if out is None:
            chosen = _sdpa_backend(q, k, v, attention_mask, 0.0, False, None, False, self.backend)
            if chosen:
                out = ops.attention(q, k, v, attn_mask=attention_mask, backend=chosen)
            else:
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
        projection, dropout = attn.to_out
        hidden_states = _dropout(dropout, projection(hidden_states))
        if image:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        factor = attn.rescale_output_factor
        return hidden_states if factor == 1 else hidden_states / factor  # (x / 1 is x, exactly)


class FastarchAttention(Attention):
    """diffusers' Attention whose forward hands a FastarchAttnProcessor its call directly.
    Attention.forward reads its processor's signature with inspect at every call (to drop the
    keyword arguments the processor does not take): ~50 us of a small UNet attention block's
    ~215 on an AMD EPYC Zen 4 (bench/dropin_host_time.py), more than its kernels on a GPU. Any other processor, and a call with
    cross_attention_kwargs, runs Attention.forward. fastarch.optimize changes a plain
    Attention's class to this one (the same object, parameters and hooks); restore changes it
    back."""

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                attention_mask: Tensor | None = None, **cross_attention_kwargs) -> Tensor:
        processor = self.processor
        if cross_attention_kwargs or type(processor) is not FastarchAttnProcessor:
            return super().forward(hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)
        return processor(self, hidden_states, encoder_hidden_states, attention_mask)


def _dropout(module: nn.Module, x: Tensor) -> Tensor:
    """module(x) for a block's dropout, without the call where it is a plain nn.Dropout in eval
    mode and unhooked (it returns its input: a module call's Python for nothing)."""
    if module.training or type(module) is not nn.Dropout or call_hooked((module,)):
        return module(x)
    return x


def unsupported_reason(attn: Attention) -> str | None:
    """Why FastarchAttnProcessor would hand ``attn``'s calls to the previous processor, or None."""
    # (asked at every call: the submodules read from _modules, not through Module.__getattr__)
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        return "added key/value projections (AttnAddedKVProcessor's layout)"
    modules = attn._modules
    to_out = modules.get("to_out")
    if to_out is None or len(to_out) != 2:
        return "no (projection, dropout) output"
    head_dim = modules["to_k"].out_features // attn.heads
    if not math.isclose(attn.scale, head_dim**-0.5, rel_tol=1e-6):
        # AttnProcessor2_0 ignores attn.scale and AttnProcessor applies it: leave that to diffusers
        return f"attn.scale {attn.scale} is not 1/sqrt(head_dim)"
    return None


_REPLACEABLE = (AttnProcessor2_0, AttnProcessor)


class FastarchResnetBlock2D(ResnetBlock2D):
    """diffusers' ResnetBlock2D with norm1 + SiLU and norm2 (+ time scale/shift) + SiLU each
    one fastarch.ops.group_norm, and no division by an output_scale_factor of 1. Computes
    what ResnetBlock2D.forward computes; runs that forward where fastarch cannot."""

    _fastarch_backend: str | None = None

    def forward(self, input_tensor: Tensor, temb: Tensor | None, *args, **kwargs) -> Tensor:
        if args or kwargs:
            return super().forward(input_tensor, temb, *args, **kwargs)
        backend = self._fastarch_backend
        n1, n2 = self.norm1, self.norm2
        hidden = group_norm_direct(input_tensor, n1, None, None, True, backend)
        if hidden is None:
            chosen = group_norm_backend(input_tensor, n1, backend)
            if not chosen:
                return super().forward(input_tensor, temb)
            hidden = ops.group_norm(input_tensor, n1.num_groups, n1.weight, n1.bias, n1.eps, activation="silu",
                                    backend=chosen)
        if self.upsample is not None:
            if hidden.shape[0] >= 64:  # as diffusers: its nearest upsampling fails on large channels-last batches
                input_tensor, hidden = input_tensor.contiguous(), hidden.contiguous()
            input_tensor, hidden = self.upsample(input_tensor), self.upsample(hidden)
        elif self.downsample is not None:
            input_tensor, hidden = self.downsample(input_tensor), self.downsample(hidden)
        hidden = self.conv1(hidden)
        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = F.silu(temb)  # (the block's nonlinearity: a plain SiLU without hooks)
            temb = self.time_emb_proj(temb)
        scale = shift = None
        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
            scale, shift = temb.chunk(2, dim=1)
        elif temb is not None:
            hidden = hidden + temb[:, :, None, None]
        if (normed := group_norm_direct(hidden, n2, scale, shift, True, backend)) is not None:
            hidden = normed
        elif not (chosen := group_norm_backend(hidden, n2, backend)) or (
                scale is not None and (scale.dim() != 2 or scale.dtype != hidden.dtype)):
            hidden = n2(hidden)
            if scale is not None:
                hidden = hidden * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
            hidden = self.nonlinearity(hidden)
        else:
            hidden = ops.group_norm(hidden, n2.num_groups, n2.weight, n2.bias, n2.eps, scale=scale, shift=shift,
                                    activation="silu", backend=chosen)
        hidden = _dropout(self.dropout, hidden)
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor.contiguous() if self.training else input_tensor)
        if self.output_scale_factor == 1 and isinstance(self.conv2, fnn.Conv2d):
            return self.conv2(hidden, add=input_tensor)  # the residual added inside the convolution
        out = input_tensor + self.conv2(hidden)
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class FastarchGEGLU(fnn.GEGLU):
    """fastarch.nn.GEGLU in place of diffusers' GEGLU, sharing its ``proj``: diffusers' own
    arithmetic (``up * gelu(gate)``) where no fastarch kernel backend runs the projection's
    dtype and device, and the original module for the deprecated extra arguments."""

    _fastarch_backend: str | None = None

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        if args or kwargs:
            return self.__dict__[_ORIGINAL](hidden_states, *args, **kwargs)
        h = self.proj(hidden_states)
        chosen = (backend_for("geglu_packed", (h.device.type, h.dtype, 1, 1), self._fastarch_backend)
                  if type(h) is Tensor else "")
        if not chosen:
            up, gate = h.chunk(2, dim=-1)
            return up * torch.nn.functional.gelu(gate)
        return ops.geglu_packed(h, backend=chosen)


def _swap_geglu(model: torch.nn.Module, path: str, module: GEGLU, report, backend: str | None) -> None:
    if _hooks(module):
        report.add(path, "GEGLU", False, "has hooks (they would not run on a new module)")
        return
    new = FastarchGEGLU.from_diffusers(module)
    new._fastarch_backend = backend
    new.__dict__[_ORIGINAL] = module
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, new)
    report.add(path, "GEGLU", True, "-> FastarchGEGLU (geglu_packed on the projection)")


def resnet_unfused_reason(block: ResnetBlock2D) -> str | None:
    """Why optimize leaves a ResnetBlock2D as it is, or None."""
    if type(block) is not ResnetBlock2D:
        return f"a subclass of ResnetBlock2D ({type(block).__name__}: its behaviour may differ)"
    if type(block.nonlinearity) is not nn.SiLU:
        return f"nonlinearity {type(block.nonlinearity).__name__} (fastarch fuses SiLU)"
    for name in ("norm1", "norm2"):
        norm = getattr(block, name)
        if not isinstance(norm, nn.GroupNorm) or not norm.affine:
            return f"{name} is not an affine GroupNorm"
    if block.time_embedding_norm not in ("default", "scale_shift"):
        return f"time_embedding_norm {block.time_embedding_norm!r}"
    hooked = [n for n in ("", "norm1", "norm2", "nonlinearity") if _hooks(block.get_submodule(n))]
    if hooked:
        return f"hooks on {', '.join(n or 'the block' for n in hooked)} (the fused forward would skip them)"
    return None


def optimize_model(model: torch.nn.Module, report, backend: str | None) -> None:
    """fastarch.optimize's diffusers part: FastarchAttnProcessor on every Attention module whose
    processor is diffusers' default (AttnProcessor2_0 or AttnProcessor), a plain Attention
    made a FastarchAttention, and every plain
    ResnetBlock2D made a FastarchResnetBlock2D, every diffusers GEGLU a FastarchGEGLU."""
    for path, m in list(model.named_modules()):
        if type(m) is GEGLU and path:
            _swap_geglu(model, path, m, report, backend)
            continue
        if isinstance(m, ResnetBlock2D):
            if isinstance(m, FastarchResnetBlock2D):
                report.add(path, "ResnetBlock2D", True, "already FastarchResnetBlock2D")
            elif why := resnet_unfused_reason(m):
                report.add(path, "ResnetBlock2D", False, why)
            else:
                m.__class__ = FastarchResnetBlock2D
                m._fastarch_backend = backend
                report.add(path, "ResnetBlock2D", True, "-> FastarchResnetBlock2D (GroupNorm + scale/shift + SiLU fused)")
            continue
        if not isinstance(m, Attention):
            continue
        processor = m.processor
        if isinstance(processor, FastarchAttnProcessor):
            report.add(path, "Attention", True, "processor already FastarchAttnProcessor")
        elif type(processor) not in _REPLACEABLE:
            report.add(path, "Attention", False, f"processor {type(processor).__name__} is not diffusers' default")
        elif why := unsupported_reason(m):
            report.add(path, "Attention", False, why)
        else:
            m.set_processor(FastarchAttnProcessor(processor, backend))
            if type(m) is Attention:  # (a subclass keeps its own forward)
                m.__class__ = FastarchAttention
            report.add(path, "Attention", True, f"processor {type(processor).__name__} -> FastarchAttnProcessor")


def restore_model(model: torch.nn.Module) -> None:
    """Undo optimize_model: each Attention module gets back its class and the processor object
    it had, and each FastarchResnetBlock2D is a ResnetBlock2D again."""
    for m in model.modules():
        if type(m) is FastarchResnetBlock2D:
            m.__class__ = ResnetBlock2D
            m.__dict__.pop("_fastarch_backend", None)
        if type(m) is FastarchAttention:
            m.__class__ = Attention
        if isinstance(m, Attention) and isinstance(m.processor, FastarchAttnProcessor):
            m.set_processor(m.processor.previous)
