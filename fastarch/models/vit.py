"""ViT (Dosovitskiy et al., 2020) on fastarch's kernels, from Hugging Face checkpoints of
``ViTForImageClassification`` and ``ViTModel`` (model_type "vit").

    model = ViT.from_pretrained("google/vit-base-patch16-224", dtype=torch.bfloat16)
    logits = model(pixel_values).logits          # pixel_values: (B, C, H, W), preprocessed

An image is cut into patches (a Conv2d whose stride is its kernel), a learned CLS token is put
in front, learned positions are added, and pre-LN transformer blocks run over the sequence:
every residual add is fused into the next LayerNorm (fastarch.ops.add_layer_norm), attention is
fastarch.ops.attention (every image has the same number of patches: nothing to pad), the MLP's
first bias and its GELU are one fastarch.ops.bias_gelu. The classifier reads the final
LayerNorm's CLS row.

Not built (refused with an error): masked image modeling (ViTForMaskedImageModeling: its mask
token and pixel-shuffle decoder, which encoder_stride sizes) and images of another size than
the checkpoint's (transformers' interpolate_pos_encoding).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastarch import ops
from fastarch.models.layers import LayerNorm
from fastarch.nn import Linear  # nn.Linear on fastarch.ops.linear
from fastarch.models.loading import CheckpointError, load_into, read_config, read_weights

# transformers' hidden_act name -> bias_gelu's approximate
_GELU_FORMS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def _pair(value: object, name: str) -> tuple[int, int]:
    """An int or an [h, w] pair of config.json as (h, w)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value[0], value[1]
    raise CheckpointError(f"config.json: {name} must be an int or a pair of ints, got {value!r}")


