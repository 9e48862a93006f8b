"""The pieces of the diffusion UNet (fastarch/models/unet2d.py): ResNet blocks with a time
embedding, down/up sampling, spatial self-attention, cross-attention transformer blocks, and
the down / mid / up stages that hold them. Module and parameter names are diffusers' own
(``resnets.0.norm1.weight``, ``attentions.0.to_q.weight``, ``transformer_blocks.0.ff.net.0.proj``),
so a checkpoint's tensor names are the model's, and save_pretrained writes them back unchanged.

Kernels: every GroupNorm that diffusers follows with a SiLU is one fused group_norm(...,
activation="silu"), the "scale_shift" time conditioning inside it (scale/shift); attention is
fastarch.ops.attention; the transformer's LayerNorms are fastarch.ops.layer_norm, each residual
add fused into the norm after it; the feed-forward's GELU gate is fastarch.nn.GEGLU (one
geglu_packed on the projection).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastarch import ops
from fastarch.nn import GEGLU, Conv2d, Linear
from fastarch.models.layers import LayerNorm


@dataclass(frozen=True)
class ResnetSpec:
    """What every ResNet block of a UNet shares."""

    temb_channels: int
    groups: int
    eps: float
    dropout: float
    scale_shift: bool  # resnet_time_scale_shift == "scale_shift"
    output_scale_factor: float = 1.0


@dataclass(frozen=True)
class StageSpec:
    """One down or up stage (or the mid block), as diffusers' constructors compute it."""

    kind: str  # "plain", "attn" (spatial self-attention) or "cross" (transformer with cross-attention)
    in_channels: int
    out_channels: int
    layers: int
    resample: str | None  # None, "conv" or "resnet" (down: avg-pool in a ResNet; up: nearest in a ResNet)
    prev_channels: int = 0  # up stages: the channels coming from below
    downsample_padding: int = 1
    head_dim: int = 0  # "attn": channels per head
    attn_groups: int | None = None  # "attn": the attention's GroupNorm groups (None: no norm)
    heads: int = 0  # "cross"
    cross_attention_dim: int = 0  # "cross"
    transformer_layers: int = 1  # "cross"
    linear_projection: bool = False  # "cross": proj_in/out Linear (else 1x1 Conv2d)


class GroupNorm(nn.Module):
    """GroupNorm's parameters (named weight/bias as torch.nn.GroupNorm); forward runs the fused
    group_norm with an optional time scale/shift and SiLU."""

    def __init__(self, num_groups: int, channels: int, eps: float):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, *, scale: Tensor | None = None, shift: Tensor | None = None,
                activation: str | None = None) -> Tensor:
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, scale=scale, shift=shift,
                                 activation=activation)


