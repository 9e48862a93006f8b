"""The diffusion UNet (Ho et al., 2020; Rombach et al., 2022) on fastarch's kernels, from
diffusers checkpoints of ``UNet2DModel`` (unconditional or class-conditional, e.g.
google/ddpm-cifar10-32) and ``UNet2DConditionModel`` (cross-attention to a text encoder's
states, e.g. Stable Diffusion's UNet).

    unet = UNet2D.from_pretrained("path/to/unet")          # config.json + diffusion_pytorch_model.safetensors
    eps = unet(noisy, t, class_labels=None, encoder_hidden_states=None)     # (B, out_channels, H, W)
    unet.save_pretrained("out")                             # diffusers' layout: diffusers loads it back

A sinusoidal time embedding (flip_sin_to_cos, freq_shift) goes through a 2-layer MLP, plus an
optional class embedding; conv_in; down stages (ResNets, optional self- or cross-attention,
a downsampler), a mid stage, up stages (each ResNet reads a skip from the way down), then a
GroupNorm+SiLU and conv_out. The blocks are in fastarch/models/unet_blocks.py.

Not built (refused with an error naming the config field): other block types (skip, K-,
simple-cross-attention, encoder/decoder blocks), act_fn other than silu/swish, time embeddings
other than positional, class_embed_type other than None, addition embeddings, encoder_hid_dim
projections, time conditioning projections, dual or only cross-attention, gated attention,
class_embeddings_concat, cross_attention_norm, reverse_transformer_layers_per_block.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastarch import cuda_graphs
from fastarch.models.loading import CheckpointError, load_into, read_config
from fastarch.nn import Conv2d, Linear
from fastarch.models.unet_blocks import (
    DownStage,
    GroupNorm,
    MidStage,
    ResnetSpec,
    StageSpec,
    UpStage,
)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_NAMES = ("UNet2DModel", "UNet2DConditionModel")

# Defaults of each diffusers class where they differ (the rest are shared below).
_DEFAULTS = {
    "UNet2DModel": dict(
        in_channels=3, out_channels=3, down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
        mid_block_type="UNetMidBlock2D", up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[224, 448, 672, 896], attention_head_dim=8,
    ),
    "UNet2DConditionModel": dict(
        in_channels=4, out_channels=4, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn", up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, cross_attention_dim=1280,
    ),
}
_DOWN = {"DownBlock2D": "plain", "AttnDownBlock2D": "attn", "CrossAttnDownBlock2D": "cross"}
_UP = {"UpBlock2D": "plain", "AttnUpBlock2D": "attn", "CrossAttnUpBlock2D": "cross"}
_MID = {"UNet2DModel": {"UNetMidBlock2D": "attn"}, "UNet2DConditionModel": {"UNetMidBlock2DCrossAttn": "cross"}}

# Fields that must hold exactly these values (diffusers' defaults) for the model we build.
_FIXED = {
    "time_embedding_type": ("positional",),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "dual_cross_attention": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "num_attention_heads": (None,),
    "projection_class_embeddings_input_dim": (None,),
}


def _per_block(config: dict, name: str, n: int, kinds: tuple[type, ...] = (int,)) -> list:
    value = config[name]
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise CheckpointError(f"config.json: {name} {value!r} must have one entry per down block ({n})")
        return list(value)
    if value is None or isinstance(value, kinds):
        return [value] * n
    raise CheckpointError(f"config.json: {name} {value!r} is neither a number nor a list")


@dataclass(frozen=True)
class UNet2DConfig:
    """Every hyperparameter read from a diffusers config.json, with the per-block lists and
    stage specs diffusers' constructors derive from it. ``raw`` is the config as given (plus
    the class's defaults), written back by save_pretrained."""

    class_name: str
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    center_input_sample: bool
    flip_sin_to_cos: bool
    freq_shift: float
    time_embed_dim: int
    num_class_embeds: int | None
    cross_attention_dim: int | None  # of the first cross-attention stage (None: no cross-attention)
    norm_num_groups: int
    norm_eps: float
    resnet: ResnetSpec
    down: tuple[StageSpec, ...]
    mid: StageSpec | None
    add_attention: bool
    up: tuple[StageSpec, ...]
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, config: dict) -> UNet2DConfig:
        class_name = config.get("_class_name", "UNet2DModel")
        if class_name not in CLASS_NAMES:
            raise CheckpointError(f"config.json: _class_name {class_name!r} is not built (one of {', '.join(CLASS_NAMES)})")
        c = {**_SHARED_DEFAULTS, **_DEFAULTS[class_name], **{k: v for k, v in config.items()}}
        c["_class_name"] = class_name
        for name, allowed in _FIXED.items():
            if c.get(name, allowed[0]) not in allowed:
                raise CheckpointError(f"config.json: {name} {c[name]!r} is not built (only {allowed[0]!r} is)")
        if c["act_fn"] not in ("silu", "swish"):
            raise CheckpointError(f"config.json: act_fn {c['act_fn']!r} is not built (only 'silu')")
        if c["resnet_time_scale_shift"] not in ("default", "scale_shift"):
            raise CheckpointError(
                f"config.json: resnet_time_scale_shift {c['resnet_time_scale_shift']!r} is not built ('default' or 'scale_shift')"
            )
        if c["norm_num_groups"] is None:
            raise CheckpointError("config.json: norm_num_groups None is not built (a number of groups is)")
        for name in ("downsample_type", "upsample_type"):
            if c[name] not in ("conv", "resnet"):
                raise CheckpointError(f"config.json: {name} {c[name]!r} is not built ('conv' or 'resnet')")
        down_types = [t.removeprefix("UNetRes") for t in c["down_block_types"]]
        up_types = [t.removeprefix("UNetRes") for t in c["up_block_types"]]
        for t in down_types:
            if t not in _DOWN:
                raise CheckpointError(f"config.json: down_block_types holds {t!r}, which is not built (one of {', '.join(_DOWN)})")
        for t in up_types:
            if t not in _UP:
                raise CheckpointError(f"config.json: up_block_types holds {t!r}, which is not built (one of {', '.join(_UP)})")
        mid_type = c["mid_block_type"]
        if mid_type is not None and mid_type not in _MID[class_name]:
            raise CheckpointError(
                f"config.json: mid_block_type {mid_type!r} is not built for {class_name} (one of {', '.join(_MID[class_name])}, or null)"
            )
        n = len(down_types)
        boc = list(c["block_out_channels"])
        if len(up_types) != n or len(boc) != n or n == 0:
            raise CheckpointError(
                f"config.json: down_block_types ({n}), up_block_types ({len(up_types)}) and block_out_channels ({len(boc)})"
                " must be equally long and not empty"
            )
        groups = c["norm_num_groups"]
        for ch in boc:
            if ch % groups:
                raise CheckpointError(f"config.json: block_out_channels {boc} are not all multiples of norm_num_groups {groups}")
        conditional = class_name == "UNet2DConditionModel"
        layers = _per_block(c, "layers_per_block", n)
        if not conditional and len(set(layers)) != 1:
            raise CheckpointError(f"config.json: layers_per_block {c['layers_per_block']!r}: UNet2DModel takes one int")
        heads_or_dims = _per_block(c, "attention_head_dim", n)
        if not conditional and isinstance(c["attention_head_dim"], (list, tuple)):
            raise CheckpointError(f"config.json: attention_head_dim {c['attention_head_dim']!r}: UNet2DModel takes one int or null")
        cross_dims = _per_block(c, "cross_attention_dim", n) if conditional else [None] * n
        if len(set(cross_dims)) > 1:  # one encoder_hidden_states tensor feeds every stage
            raise CheckpointError(f"config.json: cross_attention_dim {c['cross_attention_dim']!r} is not built (one width for all blocks)")
        tlayers = _per_block(c, "transformer_layers_per_block", n) if conditional else [1] * n
        for i, t in enumerate(tlayers):
            if not isinstance(t, int):
                raise CheckpointError(f"config.json: transformer_layers_per_block {c['transformer_layers_per_block']!r} is not built (ints only)")
        linear = bool(c.get("use_linear_projection", False))
        time_embed_dim = c["time_embedding_dim"] or boc[0] * 4
        resnet = ResnetSpec(time_embed_dim, groups, c["norm_eps"], c["dropout"], c["resnet_time_scale_shift"] == "scale_shift")

        def stage(kind_of: dict, t: str, i: int, up_index: int | None = None, **kw) -> StageSpec:
            # the block's index into the per-block lists: diffusers reverses them for the up
            # stages, except attention_head_dim (its up loop reads attention_head_dim[i])
            j = i if up_index is None else n - 1 - up_index
            kind = kind_of[t]
            out = kw["out_channels"]
            extra = {}
            if kind == "attn":
                head_dim = heads_or_dims[i] if heads_or_dims[i] is not None else out
                extra = dict(head_dim=head_dim, attn_groups=groups)
            elif kind == "cross":
                if cross_dims[j] is None:
                    raise CheckpointError(f"config.json: {t} needs cross_attention_dim")
                heads = heads_or_dims[j]
                if not heads or out % heads:
                    raise CheckpointError(f"config.json: attention_head_dim {heads!r} (heads, in diffusers' naming) does not divide {out} channels")
                extra = dict(heads=heads, cross_attention_dim=cross_dims[j], transformer_layers=tlayers[j], linear_projection=linear)
            return StageSpec(kind, **kw, **extra)

        down = []
        for i, t in enumerate(down_types):
            last = i == n - 1
            resample = None if last else ("conv" if t != "AttnDownBlock2D" or conditional else c["downsample_type"])
            down.append(stage(_DOWN, t, i, in_channels=boc[max(i - 1, 0)], out_channels=boc[i], layers=layers[i],
                              resample=resample, downsample_padding=c["downsample_padding"]))
        rev = boc[::-1]
        up = []
        for i, t in enumerate(up_types):
            last = i == n - 1
            resample = None if last else ("conv" if t != "AttnUpBlock2D" or conditional else c["upsample_type"])
            up.append(stage(_UP, t, i, up_index=i, in_channels=rev[min(i + 1, n - 1)], out_channels=rev[i],
                            prev_channels=rev[max(i - 1, 0)], layers=layers[n - 1 - i] + 1, resample=resample))
        mid = None
        if mid_type is not None:
            if conditional:
                mid = stage(_MID[class_name], mid_type, n - 1, in_channels=boc[-1], out_channels=boc[-1], layers=1, resample=None)
            else:
                head_dim = c["attention_head_dim"] if c["attention_head_dim"] is not None else boc[-1]
                attn_groups = c["attn_norm_num_groups"]
                if attn_groups is None and c["resnet_time_scale_shift"] == "default":
                    attn_groups = groups
                mid = StageSpec("attn", boc[-1], boc[-1], 1, None, head_dim=head_dim, attn_groups=attn_groups)
        n_class = c.get("num_class_embeds")
        return cls(
            class_name=class_name, in_channels=c["in_channels"], out_channels=c["out_channels"], block_out_channels=tuple(boc),
            center_input_sample=bool(c["center_input_sample"]), flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
            freq_shift=c["freq_shift"], time_embed_dim=time_embed_dim, num_class_embeds=n_class,
            cross_attention_dim=next((d for d in cross_dims if d is not None), None), norm_num_groups=groups,
            norm_eps=c["norm_eps"], resnet=resnet, down=tuple(down), mid=mid,
            add_attention=bool(c.get("add_attention", True)), up=tuple(up),
            conv_in_kernel=c.get("conv_in_kernel", 3), conv_out_kernel=c.get("conv_out_kernel", 3),
            raw=c,
        )


