"""The noise schedule and the samplers against diffusers' schedulers under SD v1.5's scheduler config.

Whole trajectories run a deterministic, nonlinear fake model through ours and through the diffusers loop of
StableDiffusionPipeline (set_timesteps, scale_model_input, step(...).prev_sample) from the same initial noise and,
for stochastic samplers, the same generator seed; every intermediate x must agree.
"""
import inspect

import diffusers
import pytest
import torch

from bench.oracles import SAMPLERS as SAMPLERS_IN_DIFFUSERS, scheduler_config
from diffusion import SAMPLERS, NoiseSchedule, make_sampler
from helpers import rel_err

SD_SCHEDULER = scheduler_config(NoiseSchedule.sd15())
DIFFUSERS_CLASS = SAMPLERS_IN_DIFFUSERS
SHAPE = (2, 4, 7, 9)
STEPS = [1, 2, 3, 7, 20, 50]
CASES = [(name, {}) for name in SAMPLERS] + [("ddim", {"eta": 1.0})]

# diffusers' schedulers call np.array on tensors, which numpy 2 flags; not ours to fix.


def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.3 * torch.tanh(x) + 0.01 * t.float() / 1000 * x.flip(-1)


def diffusers_scheduler(name: str):
    return getattr(diffusers, DIFFUSERS_CLASS[name]).from_config(SD_SCHEDULER)


def run_ours(name: str, steps: int, noise: torch.Tensor, seed: int = 0, **kwargs):
    s = make_sampler(name, steps, **kwargs)
    g = torch.Generator().manual_seed(seed)
    x = noise * s.init_noise_sigma
    xs = []
    for i, t in enumerate(s.timesteps):
        x = s.step(fake_model(s.scale_model_input(x, i), t), i, x, generator=g)
        xs.append(x)
    return s, xs


def run_diffusers(name: str, steps: int, noise: torch.Tensor, seed: int = 0, **kwargs):
    sched = diffusers_scheduler(name)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    extra = dict(kwargs)
    if "generator" in inspect.signature(sched.step).parameters:
        extra["generator"] = g
    x = noise * sched.init_noise_sigma
    xs = []
    for t in sched.timesteps:
        x = sched.step(fake_model(sched.scale_model_input(x, t), t), t, x, **extra).prev_sample
        xs.append(x)
    return sched, xs


def test_schedule_equals_diffusers():
    ours, ref = NoiseSchedule.sd15(), diffusers.DDPMScheduler.from_config(SD_SCHEDULER)
    assert torch.equal(ours.betas, ref.betas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert ours.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-6)
    assert ours.alphas_cumprod[999].item() == pytest.approx(0.0046601, abs=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_noise_equals_diffusers(dtype):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 7, 9, generator=g, dtype=dtype)
    noise = torch.randn(5, 4, 7, 9, generator=g, dtype=dtype)
    t = torch.tensor([0, 1, 500, 998, 999])
    ours = NoiseSchedule.sd15().add_noise(x0, noise, t)
    ref = diffusers.DDPMScheduler.from_config(SD_SCHEDULER).add_noise(x0, noise, t)
    assert ours.dtype == dtype
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}{'-eta1' if k else ''}" for n, k in CASES])
def test_trajectory_equals_diffusers(name, kwargs, steps):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ours, xs = run_ours(name, steps, noise, **kwargs)
    ref, ref_xs = run_diffusers(name, steps, noise, **kwargs)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert isinstance(ours.init_noise_sigma, float)
    assert ours.init_noise_sigma == float(ref.init_noise_sigma)
    assert len(xs) == len(ref_xs)
    for i, (x, r) in enumerate(zip(xs, ref_xs)):
        assert rel_err(x, r) <= 1e-5, (i, rel_err(x, r))


@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}{'-eta1' if k else ''}" for n, k in CASES])
def test_half_precision_trajectory_equals_diffusers(name, kwargs):
    # The model's dtype is kept: coefficients are float32 scalars, Euler/DPM update in float32 and cast back.
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    _, xs = run_ours(name, 7, noise, **kwargs)
    _, ref_xs = run_diffusers(name, 7, noise, **kwargs)
    for x, r in zip(xs, ref_xs):
        assert x.dtype == r.dtype == torch.bfloat16
        assert rel_err(x, r) <= 1e-2


def test_known_timesteps():
    assert make_sampler("ddim", 50).timesteps.tolist() == list(range(981, 0, -20))
    assert make_sampler("pndm", 50).timesteps[:4].tolist() == [981, 961, 961, 941]
    assert make_sampler("dpmpp_2m", 50).timesteps[[0, -1]].tolist() == [951, 20]
    assert make_sampler("euler", 50).init_noise_sigma == pytest.approx(13.1585, abs=1e-4)


@pytest.mark.parametrize("name,kwargs", [("euler_a", {}), ("ddim", {"eta": 1.0})])
def test_stochastic_samplers_follow_the_seed(name, kwargs):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    a = run_ours(name, 7, noise, seed=3, **kwargs)[1][-1]
    b = run_ours(name, 7, noise, seed=3, **kwargs)[1][-1]
    c = run_ours(name, 7, noise, seed=4, **kwargs)[1][-1]
    assert torch.equal(a, b)
    assert rel_err(a, c) > 1e-2


def test_make_sampler_rejects_unknown_names_and_bad_counts():
    with pytest.raises(ValueError, match="unknown sampler 'heun'; choose one of pndm, ddim, euler, euler_a, dpmpp_2m"):
        make_sampler("heun", 10)
    with pytest.raises(ValueError, match="num_steps must be in"):
        make_sampler("ddim", 0)