class Downsample2D(nn.Module):
    """A stride-2 3x3 conv; padding 0 pads right and bottom by one, as diffusers does."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to the skip's size, for odd sizes) then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        return self.conv(_upsample_nearest(x, size))


def _upsample_nearest(x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    if size is None:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.interpolate(x, size=size, mode="nearest")


class ResnetBlock2D(nn.Module):
    """GroupNorm+SiLU, conv, + time embedding, GroupNorm(+scale/shift)+SiLU, dropout, conv, + the
    (1x1-conv'd when the width changes) input. up/down: the resampling (nearest 2x / 2x2
    average) of both paths right after the first norm, as in diffusers' ResnetBlock2D(up=, down=).

    forward(x, temb_act): temb_act is SiLU(time embedding), (B, temb_channels), computed once per
    UNet forward (diffusers applies that SiLU in every block)."""

    def __init__(self, in_channels: int, out_channels: int, spec: ResnetSpec, *, up: bool = False, down: bool = False):
        super().__init__()
        self.spec, self.up, self.down = spec, up, down
        self.norm1 = GroupNorm(spec.groups, in_channels, spec.eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = Linear(spec.temb_channels, out_channels * (2 if spec.scale_shift else 1))
        self.norm2 = GroupNorm(spec.groups, out_channels, spec.eps)
        self.dropout = nn.Dropout(spec.dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb_act: Tensor) -> Tensor:
        h = self.norm1(x, activation="silu")
        if self.up:
            x, h = _upsample_nearest(x), _upsample_nearest(h)
        elif self.down:
            x, h = F.avg_pool2d(x, 2), F.avg_pool2d(h, 2)
        t = self.time_emb_proj(temb_act)
        h = self.conv1(h)
        if self.spec.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h, scale=scale, shift=shift, activation="silu")
        else:
            h = self.norm2(h + t[:, :, None, None], activation="silu")
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        h = self.conv2(self.dropout(h), add=x)  # the residual add fused into conv2
        return h if self.spec.output_scale_factor == 1.0 else h / self.spec.output_scale_factor


class SpatialSelfAttention(nn.Module):
    """diffusers' Attention as the UNet's attention blocks use it: an optional GroupNorm, q/k/v
    over the H*W positions, out projection, + the input, / rescale_output_factor."""

    def __init__(self, channels: int, head_dim: int, groups: int | None, eps: float, rescale: float = 1.0):
        super().__init__()
        self.heads, self.rescale = channels // head_dim, rescale
        inner = self.heads * head_dim
        self.group_norm = GroupNorm(groups, channels, eps) if groups is not None else None
        self.to_q = Linear(channels, inner)
        self.to_k = Linear(channels, inner)
        self.to_v = Linear(channels, inner)
        self.to_out = nn.ModuleList([Linear(inner, channels)])

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x) if self.group_norm is not None else x
        h = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(h).view(B, H * W, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        y = ops.attention(q, k, v).transpose(1, 2).reshape(B, H * W, -1)
        y = self.to_out[0](y).transpose(1, 2).reshape(B, C, H, W)
        y = y + x
        return y if self.rescale == 1.0 else y / self.rescale


class Attention(nn.Module):
    """Multi-head attention of a transformer block: self (context None) or cross (context
    (B, S, cross_dim)); no q/k/v bias (diffusers' attention_bias=False), an out bias."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = Linear(dim, inner, bias=False)
        self.to_k = Linear(context_dim or dim, inner, bias=False)
        self.to_v = Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([Linear(inner, dim)])

    def forward(self, x: Tensor, context: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        B, S, _ = x.shape
        context = x if context is None else context
        q = self.to_q(x).view(B, S, self.heads, -1).transpose(1, 2)
        k = self.to_k(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        y = ops.attention(q, k, v, key_padding_mask=key_padding_mask)
        return self.to_out[0](y.transpose(1, 2).reshape(B, S, -1))


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention, GEGLU feed-forward (4x), each with a residual.
    forward(x, residual) keeps the residual stream apart so each add fuses into the next norm;
    it returns (feed-forward output, residual before it is added)."""

    def __init__(self, dim: int, heads: int, head_dim: int, cross_attention_dim: int):
        super().__init__()
        self.norm1 = LayerNorm(dim, 1e-5)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = LayerNorm(dim, 1e-5)
        self.attn2 = Attention(dim, heads, head_dim, cross_attention_dim)
        self.norm3 = LayerNorm(dim, 1e-5)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(0.0), Linear(4 * dim, dim)])

    def forward(self, x: Tensor, residual: Tensor | None, context: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if residual is None:
            h, residual = self.norm1(x), x
        else:
            h, residual = self.norm1.add(x, residual)
        h, residual = self.norm2.add(self.attn1(h), residual)
        h, residual = self.norm3.add(self.attn2(h, context, mask), residual)
        net = self.ff.net
        return net[2](net[1](net[0](h))), residual


class Transformer2D(nn.Module):
    """diffusers' Transformer2DModel on continuous inputs: GroupNorm (eps 1e-6), proj_in (1x1 conv
    or Linear: the same map over the H*W positions), transformer blocks, proj_out, + the input."""

    def __init__(self, channels: int, heads: int, layers: int, cross_attention_dim: int, groups: int, linear: bool):
        super().__init__()
        self.linear = linear
        self.norm = GroupNorm(groups, channels, 1e-6)
        self.proj_in = Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, cross_attention_dim) for _ in range(layers)
        )
        self.proj_out = Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        h = ops.linear(h, self.proj_in.weight.view(C, C), self.proj_in.bias)  # a 1x1 conv is this matmul
        residual = None
        for block in self.transformer_blocks:
            h, residual = block(h, residual, context, mask)
        h = h + residual if residual is not None else h
        h = ops.linear(h, self.proj_out.weight.view(C, C), self.proj_out.bias)
        return h.view(B, H, W, C).permute(0, 3, 1, 2) + x


class _Stage(nn.Module):
    """What down, mid and up stages share: ResNets, optional attentions after them."""

    def _attention(self, s: StageSpec, r: ResnetSpec, channels: int) -> nn.Module:
        if s.kind == "attn":
            return SpatialSelfAttention(channels, s.head_dim, s.attn_groups, r.eps, r.output_scale_factor)
        return Transformer2D(channels, s.heads, s.transformer_layers, s.cross_attention_dim, r.groups, s.linear_projection)

    def _attend(self, i: int, h: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        if self.kind == "plain":
            return h
        if self.kind == "attn":
            return self.attentions[i](h)
        return self.attentions[i](h, context, mask)


class DownStage(_Stage):
    """DownBlock2D / AttnDownBlock2D / CrossAttnDownBlock2D: forward -> (h, the skips it adds)."""

    def __init__(self, s: StageSpec, r: ResnetSpec):
        super().__init__()
        self.kind, self.resample = s.kind, s.resample
        self.resnets = nn.ModuleList(
            ResnetBlock2D(s.in_channels if i == 0 else s.out_channels, s.out_channels, r) for i in range(s.layers)
        )
        if s.kind != "plain":
            self.attentions = nn.ModuleList(self._attention(s, r, s.out_channels) for _ in range(s.layers))
        if s.resample == "conv":
            self.downsamplers = nn.ModuleList([Downsample2D(s.out_channels, s.downsample_padding)])
        elif s.resample == "resnet":
            self.downsamplers = nn.ModuleList([ResnetBlock2D(s.out_channels, s.out_channels, r, down=True)])

    def forward(self, h: Tensor, temb_act: Tensor, context: Tensor | None, mask: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = self._attend(i, resnet(h, temb_act), context, mask)
            skips.append(h)
        if self.resample == "conv":
            h = self.downsamplers[0](h)
            skips.append(h)
        elif self.resample == "resnet":
            h = self.downsamplers[0](h, temb_act)
            skips.append(h)
        return h, skips


class MidStage(_Stage):
    """UNetMidBlock2D / UNetMidBlock2DCrossAttn: a ResNet, then (attention, ResNet) pairs."""

    def __init__(self, s: StageSpec, r: ResnetSpec, add_attention: bool = True):
        super().__init__()
        self.kind = s.kind if add_attention else "plain"
        C = s.in_channels
        self.resnets = nn.ModuleList(ResnetBlock2D(C, C, r) for _ in range(s.layers + 1))
        if self.kind != "plain":
            self.attentions = nn.ModuleList(self._attention(s, r, C) for _ in range(s.layers))

    def forward(self, h: Tensor, temb_act: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        h = self.resnets[0](h, temb_act)
        for i, resnet in enumerate(self.resnets[1:]):
            h = resnet(self._attend(i, h, context, mask), temb_act)
        return h


class UpStage(_Stage):
    """UpBlock2D / AttnUpBlock2D / CrossAttnUpBlock2D: each ResNet takes h concatenated with the
    last skip left; forward(h, skips, ...) pops its skips off the list."""

    def __init__(self, s: StageSpec, r: ResnetSpec):
        super().__init__()
        self.kind, self.resample = s.kind, s.resample
        resnets = []
        for i in range(s.layers):
            skip = s.in_channels if i == s.layers - 1 else s.out_channels
            below = s.prev_channels if i == 0 else s.out_channels
            resnets.append(ResnetBlock2D(below + skip, s.out_channels, r))
        self.resnets = nn.ModuleList(resnets)
        if s.kind != "plain":
            self.attentions = nn.ModuleList(self._attention(s, r, s.out_channels) for _ in range(s.layers))
        if s.resample == "conv":
            self.upsamplers = nn.ModuleList([Upsample2D(s.out_channels)])
        elif s.resample == "resnet":
            self.upsamplers = nn.ModuleList([ResnetBlock2D(s.out_channels, s.out_channels, r, up=True)])

    def forward(self, h: Tensor, skips: list[Tensor], temb_act: Tensor, context: Tensor | None, mask: Tensor | None,
                size: tuple[int, int] | None = None) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._attend(i, resnet(h, temb_act), context, mask)
        if self.resample == "conv":
            h = self.upsamplers[0](h, size)
        elif self.resample == "resnet":
            h = self.upsamplers[0](h, temb_act)
        return h
