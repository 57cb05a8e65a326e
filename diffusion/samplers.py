"""SD v1.5 samplers: PNDM (PLMS), DDIM, Euler, Euler ancestral and DPM-Solver++(2M), behind one interface.

    s = make_sampler("ddim", 50)
    x = torch.randn(shape, generator=g) * s.init_noise_sigma
    for i, t in enumerate(s.timesteps):
        eps = unet(s.scale_model_input(x, i), t, context)
        x = s.step(eps, i, x, generator=g)

Every step equals diffusers' scheduler of the same method built from SD v1.5's scheduler config ("leading"
timestep spacing with steps_offset 1, set_alpha_to_one False, epsilon prediction), including its timesteps and
the order in which stochastic samplers draw noise. A sampler holds the multistep state of one generation: make a
fresh one for each. Samplers take noise predictions: a v-prediction model's output goes through
`NoiseSchedule.to_eps(output, model input, t)` first, as `diffusion.sd15.text_to_image` does.

PNDM, DDIM and DPM-Solver work on the variance-preserving x_t = sqrt(acp_t) x_0 + sqrt(1 - acp_t) eps. The Euler
samplers integrate in sigma = sqrt((1 - acp_t) / acp_t) on x_t / sqrt(acp_t) = x_0 + sigma eps (Karras et al. 2022),
hence their init_noise_sigma > 1 and the input scaling 1 / sqrt(sigma^2 + 1) that turns x back into x_t.
"""
from __future__ import annotations

import torch

from .schedule import NoiseSchedule


def _leading(num_steps: int, stride: int) -> torch.Tensor:
    """Descending timesteps stride * k + 1, k = num_steps - 1 .. 0: "leading" spacing with steps_offset 1
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2)."""
    return torch.arange(num_steps - 1, -1, -1, dtype=torch.int64) * stride + 1


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn as diffusers' randn_tensor draws it: on the generator's device
    (so a CPU generator gives the same numbers whatever device x is on), then moved to x's."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


class Sampler:
    """The common interface. Subclasses set `timesteps` (and `init_noise_sigma`) and implement `step`."""

    timesteps: torch.Tensor
    init_noise_sigma: float = 1.0

    def __init__(self, num_steps: int, schedule: NoiseSchedule) -> None:
        T = schedule.num_train_timesteps
        if not 1 <= num_steps < T:
            raise ValueError(f"num_steps must be in [1, {T - 1}], got {num_steps}")
        self.num_steps = num_steps
        self.schedule = schedule
        self.alphas_cumprod = schedule.alphas_cumprod
        self._next_step = 0

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """What the model sees at step i."""
        return x

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """x at timesteps[i] and the model's noise prediction there -> x at the next noise level."""
        raise NotImplementedError

    def _in_order(self, i: int) -> None:
        # Multistep samplers keep state from earlier steps, so steps must come 0, 1, 2, ... exactly once.
        if i != self._next_step:
            raise RuntimeError(f"{type(self).__name__}.step got i={i}, expected {self._next_step}: steps must run in "
                               "order, and a sampler serves one generation only")
        self._next_step += 1

    def _acp(self, t: int) -> torch.Tensor:
        # Below t = 0 (the step that ends sampling) DDIM/PNDM use acp_0, not 1: SD's set_alpha_to_one=False.
        return self.alphas_cumprod[max(t, 0)]


class PNDM(Sampler):
    """PLMS, the pseudo linear multistep method (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
    Manifolds": transfer eq. 9, 4th-order Adams-Bashforth eq. 12), as diffusers' PNDMScheduler(skip_prk_steps=True).

    Its start is peculiar: step 0 is a plain transfer from t_0 to t_1, and step 1 redoes that transfer from x_{t_0}
    with the mean of the predictions at t_0 and (the first guess of) x_{t_1}. So t_1 appears twice in `timesteps`:
    num_steps + 1 model calls (1 when num_steps is 1). Then 2-, 3-, 4-step Adams-Bashforth as history allows.
    """

    def __init__(self, num_steps: int, schedule: NoiseSchedule) -> None:
        super().__init__(num_steps, schedule)
        self.stride = schedule.num_train_timesteps // num_steps
        t = _leading(num_steps, self.stride)
        self.timesteps = torch.cat([t[:1], t[1:2], t[1:]])
        self._eps: list[torch.Tensor] = []  # Adams-Bashforth history, newest last (not the step-1 prediction)
        self._x_start: torch.Tensor | None = None

    def _transfer(self, x: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor) -> torch.Tensor:
        """Eq. 9: x_{t_prev} from x_t and a noise estimate; algebraically a deterministic DDIM step."""
        a, a_prev = self._acp(t), self._acp(t_prev)
        denom = a * (1 - a_prev) ** 0.5 + (a * (1 - a) * a_prev) ** 0.5
        return (a_prev / a) ** 0.5 * x - (a_prev - a) * eps / denom

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        self._in_order(i)
        t = int(self.timesteps[i])
        if i == 1:
            x_start, self._x_start = self._x_start, None
            return self._transfer(x_start, t + self.stride, t, (model_output + self._eps[-1]) / 2)
        if i == 0:
            self._x_start = x
        self._eps = self._eps[-3:] + [model_output]
        e = self._eps[::-1]
        if len(e) == 1:
            eps = e[0]
        elif len(e) == 2:
            eps = (3 * e[0] - e[1]) / 2
        elif len(e) == 3:
            eps = (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
        else:
            eps = (1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])
        return self._transfer(x, t, t - self.stride, eps)


