"""fastarch.models.schedulers against diffusers' DDPMScheduler and DDIMScheduler, and the sample()
loop against diffusers' pipeline loops (DDPMPipeline / DDIMPipeline: noise drawn from the
generator, then per step unet -> scheduler.step with the same generator).

The schedulers do diffusers' arithmetic in the same fp32 scalars, so timesteps, betas and each
step's output are compared for exact equality. The loop with diffusers' own UNet (wrapped to
return a tensor) must also be exactly equal: the same noise in the same order. With our UNet
(1e-7-relative apart per forward) the loop's result is compared to 1e-4 of its scale: the first step's x0 estimate divides the
model's output error by sqrt(alphas_cumprod[999]) ~ 6e-3 (a ~160x amplification; measured
1.5e-5 after 6 DDIM steps).
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastarch.cuda_graphs import GraphedCall
from fastarch.models.schedulers import DDIMScheduler, DDPMScheduler, sample
from fastarch.models.unet2d import UNet2D

SCHEDULES = [
    dict(),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
         clip_sample=False, timestep_spacing="trailing"),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", timestep_spacing="linspace", steps_offset=1,
         clip_sample_range=0.5),
    dict(num_train_timesteps=100, timestep_spacing="leading", steps_offset=1),
]
PAIRS = [(DDPMScheduler, diffusers.DDPMScheduler), (DDIMScheduler, diffusers.DDIMScheduler)]


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=["ddpm", "ddim"])
@pytest.mark.parametrize("config", SCHEDULES, ids=["default", "scaled_v_trailing", "cosine_sample_linspace", "short"])
def test_schedule_and_steps_equal_diffusers(ours, theirs, config):
    a, b = ours(**config), theirs(**config)
    assert torch.equal(a.betas, b.betas) and torch.equal(a.alphas_cumprod, b.alphas_cumprod)
    T = a.config.num_train_timesteps
    for n in (1, 7, 50, T - 1, T):
        if n > T:
            continue
        a.set_timesteps(n)
        b.set_timesteps(n)
        assert torch.equal(a.timesteps, b.timesteps), n
    a.set_timesteps(10)
    b.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    extra = {"eta": 0.6} if ours is DDIMScheduler else {}
    for t in a.timesteps:
        out = torch.randn(2, 3, 4, 4, generator=g)
        got = a.step(out, t, x, generator=torch.Generator().manual_seed(int(t)), **extra)
        want = b.step(out, t, x, generator=torch.Generator().manual_seed(int(t)), **extra).prev_sample
        assert torch.equal(got, want), int(t)
        x = want
    t = torch.tensor([0, T // 2, T - 1])
    x0, noise = torch.randn(3, 2, 5, 5, generator=g), torch.randn(3, 2, 5, 5, generator=g)
    assert torch.equal(a.add_noise(x0, noise, t), b.add_noise(x0, noise, t))
    assert torch.equal(a.get_velocity(x0, noise, t), b.get_velocity(x0, noise, t))


def test_from_config_reads_diffusers_configs():
    """A scheduler_config.json as diffusers writes it (with _class_name, _diffusers_version and
    another scheduler's fields) reads into either scheduler; to_config goes back into diffusers."""
    config = dict(diffusers.DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction").config)
    ddpm = DDPMScheduler.from_config(config)
    assert ddpm.config.beta_schedule == "scaled_linear" and ddpm.config.prediction_type == "v_prediction"
    ddim = DDIMScheduler.from_config(config)
    assert ddim.config.set_alpha_to_one is True
    back = diffusers.DDIMScheduler.from_config(ddim.to_config())
    assert torch.equal(back.alphas_cumprod, ddim.alphas_cumprod)


def test_save_pretrained_round_trips_through_diffusers(tmp_path):
    ours = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False)
    ours.save_pretrained(tmp_path)
    theirs = diffusers.DDPMScheduler.from_pretrained(tmp_path)
    assert theirs.config.prediction_type == "v_prediction" and torch.equal(theirs.alphas_cumprod, ours.alphas_cumprod)
    again = DDIMScheduler.from_pretrained(tmp_path)
    assert again.config.beta_schedule == "squaredcos_cap_v2" and again.config.clip_sample is False


@pytest.mark.parametrize("config, match", [
    (dict(thresholding=True), "thresholding"),
    (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    (dict(beta_schedule="sigmoid"), "beta_schedule 'sigmoid'"),
    (dict(prediction_type="flow"), "prediction_type 'flow'"),
    (dict(timestep_spacing="karras"), "timestep_spacing 'karras'"),
])
def test_unsupported_scheduler_config_refused(config, match):
    for cls in (DDPMScheduler, DDIMScheduler):
        with pytest.raises(ValueError, match=match):
            cls(**config)
    with pytest.raises(ValueError, match="variance_type 'learned'"):
        DDPMScheduler(variance_type="learned")


def test_step_errors():
    s = DDIMScheduler()
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        s.step(x, 999, x)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="differ in shape"):
        s.step(torch.zeros(1, 3, 4, 5), 900, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(1001)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):  # past 1: NaN samples
        s.step(x, 900, x, eta=5.0)


@pytest.mark.parametrize("config", [dict(beta_end=1.0), dict(beta_end=1.5), dict(beta_start=-0.1),
                                    dict(beta_end=float("nan")), dict(trained_betas=[0.1] * 10),
                                    dict(clip_sample_range=float("nan")),
                                    dict(clip_sample_range=10**400)],
                         ids=["end-1", "end-1.5", "start-negative", "end-nan", "trained-length", "clip-nan", "clip-past-float"])
def test_out_of_range_schedules_refused(config):
    """A beta outside [0, 1), NaN, or trained_betas of another length than num_train_timesteps
    had sampled NaN (or failed with an IndexError): each is refused at construction."""
    for cls in (DDPMScheduler, DDIMScheduler):
        with pytest.raises(ValueError, match="betas must be|clip_sample_range"):
            cls(**config)


class DiffusersUNet(torch.nn.Module):
    """diffusers' UNet as sample() calls a model: forward(...) -> Tensor, .device, .dtype."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config = unet, unet.config

    device = property(lambda self: self.unet.device)
    dtype = property(lambda self: self.unet.dtype)

    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs).sample


@torch.no_grad()
def diffusers_loop(unet, scheduler, shape, steps, seed, eta=None):
    """DDPMPipeline's / DDIMPipeline's loop, without the final [0, 1] mapping."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=unet.dtype)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        out = unet(x, t).sample
        extra = {} if eta is None else {"eta": eta}
        x = scheduler.step(out, t, x, generator=g, **extra).prev_sample
    return x


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    from test_unet2d import UNCOND, randomize

    theirs = diffusers.UNet2DModel(**{**UNCOND, "sample_size": 8}).eval()
    randomize(theirs)
    path = tmp_path_factory.mktemp("unet")
    theirs.save_pretrained(path)
    return theirs, UNet2D.from_pretrained(path)


@pytest.mark.parametrize("kind, eta", [("ddim", 0.0), ("ddim", 0.8), ("ddpm", None)])
def test_sample_loop_equals_diffusers_loop(unets, kind, eta):
    theirs, ours = unets
    make = (lambda: (DDIMScheduler(), diffusers.DDIMScheduler())) if kind == "ddim" else (
        lambda: (DDPMScheduler(), diffusers.DDPMScheduler()))
    shape, steps = (2, 3, 8, 8), 6
    mine, reference = make()
    want = diffusers_loop(theirs, reference, shape, steps, seed=5, eta=eta)
    kw = {"eta": eta} if eta is not None else {}
    same_model = sample(DiffusersUNet(theirs), mine, shape, num_inference_steps=steps, seed=5, progress=False, **kw)
    assert torch.equal(same_model, want)
    got = sample(ours, make()[0], shape, num_inference_steps=steps, seed=5, progress=False, **kw)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4


def test_classifier_free_guidance(tmp_path):
    """guidance_scale s: uncond + s * (cond - uncond), the unconditional pass with the null class
    (default: the last label) and with zeros (or the given) encoder states."""
    from test_unet2d import CONFIGS, randomize

    torch.manual_seed(0)
    model = UNet2D.from_config({"_class_name": "UNet2DConditionModel", **CONFIGS["cross_linear"][1]}).eval()
    randomize(model)
    labels, context = torch.tensor([1, 2]), torch.randn(2, 7, 24)
    noise = torch.randn(2, 4, 8, 8)
    got = sample(model, DDIMScheduler(), noise, class_labels=labels, encoder_hidden_states=context,
                 guidance_scale=3.0, num_inference_steps=3, progress=False)
    s = DDIMScheduler()
    s.set_timesteps(3)
    x = noise
    with torch.no_grad():
        for t in s.timesteps:
            cond = model(x, t, class_labels=labels, encoder_hidden_states=context)
            uncond = model(x, t, class_labels=torch.tensor([4, 4]), encoder_hidden_states=torch.zeros_like(context))
            x = s.step(uncond + 3.0 * (cond - uncond), t, x)
    # one batch of 2B against two of B: rounding apart by ~1e-7, times (2s + 1) = 7 in the
    # guidance, times ~160 in the first x0 estimate (measured 6.5e-5); a wrong null label or
    # null context moves the result by 1e-2 or more
    assert ((got - x).abs().max() / x.abs().max()).item() <= 5e-4
    with pytest.raises(ValueError, match="guidance_scale"):
        sample(model, DDIMScheduler(), noise, guidance_scale=2.0, num_inference_steps=2, progress=False)
    for bad in (float("nan"), float("inf")):  # (an all-NaN sample before)
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            sample(model, DDIMScheduler(), noise, class_labels=labels, encoder_hidden_states=context,
                   guidance_scale=bad, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        sample(model, DDIMScheduler(), noise, eta=5.0, num_inference_steps=2, progress=False)
    with pytest.raises(TypeError, match="class_labels must be a tensor of class ids or None, got list"):
        sample(model, DDIMScheduler(), noise, class_labels=[1, 2], num_inference_steps=2, progress=False)


def _guided_case():
    """A class- and text-conditional UNet with guidance: every input kind a graph keeps."""
    from test_unet2d import CONFIGS, randomize

    torch.manual_seed(0)
    model = UNet2D.from_config({"_class_name": "UNet2DConditionModel", **CONFIGS["cross_linear"][1]}).eval()
    randomize(model)
    kw = dict(class_labels=torch.tensor([1, 2]), encoder_hidden_states=torch.randn(2, 7, 24), guidance_scale=3.0,
              progress=False)
    return model, torch.randn(2, 4, 8, 8), kw


def test_sampler_keeps_its_graphed_call_on_the_model():
    """sample() graphs the model's calls through one GraphedCall kept on the model: a second
    sample() of the same shapes finds the graphs the first made (on a GPU; here, the object)."""
    model, noise, kw = _guided_case()
    keys = list(model.state_dict())
    sample(model, DDIMScheduler(), noise, num_inference_steps=9, **kw)
    call = model.__dict__["_fastarch_sampling_call"]
    sample(model, DDIMScheduler(), noise, num_inference_steps=9, **kw)
    assert model.__dict__["_fastarch_sampling_call"] is call and isinstance(call, GraphedCall)
    assert list(model.state_dict()) == keys


def test_sampler_graph_not_on_the_cpu_and_a_failed_capture_runs_eagerly(monkeypatch):
    """On the CPU no graph is taken; with the CPU's tensors let through to a capture, which
    cannot happen there, the sampler warns once and runs every step eagerly, the same sample
    as without the graph."""
    model, noise, kw = _guided_case()
    eager = sample(model, DDIMScheduler(), noise, num_inference_steps=9, **kw)
    monkeypatch.setattr(GraphedCall, "_on_graph_device", lambda self, t: True)
    monkeypatch.setattr(GraphedCall, "_warm_up", lambda self, run: run())
    with pytest.warns(RuntimeWarning, match="sampling without a CUDA graph: the capture failed") as caught:
        forced = sample(model, DDIMScheduler(), noise, num_inference_steps=9, **kw)
    assert len(caught) == 1 and torch.equal(forced, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("scheduler", [DDIMScheduler, DDPMScheduler])
def test_sampler_graph_gives_the_eager_sample(monkeypatch, scheduler):
    """On a GPU the sampler captures the model's call once (at its second step), checks its
    first replay against the eager call and replays it for every later step: the sample of the
    eager loop, bit for bit (DDPM's fresh noise each step included)."""
    model, noise, kw = _guided_case()
    model = model.cuda()
    kw = {**kw, "class_labels": kw["class_labels"].cuda(), "encoder_hidden_states": kw["encoder_hidden_states"].cuda()}
    made = []
    real_init = GraphedCall.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(GraphedCall, "__init__", spy)
    graphed = sample(model, scheduler(), noise.cuda(), num_inference_steps=12, seed=4, **kw)
    assert len(made) == 1 and made[0].kept == 1 and not made[0].refused and made[0].replays == 10
    again = sample(model, scheduler(), noise.cuda(), num_inference_steps=12, seed=4, **kw)
    assert len(made) == 1 and made[0].replays == 22  # the model's graph kept: every step a replay
    monkeypatch.setenv("FASTARCH_CUDA_GRAPHS", "0")
    eager = sample(model, scheduler(), noise.cuda(), num_inference_steps=12, seed=4, **kw)
    assert len(made) == 1 and torch.equal(graphed, eager) and torch.equal(again, eager)
