"""Training loops for the digit models: seeded (the same seed and thread count give the same
weights), a tqdm progress bar, the loss history returned and drawable as a PNG curve.

The generator's weights are averaged (an exponential moving average, as both GANs and DDPMs
are usually sampled from): the averaged copy is what gets saved and sampled.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastarch.generative.dcgan import DCGANConfig, Discriminator, Generator
from fastarch.generative.digits import DigitSplits, load_digit_splits


@dataclass
class TrainResult:
    model: nn.Module  # the weight-averaged model, eval mode
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    for a, p in zip(average.parameters(), model.parameters()):
        a.lerp_(p, 1 - decay)
    for a, b in zip(average.buffers(), model.buffers()):
        a.copy_(b)


def _progress(steps: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(range(steps), desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True)


def _check_steps(steps: int, batch_size: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def train_gan(
    config: DCGANConfig | None = None, *, steps: int = 3000, batch_size: int = 64, lr: float = 2e-4,
    ema_decay: float = 0.995, seed: int = 0, splits: DigitSplits | None = None, progress: bool = True,
) -> TrainResult:
    """Trains a DCGAN on the train split with the non-saturating logistic loss; returns the
    weight-averaged generator and the history {"d_loss", "g_loss"} per step."""
    _check_steps(steps, batch_size)
    config = config or DCGANConfig()
    x, y = (splits or load_digit_splits(config.image_size)).train
    conditional = config.num_classes is not None
    start = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        gen, disc = Generator(config), Discriminator(config)
        average = copy.deepcopy(gen).requires_grad_(False)
        # beta1 = 0.5: the DCGAN setting; momentum near 1 makes the two players oscillate
        opt_g = torch.optim.Adam(gen.parameters(), lr=lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.999))
        history: dict[str, list[float]] = {"d_loss": [], "g_loss": []}
        bar = _progress(steps, progress, "train-gan")
        for step in bar:
            idx = torch.randint(len(y), (batch_size,))
            real, labels = x[idx], y[idx]
            fake_labels = torch.randint(config.num_classes, (batch_size,)) if conditional else None
            fake = gen(torch.randn(batch_size, config.latent_dim), fake_labels)
            real_labels = labels if conditional else None
            d_loss = F.softplus(-disc(real, real_labels)).mean() + F.softplus(disc(fake.detach(), fake_labels)).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            g_loss = F.softplus(-disc(fake, fake_labels)).mean()
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            ema_update(average, gen, ema_decay)
            history["d_loss"].append(d_loss.item())
            history["g_loss"].append(g_loss.item())
            if step % 50 == 0:
                bar.set_postfix(d_loss=f"{d_loss.item():.3f}", g_loss=f"{g_loss.item():.3f}")
    return TrainResult(average.eval(), history, time.perf_counter() - start)


def save_loss_curve(history: dict[str, list[float]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Each history series (raw, faint) and its running mean over ~2% of the steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, values in history.items():
        v = torch.tensor(values, dtype=torch.float64)
        window = max(1, len(v) // 50)
        smooth = v.unfold(0, window, 1).mean(1) if len(v) >= window else v
        line, = ax.plot(range(len(v)), v.numpy(), alpha=0.2, linewidth=0.5)
        ax.plot(range(window - 1, window - 1 + len(smooth)), smooth.numpy(), color=line.get_color(), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _prediction(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    out = model(x, t, class_labels=labels)
    return getattr(out, "sample", out)  # diffusers' UNet2DModel returns an output object


def train_ddpm(
    model: nn.Module | None = None, scheduler=None, *, config: dict | None = None, steps: int = 5000, batch_size: int = 32, lr: float = 1e-3,
    warmup: int = 100, ema_decay: float = 0.999, label_dropout: float = 0.1, seed: int = 0,
    splits: DigitSplits | None = None, progress: bool = True,
) -> TrainResult:
    """Trains a class-conditional noise-prediction UNet on the train split (the epsilon MSE at a
    uniformly drawn timestep), replacing the label by the null class ``label_dropout`` of the
    time for classifier-free guidance. model: default a fresh UNet2D (initialized from ``seed``)
    of ``config`` (default ddpm.DDPM_CONFIG);
    scheduler: default DDPMScheduler(**ddpm.SCHEDULER_CONFIG), anything with add_noise and
    num_train_timesteps (config). Returns the weight-averaged model and {"loss"} per step."""
    from fastarch.generative import ddpm

    _check_steps(steps, batch_size)
    x, y = (splits or load_digit_splits((config or ddpm.DDPM_CONFIG)["sample_size"])).train
    start = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model if model is not None else ddpm.build_unet(config)
        scheduler = scheduler if scheduler is not None else ddpm.build_scheduler()
        timesteps = ddpm.SCHEDULER_CONFIG["num_train_timesteps"]
        model.train()
        average = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        history: dict[str, list[float]] = {"loss": []}
        bar = _progress(steps, progress, "train-ddpm")
        for step in bar:
            idx = torch.randint(len(y), (batch_size,))
            x0, labels = x[idx], y[idx].clone()
            labels[torch.rand(batch_size) < label_dropout] = ddpm.NULL_CLASS
            noise = torch.randn_like(x0)
            t = torch.randint(timesteps, (batch_size,))
            loss = F.mse_loss(_prediction(model, scheduler.add_noise(x0, noise, t), t, labels), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            warm.step()
            # a short average early on: the first weights are noise, not worth remembering
            ema_update(average, model, min(ema_decay, (1 + step) / (10 + step)))
            history["loss"].append(loss.item())
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    return TrainResult(average.eval(), history, time.perf_counter() - start)
