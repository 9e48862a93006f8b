"""DDPM (Ho et al., 2020) and DDIM (Song et al., 2021) noise schedules and samplers, equal to
diffusers' DDPMScheduler and DDIMScheduler on the configurations they share (the same
scheduler_config.json reads into either), and ``sample``, the denoising loop of diffusers'
DDPMPipeline / DDIMPipeline with classifier-free guidance.

    scheduler = DDIMScheduler.from_config(json.load(open("scheduler/scheduler_config.json")))
    images = sample(unet, scheduler, (4, 3, 32, 32), num_inference_steps=50, seed=0)   # in [-1, 1]-ish model space

    noisy = DDPMScheduler(beta_schedule="linear").add_noise(x0, noise, t)   # training

Built: beta schedules linear, scaled_linear, squaredcos_cap_v2 (and trained_betas);
prediction types epsilon, v_prediction, sample; clip_sample (clip_sample_range); timestep
spacing leading (diffusers' default), trailing, linspace, with steps_offset; DDPM variance
fixed_small / fixed_large; DDIM eta and set_alpha_to_one. Refused with an error naming the field:
thresholding, rescale_betas_zero_snr, other beta schedules and variance types.

The arithmetic follows diffusers' in fp32 scalars (the cumulative alphas as an fp32 tensor,
each coefficient a 0-dim fp32 tensor), so the same model output gives the same next sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from fastarch import cuda_graphs
from fastarch.finite import finite_number

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")
MIN_GRAPHED_STEPS = 8
"""Fewer steps than this run the model eagerly on a GPU: the capture (two eager calls' time) would not pay."""


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas: list[float] | None = None) -> Tensor:
    """(num_train_timesteps,) fp32 betas of a named schedule."""
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # linear in sqrt(beta): latent diffusion's schedule
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine alpha-bar, betas capped at 0.999

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_train_timesteps
        return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    raise ValueError(f"beta_schedule {beta_schedule!r} is not built (one of {', '.join(BETA_SCHEDULES)})")


@dataclass
class _SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list | None = None
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    thresholding: bool = False
    rescale_betas_zero_snr: bool = False