class DDIM(Sampler):
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12, with sigma_t of eq. 16 times eta):
    eta = 0 is the deterministic DDIM, eta = 1 ancestral DDPM sampling. `clip_sample` clamps the x_0
    prediction to [-clip_sample, clip_sample] (diffusers' clip_sample; for pixel-space models, whose x_0
    predictions at high noise explode otherwise)."""

    def __init__(self, num_steps: int, schedule: NoiseSchedule, eta: float = 0.0,
                 clip_sample: float | None = None) -> None:
        super().__init__(num_steps, schedule)
        self.eta = float(eta)
        self.clip_sample = clip_sample
        self.stride = schedule.num_train_timesteps // num_steps
        self.timesteps = _leading(num_steps, self.stride)

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        t = int(self.timesteps[i])
        a, a_prev = self._acp(t), self._acp(t - self.stride)
        x0 = (x - (1 - a) ** 0.5 * model_output) / a ** 0.5
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
        std = self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * model_output
        if self.eta > 0:
            x_prev = x_prev + std * _noise_like(model_output, generator)
        return x_prev


class _SigmaSampler(Sampler):
    """The Euler samplers' common part: sigmas at the "leading" timesteps, then a final 0."""

    def __init__(self, num_steps: int, schedule: NoiseSchedule) -> None:
        super().__init__(num_steps, schedule)
        t = _leading(num_steps, schedule.num_train_timesteps // num_steps)
        self.timesteps = t.to(torch.float32)
        self.sigmas = torch.cat([schedule.sigmas[t], torch.zeros(1)])
        # std of x_0 + sigma_max * noise for unit-variance x_0 (diffusers' choice for "leading" spacing)
        self.init_noise_sigma = float((self.sigmas.max() ** 2 + 1) ** 0.5)

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x / (self.sigmas[i] ** 2 + 1) ** 0.5


class Euler(_SigmaSampler):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x)) / sigma (Karras et al. 2022, "Elucidating
    the Design Space of Diffusion-Based Generative Models", eq. 3 / Algorithm 2 without churn); k-diffusion's
    sample_euler. Steps run in float32 and return the model output's dtype, like diffusers."""

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.float()
        denoised = x - sigma * model_output
        d = (x - denoised) / sigma
        return (x + d * (sigma_next - sigma)).to(model_output.dtype)


class EulerAncestral(_SigmaSampler):
    """Ancestral Euler (k-diffusion's sample_euler_ancestral, eta 1): an Euler step down to sigma_down, then fresh
    noise of std sigma_up, where sigma_down^2 + sigma_up^2 = sigma_next^2 match the DDPM posterior's variance."""

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.float()
        denoised = x - sigma * model_output
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        # Drawn at the last step too (sigma_up = 0 there), so the generator advances exactly as in diffusers.
        x = x + _noise_like(model_output, generator) * sigma_up
        return x.to(model_output.dtype)


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models", Algorithm 2): a 2nd-order multistep solver of the diffusion ODE in the data prediction x_0 and the
    half log-SNR lambda = log(alpha / sigma). The first and the last step are first order (DPM-Solver-1, = DDIM),
    as in diffusers' DPMSolverMultistepScheduler (solver_order 2, midpoint, lower_order_final, final sigma 0).

    Its "leading" timesteps use stride T // (num_steps + 1): 50 steps run 951, 932, ..., 20, then to sigma 0.
    """

    def __init__(self, num_steps: int, schedule: NoiseSchedule) -> None:
        super().__init__(num_steps, schedule)
        T = schedule.num_train_timesteps
        if num_steps > T - 2:  # the first timestep would be T (diffusers clamps its sigma to sigma_{T-1})
            raise ValueError(f"num_steps must be in [1, {T - 2}] for DPM-Solver++(2M), got {num_steps}")
        stride = T // (num_steps + 1)
        self.timesteps = _leading(num_steps, stride) + stride
        sigmas = torch.cat([schedule.sigmas[self.timesteps], torch.zeros(1)])
        # VP coefficients recomputed from the VE sigmas, as diffusers does; the final sigma 0 gives alpha 1, sigma 0
        # and lambda = +inf, for which the first-order update returns the x_0 prediction exactly.
        self.alpha_t = 1 / (sigmas ** 2 + 1) ** 0.5
        self.sigma_t = sigmas * self.alpha_t
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self._x0_prev: torch.Tensor | None = None

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        self._in_order(i)
        alpha_s, sigma_s, lambda_s = self.alpha_t[i], self.sigma_t[i], self.lambda_t[i]
        alpha_t, sigma_t, lambda_t = self.alpha_t[i + 1], self.sigma_t[i + 1], self.lambda_t[i + 1]
        x0 = (x - sigma_s * model_output) / alpha_s  # in the model's dtype, the solver in float32: as diffusers
        x = x.float()
        h = lambda_t - lambda_s
        phi = alpha_t * (torch.exp(-h) - 1.0)
        x_next = (sigma_t / sigma_s) * x - phi * x0
        if self._x0_prev is not None and i < len(self.timesteps) - 1:
            r = (lambda_s - self.lambda_t[i - 1]) / h
            x_next = x_next - 0.5 * phi * ((1.0 / r) * (x0 - self._x0_prev))
        self._x0_prev = x0
        return x_next.to(model_output.dtype)


SAMPLERS: dict[str, type[Sampler]] = {"pndm": PNDM, "ddim": DDIM, "euler": Euler, "euler_a": EulerAncestral,
                                      "dpmpp_2m": DPMSolverPP2M}


def make_sampler(name: str, num_steps: int, schedule: NoiseSchedule | None = None, **kwargs) -> Sampler:
    """A fresh sampler `name` (a key of SAMPLERS) for `num_steps` steps; kwargs go to its class (DDIM's eta)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](num_steps, schedule or NoiseSchedule.sd15(), **kwargs)