_SHARED_DEFAULTS = dict(
    center_input_sample=False, flip_sin_to_cos=True, freq_shift=0, layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", norm_num_groups=32,
    attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default", add_attention=True, num_class_embeds=None,
    time_embedding_dim=None, transformer_layers_per_block=1, use_linear_projection=False, sample_size=None,
)


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> Tensor:
    """Sinusoidal embedding of (fractional) timesteps t: (B,) -> (B, dim) fp32; frequencies
    exp(-ln(10000) * i / (dim/2 - freq_shift)), [sin, cos] or [cos, sin] when flipped, an odd
    dim padded with a zero column."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    args = t[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class UNet2D(nn.Module):
    """diffusers' UNet2DModel / UNet2DConditionModel: forward(sample, timestep, class_labels=None,
    encoder_hidden_states=None, encoder_attention_mask=None) -> the predicted noise / v / sample
    (B, out_channels, H, W)."""

    def __init__(self, config: UNet2DConfig):
        super().__init__()
        c = self.config = config
        boc = c.block_out_channels
        self.conv_in = Conv2d(c.in_channels, boc[0], c.conv_in_kernel, padding=(c.conv_in_kernel - 1) // 2)
        self.time_embedding = nn.Module()
        self.time_embedding.linear_1 = Linear(boc[0], c.time_embed_dim)
        self.time_embedding.linear_2 = Linear(c.time_embed_dim, c.time_embed_dim)
        self.class_embedding = nn.Embedding(c.num_class_embeds, c.time_embed_dim) if c.num_class_embeds else None
        self.down_blocks = nn.ModuleList(DownStage(s, c.resnet) for s in c.down)
        mid_resnet = ResnetSpec(**{**c.resnet.__dict__, "output_scale_factor": float(c.raw.get("mid_block_scale_factor", 1))})
        self.mid_block = MidStage(c.mid, mid_resnet, c.add_attention) if c.mid is not None else None
        self.up_blocks = nn.ModuleList(UpStage(s, c.resnet) for s in c.up)
        self.conv_norm_out = GroupNorm(c.norm_num_groups, boc[0], c.norm_eps)
        self.conv_out = Conv2d(boc[0], c.out_channels, c.conv_out_kernel, padding=(c.conv_out_kernel - 1) // 2)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def forward(self, sample: Tensor, timestep: Tensor | float, class_labels: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None) -> Tensor:
        """sample: (B, in_channels, H, W); timestep: a number or (B,) / () tensor (may be
        fractional); class_labels: (B,) int64 for a class-conditional model; encoder_hidden_states:
        (B, S, cross_attention_dim) for a UNet2DConditionModel, with an optional
        encoder_attention_mask (B, S) bool or 0/1 (True/1 = a real token)."""
        c = self.config
        t, mask = self._check(sample, timestep, class_labels, encoder_hidden_states, encoder_attention_mask)
        if c.center_input_sample:
            sample = 2 * sample - 1.0
        emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).to(self.dtype)
        emb = self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(emb)))
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)
        temb_act = F.silu(emb)  # every ResNet's time projection starts with this SiLU
        context = encoder_hidden_states.to(self.dtype) if encoder_hidden_states is not None else None
        # channels-last throughout: oneDNN's convolutions run fastest on it, and the attention
        # blocks' (B, H*W, C) views of it are free
        h = self.conv_in(sample.to(self.dtype).contiguous(memory_format=torch.channels_last))
        skips = [h]
        for stage in self.down_blocks:
            h, added = stage(h, temb_act, context, mask)
            skips += added
        if self.mid_block is not None:
            h = self.mid_block(h, temb_act, context, mask)
        for stage in self.up_blocks:
            # odd sizes: upsample to the next skip's size rather than 2x (diffusers' upsample_size)
            size = None
            if stage.resample == "conv" and len(skips) > len(stage.resnets):
                size = tuple(skips[-len(stage.resnets) - 1].shape[2:])
                size = None if size == (2 * h.shape[2], 2 * h.shape[3]) else size
            h = stage(h, skips, temb_act, context, mask, size)
        h = self.conv_norm_out(h, activation="silu")
        return self.conv_out(h).contiguous()

    def _check(self, sample, timestep, class_labels, encoder_hidden_states, encoder_attention_mask):
        c = self.config
        name = type(self).__name__
        if not isinstance(sample, Tensor) or not sample.is_floating_point():
            raise TypeError(f"{name}: sample must be a floating torch.Tensor, got {getattr(sample, 'dtype', type(sample).__name__)}")
        if sample.dim() != 4 or sample.shape[1] != c.in_channels:
            raise ValueError(f"{name}: sample must be (B, {c.in_channels}, H, W) (in_channels {c.in_channels}), got {tuple(sample.shape)}")
        B = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        if t.dim() == 0:
            t = t.expand(B)
        elif t.dim() != 1 or t.shape[0] not in (1, B):
            raise ValueError(f"{name}: timestep must be a number or a (B,) = ({B},) tensor, got shape {tuple(t.shape)}")
        t = t.expand(B)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(f"{name}: class_labels (B,) are needed: this model is class-conditional ({c.num_class_embeds} classes)")
            if class_labels.shape != (B,) or class_labels.is_floating_point():
                raise ValueError(f"{name}: class_labels must be ({B},) integers, got {tuple(class_labels.shape)} {class_labels.dtype}")
            # (read on the host, so not while a CUDA graph is made, and a replay checks nothing:
            # a GraphedCall's first call of a signature checked them, as the sampler's first step
            # checks its labels, the same at every step)
            if not cuda_graphs.recording() and (
                    int(class_labels.min()) < 0 or int(class_labels.max()) >= c.num_class_embeds):
                raise ValueError(f"{name}: class_labels must lie in [0, {c.num_class_embeds}), got {class_labels.tolist()}")
        elif class_labels is not None:
            raise ValueError(f"{name}: class_labels given, but this model has no class embedding (num_class_embeds is null)")
        if c.cross_attention_dim is not None:
            if encoder_hidden_states is None:
                raise ValueError(f"{name}: encoder_hidden_states (B, S, {c.cross_attention_dim}) are needed (cross-attention)")
            e = encoder_hidden_states
            if e.dim() != 3 or e.shape[0] != B or e.shape[2] != c.cross_attention_dim:
                raise ValueError(
                    f"{name}: encoder_hidden_states must be (B={B}, S, cross_attention_dim={c.cross_attention_dim}), got {tuple(e.shape)}"
                )
        elif encoder_hidden_states is not None:
            raise ValueError(f"{name}: encoder_hidden_states given, but this model has no cross-attention")
        mask = None
        if encoder_attention_mask is not None:
            if encoder_hidden_states is None:
                raise ValueError(f"{name}: encoder_attention_mask without encoder_hidden_states")
            if tuple(encoder_attention_mask.shape) != tuple(encoder_hidden_states.shape[:2]):
                raise ValueError(
                    f"{name}: encoder_attention_mask must be (B, S) = {tuple(encoder_hidden_states.shape[:2])}, got"
                    f" {tuple(encoder_attention_mask.shape)}"
                )
            mask = encoder_attention_mask.to(sample.device).bool()
        return t, mask

    # ------------------------------------------------------------------ checkpoints

    @classmethod
    def from_config(cls, config: dict | UNet2DConfig) -> UNet2D:
        """A randomly initialized model (torch's default init) of a diffusers config dict."""
        return cls(config if isinstance(config, UNet2DConfig) else UNet2DConfig.from_dict(config))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> UNet2D:
        """The UNet of a diffusers checkpoint directory (config.json +
        diffusion_pytorch_model.safetensors or .bin; a pipeline's directory: its unet/ folder)."""
        root = Path(path)
        if not (root / "config.json").is_file() and (root / "unet" / "config.json").is_file():
            root = root / "unet"
        model = cls(UNet2DConfig.from_dict(read_config(root)))
        return load_into(model, _read_diffusers_weights(root), checkpoint_name_to_ours, dtype=dtype, device=device)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """config.json + diffusion_pytorch_model.safetensors in diffusers' layout and names."""
        from safetensors.torch import save_file

        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in self.config.raw.items() if not k.startswith("_")}
        config = {"_class_name": self.config.class_name, "_diffusers_version": _diffusers_version(), **config}
        (root / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(root / WEIGHTS_NAME), metadata={"format": "pt"})


def checkpoint_name_to_ours(name: str) -> str:
    """Our modules carry diffusers' names; old checkpoints (e.g. google/ddpm-cifar10-32) still
    name the attention projections query/key/value/proj_attn, which diffusers renames on load."""
    for old, new in ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")):
        if old in name and ".attentions." in name:
            return name.replace(old, new)
    return name


def _read_diffusers_weights(root: Path) -> dict[str, Tensor]:
    from fastarch.models.loading import _read_bin, _read_safetensors

    for name, read in ((WEIGHTS_NAME, _read_safetensors), ("diffusion_pytorch_model.bin", _read_bin)):
        if (root / name).is_file():
            return read(root / name)
    raise CheckpointError(f"{root}: no weights (looked for {WEIGHTS_NAME}, diffusion_pytorch_model.bin)")


def _diffusers_version() -> str:
    try:
        import diffusers

        return diffusers.__version__
    except ImportError:
        return "0.30.0"


__all__ = ["UNet2D", "UNet2DConfig", "timestep_embedding"]