class _Scheduler:
    """What DDPM and DDIM share: the schedule, add_noise, timesteps, x0 from a model output."""

    _config_class = _SchedulerConfig
    _ignored = ("dynamic_thresholding_ratio", "sample_max_value")  # only thresholding reads them

    def __init__(self, **kwargs):
        names = {f.name for f in fields(self._config_class)}
        unknown = sorted(set(kwargs) - names - set(self._ignored))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown argument(s) {', '.join(unknown)}")
        c = self.config = self._config_class(**{k: v for k, v in kwargs.items() if k in names})
        if c.thresholding:
            raise ValueError(f"{type(self).__name__}: thresholding True is not built")
        if c.rescale_betas_zero_snr:
            raise ValueError(f"{type(self).__name__}: rescale_betas_zero_snr True is not built")
        if c.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"{type(self).__name__}: prediction_type {c.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
        if c.timestep_spacing not in SPACINGS:
            raise ValueError(f"{type(self).__name__}: timestep_spacing {c.timestep_spacing!r} is not one of {', '.join(SPACINGS)}")
        if not isinstance(c.num_train_timesteps, int) or c.num_train_timesteps < 1:
            raise ValueError(f"{type(self).__name__}: num_train_timesteps must be a positive int, got {c.num_train_timesteps!r}")
        self.betas = make_betas(c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.trained_betas)
        if tuple(self.betas.shape) != (c.num_train_timesteps,) or not ((self.betas >= 0) & (self.betas < 1)).all():
            # (a beta of 1 or more, or NaN, makes every sample NaN)
            source = "trained_betas" if c.trained_betas is not None else f"beta_start={c.beta_start}, beta_end={c.beta_end}"
            raise ValueError(
                f"{type(self).__name__}: the betas must be num_train_timesteps={c.num_train_timesteps} numbers in [0, 1),"
                f" got {tuple(self.betas.shape)} from {source}"
            )
        if not finite_number(c.clip_sample_range) or not c.clip_sample_range > 0:
            raise ValueError(f"{type(self).__name__}: clip_sample_range must be a finite number > 0, got {c.clip_sample_range}")
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(c.num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    @classmethod
    def from_config(cls, config: dict) -> _Scheduler:
        """From a diffusers scheduler_config.json's dict (keys starting with "_" and those of
        other schedulers' configs that this one does not read are dropped, as diffusers does)."""
        names = {f.name for f in fields(cls._config_class)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_config(self) -> dict:
        """The config dict, with diffusers' _class_name: diffusers' from_config reads it."""
        return {"_class_name": type(self).__name__, **{f.name: getattr(self.config, f.name) for f in fields(self.config)}}

    def save_pretrained(self, path) -> None:
        """scheduler_config.json in ``path`` (a diffusers pipeline's scheduler/ folder holds one)."""
        import json
        from pathlib import Path

        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        (root / "scheduler_config.json").write_text(json.dumps(self.to_config(), indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, path) -> _Scheduler:
        """From ``path``/scheduler_config.json (or ``path``/scheduler/scheduler_config.json)."""
        import json
        from pathlib import Path

        root = Path(path)
        for file in (root / "scheduler_config.json", root / "scheduler" / "scheduler_config.json"):
            if file.is_file():
                return cls.from_config(json.loads(file.read_text()))
        raise FileNotFoundError(f"{path}: no scheduler_config.json")

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """The descending timesteps of an num_inference_steps-step sampling run, as diffusers
        spaces them (timestep_spacing, steps_offset)."""
        n, T = num_inference_steps, self.config.num_train_timesteps
        if not isinstance(n, int) or not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be an int in [1, num_train_timesteps={T}], got {n!r}")
        self.num_inference_steps = n
        spacing = self.config.timestep_spacing
        if spacing == "leading":
            t = torch.arange(n, dtype=torch.int64) * (T // n) + self.config.steps_offset
            t = t.flip(0)
        elif spacing == "trailing":
            t = torch.tensor([round(T - i * (T / n)) for i in range(n)], dtype=torch.int64) - 1
        else:  # linspace: numpy's round-half-even, as diffusers rounds
            t = torch.linspace(0, T - 1, n, dtype=torch.float64).round().to(torch.int64).flip(0)
        self.timesteps = t.to(device) if device is not None else t

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; timesteps (B,) int, per batch row."""
        abar = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)[timesteps.to(original_samples.device)]
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        return abar.sqrt().reshape(shape) * original_samples + (1 - abar).sqrt().reshape(shape) * noise

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The v-prediction target sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
        abar = self.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)[timesteps.to(sample.device)]
        shape = (-1,) + (1,) * (sample.dim() - 1)
        return abar.sqrt().reshape(shape) * noise - (1 - abar).sqrt().reshape(shape) * sample

    def training_target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """What the model learns to predict under this prediction_type."""
        p = self.config.prediction_type
        return noise if p == "epsilon" else x0 if p == "sample" else self.get_velocity(x0, noise, timesteps)

    def scale_model_input(self, sample: Tensor, timestep: int | None = None) -> Tensor:
        return sample

    def _x0_and_eps(self, model_output: Tensor, sample: Tensor, abar_t: Tensor) -> tuple[Tensor, Tensor | None]:
        beta_t = 1 - abar_t
        p = self.config.prediction_type
        if p == "epsilon":
            return (sample - beta_t ** (0.5) * model_output) / abar_t ** (0.5), model_output
        if p == "sample":
            return model_output, None
        return abar_t**0.5 * sample - beta_t**0.5 * model_output, abar_t**0.5 * model_output + beta_t**0.5 * sample

    def _check_step(self, model_output: Tensor, timestep, sample: Tensor) -> int:
        if self.num_inference_steps is None:
            raise RuntimeError(f"{type(self).__name__}.step: call set_timesteps(num_inference_steps) first")
        if model_output.shape != sample.shape:
            raise ValueError(f"step: model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} differ in shape")
        t = int(timestep)
        if not 0 <= t < self.config.num_train_timesteps:
            raise ValueError(f"step: timestep {t} is outside [0, {self.config.num_train_timesteps})")
        return t


@dataclass
class DDPMConfig(_SchedulerConfig):
    variance_type: str = "fixed_small"


class DDPMScheduler(_Scheduler):
    """Ancestral sampling: x_{t-1} ~ N(mean(x0_hat, x_t), var_t), the posterior of the forward
    process given the predicted x0 (fixed_small: the posterior variance; fixed_large: beta_t)."""

    _config_class = DDPMConfig

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.config.variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(f"DDPMScheduler: variance_type {self.config.variance_type!r} is not built (fixed_small, fixed_large)")

    def previous_timestep(self, t: int) -> int:
        if self.num_inference_steps is None:
            return t - 1
        idx = (self.timesteps == t).nonzero()
        if len(idx) == 0:
            raise ValueError(f"DDPMScheduler.step: timestep {t} is not one of set_timesteps' ({self.timesteps.tolist()[:8]}...)")
        i = int(idx[0, 0])
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x_{t-1} from the model's output at x_t (a fresh N(0, 1) draw from ``generator`` for t > 0)."""
        t = self._check_step(model_output, timestep, sample)
        prev_t = self.previous_timestep(t)
        one = torch.tensor(1.0)
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else one
        beta_t, beta_prev = 1 - abar_t, 1 - abar_prev
        alpha_step = abar_t / abar_prev
        beta_step = 1 - alpha_step
        x0, _ = self._x0_and_eps(model_output, sample, abar_t)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        mean = (abar_prev ** (0.5) * beta_step) / beta_t * x0 + alpha_step ** (0.5) * beta_prev / beta_t * sample
        if t == 0:
            return mean
        noise = _randn(model_output, generator)
        if self.config.variance_type == "fixed_small":
            var = torch.clamp(beta_prev / beta_t * beta_step, min=1e-20)
        else:
            var = beta_step
        return mean + var**0.5 * noise


@dataclass
class DDIMConfig(_SchedulerConfig):
    set_alpha_to_one: bool = True


class DDIMScheduler(_Scheduler):
    """Deterministic (eta 0) or partly stochastic (eta > 0) DDIM steps over set_timesteps' grid."""

    _config_class = DDIMConfig

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor, eta: float = 0.0,
             generator: torch.Generator | None = None, use_clipped_model_output: bool = False) -> Tensor:
        """x_{t-k} from the model's output at x_t; eta > 0 adds eta * sigma_t of fresh noise."""
        t = self._check_step(model_output, timestep, sample)
        if not 0 <= eta <= 1:  # (past 1 the variance outgrows 1 - alpha-bar: NaN)
            raise ValueError(f"DDIMScheduler.step: eta must be in [0, 1], got {eta}")
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_t = 1 - abar_t
        x0, eps = self._x0_and_eps(model_output, sample, abar_t)
        if eps is None:  # "sample" prediction
            eps = (sample - abar_t ** (0.5) * x0) / beta_t ** (0.5)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        variance = ((1 - abar_prev) / beta_t) * (1 - abar_t / abar_prev)
        std = eta * variance ** (0.5)
        if use_clipped_model_output:
            eps = (sample - abar_t ** (0.5) * x0) / beta_t ** (0.5)
        prev = abar_prev ** (0.5) * x0 + (1 - abar_prev - std**2) ** (0.5) * eps
        if eta > 0:
            prev = prev + std * _randn(model_output, generator)
        return prev


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, 1) of like's shape and dtype, drawn on the generator's device (CPU generators draw
    on the CPU and move the result, as diffusers' randn_tensor does)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


@torch.no_grad()
def sample(
    model,
    scheduler: DDPMScheduler | DDIMScheduler,
    shape_or_noise: tuple[int, ...] | Tensor,
    *,
    class_labels: Tensor | None = None,
    encoder_hidden_states: Tensor | None = None,
    encoder_attention_mask: Tensor | None = None,
    guidance_scale: float = 1.0,
    null_class_label: int | None = None,
    null_encoder_hidden_states: Tensor | None = None,
    num_inference_steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> Tensor:
    """Denoise from Gaussian noise: the loop of diffusers' DDPMPipeline / DDIMPipeline (the same
    seed draws the same noise in the same order), returning the final sample in the model's
    space (images: [-1, 1]; diffusers' pipelines then map to [0, 1] with x / 2 + 0.5).

    shape_or_noise: (B, C, H, W), the noise drawn in the model's dtype from ``generator`` (or a
    CPU generator seeded with ``seed``), or the starting noise itself.
    guidance_scale != 1: classifier-free guidance, out = uncond + s * (cond - uncond), the
    unconditional pass with null_class_label (default: the last class, num_class_embeds - 1:
    reserve it as the "no class" label when training with label dropout) and/or
    null_encoder_hidden_states (default: zeros). Both passes run as one batch of 2B.
    eta: DDIM only (0: deterministic). progress: a tqdm bar over the steps.
    """
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    device, dtype = model.device, model.dtype
    if isinstance(shape_or_noise, Tensor):
        x = shape_or_noise.to(device=device, dtype=dtype)
    else:
        gen_device = generator.device if generator is not None else device
        x = torch.randn(tuple(shape_or_noise), generator=generator, device=gen_device, dtype=dtype).to(device)
    if eta and not isinstance(scheduler, DDIMScheduler):
        raise ValueError("sample: eta is a DDIM parameter; the scheduler is a DDPMScheduler")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise ValueError(f"sample: guidance_scale must be a finite number, got {guidance_scale!r}")
    if not 0 <= eta <= 1:
        raise ValueError(f"sample: eta must be in [0, 1], got {eta}")
    guided = guidance_scale != 1.0
    if guided and class_labels is None and encoder_hidden_states is None:
        raise ValueError("sample: guidance_scale != 1 needs class_labels or encoder_hidden_states to guide with")
    if class_labels is not None:
        if not isinstance(class_labels, Tensor):  # (an AttributeError on .to before)
            raise TypeError(f"sample: class_labels must be a tensor of class ids or None, got {type(class_labels).__name__}")
        class_labels = class_labels.to(device)
    labels, context, mask = class_labels, encoder_hidden_states, encoder_attention_mask
    if guided:
        if class_labels is not None:
            if null_class_label is None:
                n = getattr(getattr(model, "config", None), "num_class_embeds", None)
                if not n:
                    raise ValueError("sample: null_class_label is needed for guidance (the model has no num_class_embeds)")
                null_class_label = n - 1
            labels = torch.cat([torch.full_like(class_labels, null_class_label), class_labels])
        if encoder_hidden_states is not None:
            null = null_encoder_hidden_states if null_encoder_hidden_states is not None else torch.zeros_like(encoder_hidden_states)
            context = torch.cat([null.to(encoder_hidden_states).expand_as(encoder_hidden_states), encoder_hidden_states])
            if mask is not None:
                mask = torch.cat([torch.ones_like(mask), mask])
    scheduler.set_timesteps(num_inference_steps)
    kw = {}
    if labels is not None:
        kw["class_labels"] = labels
    if context is not None:
        kw["encoder_hidden_states"] = context
        if mask is not None:
            kw["encoder_attention_mask"] = mask
    # on a GPU the model's calls replay a CUDA graph from the fourth step on (FASTARCH_CUDA_GRAPHS=0: not;
    # on the CPU GraphedCall calls the model)
    graphs = len(scheduler.timesteps) >= MIN_GRAPHED_STEPS and cuda_graphs.enabled()
    call = _graphed(model) if graphs else model
    on_device = scheduler.timesteps.to(device)  # (one copy: a step's timestep needs no transfer)
    steps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    for i, t in enumerate(steps):
        inp = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        out = call(inp, on_device[i], **kw)
        if guided:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        if isinstance(scheduler, DDIMScheduler):
            x = scheduler.step(out, t, x, eta=eta, generator=generator)
        else:
            x = scheduler.step(out, t, x, generator=generator)
    return x


def _graphed(model: nn.Module) -> cuda_graphs.GraphedCall:
    """The model's GraphedCall for sampling, kept on the model (in its __dict__: no state_dict
    entry, gone with it), so that a later sample() of the same shapes replays the graphs the
    first one made rather than capturing again (two eager steps' time and a capture)."""
    call = model.__dict__.get(_SAMPLING_CALL)
    if not isinstance(call, cuda_graphs.GraphedCall):
        call = model.__dict__[_SAMPLING_CALL] = cuda_graphs.GraphedCall(model, model, "sampling")
    return call


_SAMPLING_CALL = "_fastarch_sampling_call"

__all__ = ["DDIMScheduler", "DDPMScheduler", "make_betas", "sample"]