@dataclass(frozen=True)
class ViTConfig:
    """Every hyperparameter the model reads from config.json (defaults: transformers' ViTConfig).
    encoder_stride is not read: only masked image modeling uses it, and that is not built."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-12
    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_output_size: int | None = None  # None: hidden_size
    pooler_act: str = "tanh"
    num_labels: int = 2  # len(id2label) when config.json has it

    @classmethod
    def from_dict(cls, config: dict) -> ViTConfig:
        if config.get("model_type") != "vit":
            raise CheckpointError(f"config.json: model_type {config.get('model_type')!r} is not 'vit'")
        for arch in config.get("architectures") or ():
            if arch not in ("ViTForImageClassification", "ViTModel"):
                raise CheckpointError(
                    f"config.json: architecture {arch} is not built (ViTForImageClassification and ViTModel are)"
                )
        fields = {k: config[k] for k in cls.__dataclass_fields__ if k in config and k != "num_labels"}
        for name in ("image_size", "patch_size"):
            if name in fields:
                fields[name] = _pair(fields[name], name)
        if "id2label" in config:
            fields["num_labels"] = len(config["id2label"])
        elif "num_labels" in config:
            fields["num_labels"] = config["num_labels"]
        c = cls(**fields)
        if c.hidden_act not in _GELU_FORMS:
            raise CheckpointError(f"config.json: hidden_act {c.hidden_act!r} is not built (one of {sorted(_GELU_FORMS)})")
        if c.hidden_size % c.num_attention_heads:
            raise CheckpointError(
                f"config.json: hidden_size {c.hidden_size} is not a multiple of num_attention_heads {c.num_attention_heads}"
            )
        if any(i < p for i, p in zip(c.image_size, c.patch_size)):
            raise CheckpointError(f"config.json: image_size {c.image_size} is smaller than patch_size {c.patch_size}")
        return c

    @property
    def num_patches(self) -> int:
        return (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])


class ViTOutput(NamedTuple):
    logits: Tensor | None  # (B, num_labels); None without a classifier (a ViTModel checkpoint)
    last_hidden_state: Tensor  # (B, 1 + num_patches, hidden_size), after the final LayerNorm
    pooler_output: Tensor | None  # (B, pooler_output_size): tanh(dense(CLS)); None without a pooler


class Attention(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.q = Linear(c.hidden_size, c.hidden_size, bias=c.qkv_bias)
        self.k = Linear(c.hidden_size, c.hidden_size, bias=c.qkv_bias)
        self.v = Linear(c.hidden_size, c.hidden_size, bias=c.qkv_bias)
        self.out = Linear(c.hidden_size, c.hidden_size)
        self.dropout_p = c.attention_probs_dropout_prob

    def forward(self, x: Tensor) -> Tensor:
        B, S, D = x.shape
        # (B, S, D) -> (B, H, S, D/H) as views: the kernels take any stride but the last
        q, k, v = (proj(x).view(B, S, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = ops.attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class MLP(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.fc1 = Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = Linear(c.intermediate_size, c.hidden_size)
        self.approximate = _GELU_FORMS[c.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        # fc1's bias goes into the fused bias + GELU rather than into the matmul
        return self.fc2(ops.bias_gelu(ops.linear(x, self.fc1.weight), self.fc1.bias, self.approximate))


class Block(nn.Module):
    """A pre-LN block that carries the residual stream beside the last sublayer's output, so
    each residual add is fused into the LayerNorm after it (the next block's norm1, or the
    final norm): forward(x, residual) -> (mlp output, residual before it is added)."""

    def __init__(self, c: ViTConfig):
        super().__init__()
        self.norm1 = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.attn = Attention(c)
        self.norm2 = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.mlp = MLP(c)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        if residual is None:  # the first block: x is the embeddings, nothing to add yet
            h, residual = self.norm1(x), x
        else:
            h, residual = self.norm1.add(x, residual)
        h, residual = self.norm2.add(self.dropout(self.attn(h)), residual)
        return self.dropout(self.mlp(h)), residual


class ViT(nn.Module):
    """ViTForImageClassification / ViTModel: forward(pixel_values) -> ViTOutput."""

    def __init__(self, config: ViTConfig, *, pooler: bool = False, classifier: bool = True):
        super().__init__()
        c = self.config = config
        self.patch_embed = nn.Conv2d(c.num_channels, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.pos_embedding = nn.Parameter(torch.zeros(1, 1 + c.num_patches, c.hidden_size))
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.norm = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.pooler = Linear(c.hidden_size, c.pooler_output_size or c.hidden_size) if pooler else None
        self.classifier = Linear(c.hidden_size, c.num_labels) if classifier else None

    def forward(self, pixel_values: Tensor) -> ViTOutput:
        """pixel_values: (B, num_channels, *image_size), preprocessed as the checkpoint's image
        processor does; cast to the model's dtype as transformers does."""
        x = self._check(pixel_values).to(self.patch_embed.weight.dtype)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, patches, D), row-major patch order
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        x, residual = self.dropout(x), None
        for block in self.blocks:
            x, residual = block(x, residual)
        if residual is None:  # no blocks
            hidden = self.norm(x)
        else:
            hidden = self.norm.add(x, residual)[0]
        cls = hidden[:, 0]
        logits = self.classifier(cls) if self.classifier is not None else None
        pooled = torch.tanh(self.pooler(cls)) if self.pooler is not None else None
        return ViTOutput(logits, hidden, pooled)

    def _check(self, pixel_values: object) -> Tensor:
        c = self.config
        if not isinstance(pixel_values, Tensor):
            raise TypeError(f"ViT: pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise TypeError(f"ViT: pixel_values must be a floating tensor, got {pixel_values.dtype}")
        want = (c.num_channels, *c.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(
                f"ViT: pixel_values must have shape (batch, {', '.join(map(str, want))}) = (batch, channels, height,"
                f" width) for this checkpoint, got {tuple(pixel_values.shape)} (resize to the checkpoint's image_size;"
                " interpolated position embeddings are not built)"
            )
        if pixel_values.shape[0] == 0:
            raise ValueError("ViT: pixel_values holds no image (batch 0)")
        if pixel_values.device != self.patch_embed.weight.device:
            raise ValueError(
                f"ViT: pixel_values is on {pixel_values.device}, the model on {self.patch_embed.weight.device}"
            )
        return pixel_values

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> ViT:
        """The model of a ViTForImageClassification or ViTModel checkpoint directory, in eval
        mode. It has a classifier when the checkpoint holds one (classifier.*), a pooler when
        the checkpoint holds one (pooler.*)."""
        config = ViTConfig.from_dict(read_config(path))
        weights = read_weights(path)
        names = {_strip_vit(n) for n in weights}
        refused = sorted(n for n in names if n == "embeddings.mask_token" or n.startswith("decoder."))
        if refused:
            raise CheckpointError(
                f"{path}: holds {', '.join(refused[:3])}: masked image modeling (ViTForMaskedImageModeling) is not built"
            )
        if "pooler.dense.weight" in names and config.pooler_act != "tanh":
            raise CheckpointError(f"config.json: pooler_act {config.pooler_act!r} is not built (only 'tanh')")
        model = cls(config, pooler="pooler.dense.weight" in names, classifier="classifier.weight" in names)
        return load_into(model, weights, _model_name, dtype=dtype, device=device)


# checkpoint name (without the "vit." of ViTForImageClassification) -> model name
_NAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embedding"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.\1"),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.query\.(weight|bias)", r"blocks.\1.attn.q.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.key\.(weight|bias)", r"blocks.\1.attn.k.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.value\.(weight|bias)", r"blocks.\1.attn.v.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.out.\2"),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"pooler\.dense\.(weight|bias)", r"pooler.\1"),
    (r"classifier\.(weight|bias)", r"classifier.\1"),
]


def _strip_vit(name: str) -> str:
    return name.removeprefix("vit.")


def _model_name(checkpoint_name: str) -> str:
    """The model's name for a checkpoint tensor; a name no rule knows comes back unchanged, so
    load_into reports it as a tensor the model has no place for."""
    name = _strip_vit(checkpoint_name)
    for pattern, target in _NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    return checkpoint_name


__all__ = ["ViT", "ViTConfig", "ViTOutput"]
