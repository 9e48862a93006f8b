"""A small DCGAN for 16x16 digits, class-conditional by default, whose norms run on fastarch's
kernels: the generator's GroupNorm+SiLU blocks take the class as a per-sample scale and shift of
the norm (``group_norm(..., scale=, shift=, activation="silu")``, one fused op), the
discriminator uses plain GroupNorm and a LayerNorm before its projection head.

    generator = Generator.from_pretrained(CHECKPOINTS / "gan-digits")
    images = generator.sample(16, class_labels=torch.full((16,), 3), seed=0)   # (16, 1, 16, 16)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastarch.ops import group_norm
from fastarch.generative.digits import check_class_labels
from fastarch.ops import layer_norm


@dataclass
class DCGANConfig:
    """num_classes None: unconditional. The generator's widths are 4, 2, 1 x base_channels at
    4x4, 8x8, 16x16; the discriminator's 1, 2, 4 x base_channels at 8x8, 4x4, 4x4."""

    image_size: int = 16
    latent_dim: int = 64
    num_classes: int | None = 10
    base_channels: int = 32
    class_embed_dim: int = 32
    num_groups: int = 8


class ConditionalGroupNormSiLU(nn.Module):
    """GroupNorm, then u * (1 + scale) + shift with scale, shift projected from the class
    embedding (zero at initialization: the block starts as a plain GroupNorm), then SiLU."""

    def __init__(self, channels: int, num_groups: int, embed_dim: int | None) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.modulation = nn.Linear(embed_dim, 2 * channels) if embed_dim else None
        if self.modulation is not None:
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, embedding: Tensor | None) -> Tensor:
        scale = shift = None
        if self.modulation is not None:
            scale, shift = self.modulation(embedding).chunk(2, dim=1)
        return group_norm(x, self.num_groups, self.weight, self.bias, 1e-5, scale=scale, shift=shift, activation="silu")


class Generator(nn.Module):
    """z (N, latent_dim) [+ class_labels (N,)] -> images (N, 1, 16, 16) in [-1, 1]."""

    def __init__(self, config: DCGANConfig) -> None:
        super().__init__()
        if config.image_size != 16:
            raise ValueError(f"image_size must be 16, got {config.image_size}")
        self.config = c = config
        e = c.class_embed_dim if c.num_classes else None
        self.class_embedding = nn.Embedding(c.num_classes, c.class_embed_dim) if c.num_classes else None
        widths = (4 * c.base_channels, 2 * c.base_channels, c.base_channels)
        self.project = nn.Linear(c.latent_dim + (e or 0), widths[0] * 4 * 4)
        self.norm0 = ConditionalGroupNormSiLU(widths[0], c.num_groups, e)
        # nearest upsampling then a 3x3 conv: no transposed-conv checkerboard on so few pixels
        self.conv1 = nn.Conv2d(widths[0], widths[1], 3, padding=1)
        self.norm1 = ConditionalGroupNormSiLU(widths[1], c.num_groups, e)
        self.conv2 = nn.Conv2d(widths[1], widths[2], 3, padding=1)
        self.norm2 = ConditionalGroupNormSiLU(widths[2], c.num_groups, e)
        self.to_image = nn.Conv2d(widths[2], 1, 3, padding=1)

    def forward(self, z: Tensor, class_labels: Tensor | None = None) -> Tensor:
        c = self.config
        if z.dim() != 2 or z.shape[1] != c.latent_dim:
            raise ValueError(f"z must be (N, {c.latent_dim}), got {tuple(z.shape)}")
        emb = None
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this generator is class-conditional: pass class_labels (N,)")
            emb = self.class_embedding(check_class_labels(class_labels.to(z.device), len(z), c.num_classes))
            z = torch.cat([z, emb], dim=1)
        elif class_labels is not None:
            raise ValueError("this generator is unconditional: class_labels must be None")
        h = self.norm0(self.project(z).view(len(z), -1, 4, 4), emb)
        h = self.norm1(self.conv1(F.interpolate(h, scale_factor=2, mode="nearest")), emb)
        h = self.norm2(self.conv2(F.interpolate(h, scale_factor=2, mode="nearest")), emb)
        return torch.tanh(self.to_image(h))

    @torch.no_grad()
    def sample(self, n: int, class_labels: Tensor | None = None, *, seed: int | None = None) -> Tensor:
        """n images (n, 1, 16, 16) in [-1, 1]; the same seed gives the same images."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        device = next(self.parameters()).device
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        z = torch.randn(n, self.config.latent_dim, generator=g).to(device)
        return self(z, class_labels)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """config.json + model.safetensors."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"model_type": "dcgan_generator", **asdict(self.config)}, indent=2) + "\n")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: torch.device | str | None = None) -> Generator:
        """The generator save_pretrained wrote to ``path``, in eval mode."""
        from fastarch.models.loading import CheckpointError, read_config, read_weights

        config = read_config(path)
        if config.pop("model_type", None) != "dcgan_generator":
            raise CheckpointError(f"{path}: config.json is not a dcgan_generator's")
        try:
            model = cls(DCGANConfig(**config))
        except TypeError as e:
            raise CheckpointError(f"{path}: config.json does not fit DCGANConfig ({e})") from None
        try:
            model.load_state_dict(read_weights(path))
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not fit the config ({e})") from None
        return model.to(device).eval()


class Discriminator(nn.Module):
    """images (N, 1, 16, 16) [+ class_labels] -> logits (N,): real high. Conditional through a
    projection head (logit += <class embedding, features>), which keeps class information in
    the score without feeding labels into the convs."""

    def __init__(self, config: DCGANConfig) -> None:
        super().__init__()
        self.config = c = config
        w = (c.base_channels, 2 * c.base_channels, 4 * c.base_channels)
        self.conv0 = nn.Conv2d(1, w[0], 4, stride=2, padding=1)  # 16 -> 8
        self.conv1 = nn.Conv2d(w[0], w[1], 4, stride=2, padding=1)  # 8 -> 4
        self.norm1 = nn.GroupNorm(c.num_groups, w[1])  # parameters only: the op is fastarch's
        self.conv2 = nn.Conv2d(w[1], w[2], 3, padding=1)
        self.norm2 = nn.GroupNorm(c.num_groups, w[2])
        self.hidden = nn.Linear(w[2] * 4 * 4, 128)
        self.hidden_norm = nn.LayerNorm(128)
        self.out = nn.Linear(128, 1)
        self.class_embedding = nn.Embedding(c.num_classes, 128) if c.num_classes else None

    def forward(self, images: Tensor, class_labels: Tensor | None = None) -> Tensor:
        g = self.config.num_groups
        h = F.leaky_relu(self.conv0(images), 0.2)
        h = F.leaky_relu(group_norm(self.conv1(h), g, self.norm1.weight, self.norm1.bias), 0.2)
        h = F.leaky_relu(group_norm(self.conv2(h), g, self.norm2.weight, self.norm2.bias), 0.2)
        h = self.hidden(h.flatten(1))
        h = F.leaky_relu(layer_norm(h, self.hidden_norm.weight, self.hidden_norm.bias), 0.2)
        logit = self.out(h).squeeze(1)
        if self.class_embedding is not None:
            logit = logit + (self.class_embedding(class_labels) * h).sum(1)
        return logit
