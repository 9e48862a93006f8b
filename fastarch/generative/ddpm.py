"""The class-conditional digit DDPM: a small diffusers-style UNet2D config (fastarch's UNet2D
runs it; the checkpoint is in diffusers' layout, so diffusers' UNet2DModel loads it too), its
noise schedule, and sampling with DDIM and classifier-free guidance.

Classifier-free guidance: the model has 11 class embeddings, the digits 0-9 and a "no class"
label (NULL_CLASS) that training substitutes for the true label 10% of the time, so one network
gives both the conditional and the unconditional prediction.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from fastarch.generative.digits import NUM_CLASSES, check_class_labels

NULL_CLASS = NUM_CLASSES  # the class embedding that stands for "no class"

# ~0.64M parameters, attention only in the mid block (4x4): sized for a CPU core (the committed
# checkpoint: 5000 steps of 32 images, 33 min on one core of a shared 2-core EPYC)
DDPM_CONFIG: dict = {
    "_class_name": "UNet2DModel",
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [16, 32, 64],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 32,
    "num_class_embeds": NUM_CLASSES + 1,
}

SCHEDULER_CONFIG: dict = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}


def build_unet(config: dict | None = None) -> nn.Module:
    """A freshly initialized fastarch UNet2D of ``config`` (default DDPM_CONFIG)."""
    from fastarch.models.unet2d import UNet2D

    return UNet2D.from_config(dict(config or DDPM_CONFIG))


def build_scheduler(kind: str = "ddpm", config: dict | None = None):
    """fastarch's DDPMScheduler ("ddpm", training) or DDIMScheduler ("ddim", sampling) of the
    noise schedule the model was trained with."""
    from fastarch.models.schedulers import DDIMScheduler, DDPMScheduler

    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[kind]
    return cls.from_config(dict(config or SCHEDULER_CONFIG))


def save_ddpm(model: nn.Module, path: str | os.PathLike) -> None:
    """The UNet in diffusers' layout (config.json + diffusion_pytorch_model.safetensors), and the
    schedule it was trained with as scheduler_config.json beside it."""
    model.save_pretrained(path)
    (Path(path) / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", **SCHEDULER_CONFIG}, indent=2) + "\n")


def load_ddpm(path: str | os.PathLike, *, device: torch.device | str | None = None) -> nn.Module:
    """The fastarch UNet2D of a checkpoint directory save_ddpm (or diffusers) wrote, in eval mode;
    its schedule (scheduler_config.json, else SCHEDULER_CONFIG) as ``model.scheduler_config``."""
    from fastarch.models.unet2d import UNet2D

    model = UNet2D.from_pretrained(path, device=device).eval()
    file = Path(path) / "scheduler_config.json"
    model.scheduler_config = json.loads(file.read_text()) if file.is_file() else dict(SCHEDULER_CONFIG)
    return model


def sample_digits(
    model: nn.Module, class_labels: Tensor | None = None, *, n: int | None = None, steps: int = 50, eta: float = 0.0,
    guidance_scale: float = 1.5, seed: int | None = 0, progress: bool = False,
) -> Tensor:
    """Digits (N, 1, 16, 16) in [-1, 1] by ``steps`` DDIM steps. class_labels (N,) in 0..9 for
    the class-conditional model (N = n when None: the null class, unguided); guidance_scale is
    classifier-free guidance's s (1: none). The same seed gives the same digits."""
    from fastarch.models.schedulers import sample

    if class_labels is not None:
        n = len(class_labels) if n is None else n
        class_labels = check_class_labels(class_labels, n)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    conditional = getattr(model.config, "num_class_embeds", None)
    if conditional and class_labels is None:
        class_labels, guidance_scale = torch.full((n,), NULL_CLASS), 1.0
    scheduler = build_scheduler("ddim", getattr(model, "scheduler_config", None))
    size = model.config.raw.get("sample_size") or DDPM_CONFIG["sample_size"]
    x = sample(model, scheduler, (n, model.config.in_channels, size, size), class_labels=class_labels,
               guidance_scale=guidance_scale, null_class_label=NULL_CLASS if conditional else None,
               num_inference_steps=steps, eta=eta, seed=seed, progress=progress)
    return x.clamp(-1, 1)
