"""The discrete-time DDPM noise schedule of Stable Diffusion v1.5 (Ho et al. 2020; LDM's "scaled_linear" betas).

The forward process is q(x_t | x_0) = N(sqrt(acp_t) x_0, (1 - acp_t) I) with acp_t = prod_{s<=t} (1 - beta_s)
(Ho et al. 2020, eq. 4), t = 0 .. 999. Everything is float32, computed exactly as diffusers computes it (LDM
builds the same betas in float64 and rounds them), so sampler coefficients agree with diffusers' to the last bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


PREDICTIONS = ("epsilon", "v_prediction")  # diffusers' prediction_type names


@dataclass(frozen=True)
class NoiseSchedule:
    """The betas, and what the model predicts: the noise ("epsilon", SD v1.5) or the velocity
    v = sqrt(acp_t) eps - sqrt(1 - acp_t) x_0 ("v_prediction", Salimans & Ho 2022, sec. 4; SD 2's
    768-px models). Near pure noise an eps model's x_0 = (x_t - sqrt(1 - acp_t) eps) / sqrt(acp_t)
    divides its error by sqrt(acp_t); a v model predicts -x_0 there directly."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction: str = "epsilon"

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")

    @classmethod
    def sd15(cls) -> NoiseSchedule:
        """The schedule SD v1.5 was trained with (its `v1-inference.yaml` / diffusers scheduler config)."""
        return cls()

    @cached_property
    def betas(self) -> torch.Tensor:
        """(T,) float32: linear in sqrt(beta), squared ("scaled_linear")."""
        return torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, self.num_train_timesteps,
                              dtype=torch.float32) ** 2

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float32 acp_t = prod_{s<=t} (1 - beta_s); acp_0 ~ 0.99915, acp_999 ~ 0.0046601."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """(T,) float32 noise levels of the equivalent variance-exploding process (Karras et al. 2022, sec. 2):
        x_t / sqrt(acp_t) = x_0 + sigma_t * noise, sigma_t = sqrt((1 - acp_t) / acp_t)."""
        acp = self.alphas_cumprod
        return ((1 - acp) / acp) ** 0.5

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) for training: sqrt(acp_t) x0 + sqrt(1 - acp_t) noise (Ho et al. 2020, eq. 4).

        x0, noise: (B, ...); timesteps: (B,) integer tensor. Computed in x0's dtype, as diffusers does.
        """
        acp = self._acp(timesteps, x0)
        return acp ** 0.5 * x0 + (1 - acp) ** 0.5 * noise

    def _acp(self, timesteps, like: torch.Tensor) -> torch.Tensor:
        """acp at integer timesteps (the Euler samplers carry theirs as floats), shaped to broadcast over `like`."""
        t = torch.as_tensor(timesteps)
        if t.is_floating_point():
            if not torch.equal(t, t.round()):
                raise ValueError(f"timesteps must be whole numbers, got {t.tolist()}")
            t = t.long()
        acp = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[t.to(like.device)]
        return acp.reshape(-1, *([1] * (like.dim() - 1))) if acp.dim() else acp

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model learns to output for x_t = add_noise(x0, noise, timesteps): the noise, or
        v = sqrt(acp_t) noise - sqrt(1 - acp_t) x0 (diffusers' `get_velocity`)."""
        if self.prediction == "epsilon":
            return noise
        acp = self._acp(timesteps, x0)
        return acp ** 0.5 * noise - (1 - acp) ** 0.5 * x0

    def to_eps(self, output: torch.Tensor, x_t: torch.Tensor, timesteps) -> torch.Tensor:
        """The noise prediction that a model output at (x_t, timesteps) stands for, which is what the
        samplers take: eps = sqrt(acp_t) v + sqrt(1 - acp_t) x_t for a v model (since acp + (1 - acp) = 1)."""
        if self.prediction == "epsilon":
            return output
        acp = self._acp(timesteps, x_t)
        return acp ** 0.5 * output + (1 - acp) ** 0.5 * x_t