@pytest.mark.parametrize("name", ["pndm", "dpmpp_2m"])
def test_multistep_samplers_refuse_steps_out_of_order(name):
    s = make_sampler(name, 5)
    x = torch.zeros(SHAPE)
    s.step(x, 0, x)
    with pytest.raises(RuntimeError, match="expected 1"):
        s.step(x, 0, x)


def test_ddim_clip_sample_with_another_schedule_equals_diffusers():
    """The tiny training preset's pixel-space sampling: beta_end 0.03 and x_0 clamped to [-1, 1]
    (diffusers' clip_sample), checked on a model whose x_0 predictions leave the range."""
    from diffusion.schedule import NoiseSchedule
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    s = make_sampler("ddim", 10, NoiseSchedule(beta_end=0.03), clip_sample=1.0)
    sched = diffusers.DDIMScheduler.from_config({**SD_SCHEDULER, "beta_end": 0.03, "clip_sample": True,
                                                 "clip_sample_range": 1.0})
    sched.set_timesteps(10)
    x, r = noise.clone(), noise.clone()
    for i, t in enumerate(s.timesteps):
        x = s.step(fake_model(x, t) * 1.5, i, x)
        r = sched.step(fake_model(r, t) * 1.5, t, r).prev_sample
        assert rel_err(x, r) <= 1e-5, (i, rel_err(x, r))
    unclipped = make_sampler("ddim", 10, NoiseSchedule(beta_end=0.03))
    y = noise.clone()
    for i, t in enumerate(unclipped.timesteps):
        y = unclipped.step(fake_model(y, t) * 1.5, i, y)
    assert not torch.allclose(x, y)  # the clamp was active


# -- v-prediction: the model's output goes through NoiseSchedule.to_eps before any sampler ---------

def test_v_target_equals_diffusers_velocity_and_round_trips():
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(5, 3, 7, 9, generator=g), torch.randn(5, 3, 7, 9, generator=g)
    t = torch.tensor([0, 1, 417, 998, 999])
    for beta_end in (0.012, 0.03):
        v = NoiseSchedule(beta_end=beta_end, prediction="v_prediction")
        ref = diffusers.DDPMScheduler.from_config({**SD_SCHEDULER, "beta_end": beta_end}).get_velocity(x0, noise, t)
        assert torch.allclose(v.target(x0, noise, t), ref, rtol=0, atol=1e-6)
        # eps from (v, x_t) is the noise that made x_t
        x_t = v.add_noise(x0, noise, t)
        assert torch.allclose(v.to_eps(v.target(x0, noise, t), x_t, t), noise, rtol=0, atol=1e-5)
    eps = NoiseSchedule()
    assert eps.target(x0, noise, t) is noise and eps.to_eps(x0, noise, t) is x0
    with pytest.raises(ValueError, match="prediction"):
        NoiseSchedule(prediction="x0")


@pytest.mark.parametrize("name,kwargs", [c for c in CASES if c[0] != "pndm"])
def test_v_prediction_trajectories_equal_diffusers(name, kwargs):
    """Our loop (sampler fed `to_eps(output, model input, t)`) against diffusers' scheduler built
    with prediction_type "v_prediction", whole trajectories, every intermediate x.

    Not PNDM: diffusers' PLMS extrapolates the raw v outputs of earlier steps and converts the
    combination with the current x_t and t, while v at different (x_t, t) are not comparable
    quantities; ours extrapolates the eps that each output stands for (PLMS on eps, as for an eps
    model, whose parity test is above)."""
    schedule = NoiseSchedule(prediction="v_prediction")
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    s = make_sampler(name, 20, schedule, **kwargs)
    sched = getattr(diffusers, DIFFUSERS_CLASS[name]).from_config({**SD_SCHEDULER, "prediction_type": "v_prediction"})
    sched.set_timesteps(20)
    g_ours, g_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    extra = dict(kwargs)
    if "generator" in inspect.signature(sched.step).parameters:
        extra["generator"] = g_ref
    x, r = noise * s.init_noise_sigma, noise * sched.init_noise_sigma
    for i, (t, t_ref) in enumerate(zip(s.timesteps, sched.timesteps)):
        model_in = s.scale_model_input(x, i)
        x = s.step(schedule.to_eps(fake_model(model_in, t), model_in, t), i, x, generator=g_ours)
        r = sched.step(fake_model(sched.scale_model_input(r, t_ref), t_ref), t_ref, r, **extra).prev_sample
        assert rel_err(x, r) <= 2e-5, (i, rel_err(x, r))


def test_v_prediction_ddim_clip_sample_in_the_tiny_schedule_equals_diffusers():
    """The tiny preset's sampling: v-prediction, beta_end 0.03, x_0 clamped to [-1, 1]."""
    schedule = NoiseSchedule(beta_end=0.03, prediction="v_prediction")
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    s = make_sampler("ddim", 25, schedule, clip_sample=1.0)
    sched = diffusers.DDIMScheduler.from_config({**SD_SCHEDULER, "beta_end": 0.03, "clip_sample": True,
                                                 "clip_sample_range": 1.0, "prediction_type": "v_prediction"})
    sched.set_timesteps(25)
    x, r = noise.clone(), noise.clone()
    for i, t in enumerate(s.timesteps):
        x = s.step(schedule.to_eps(fake_model(x, t) * 3, x, t), i, x)
        r = sched.step(fake_model(r, t) * 3, t, r).prev_sample
        assert rel_err(x, r) <= 2e-5, (i, rel_err(x, r))
