"""The discrete-time DDPM noise schedule of Stable Diffusion v1.5 (Ho et al. 2020; LDM's "scaled_linear" betas).

The forward process is q(x_t | x_0) = N(sqrt(acp_t) x_0, (1 - acp_t) I) with acp_t = prod_{s<=t} (1 - beta_s)
(Ho et al. 2020, eq. 4), t = 0 .. 999. Everything is float32, computed exactly as diffusers computes it (LDM
builds the same betas in float64 and rounds them), so sampler coefficients agree with diffusers' to the last bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012

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
        acp = self.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[timesteps.to(x0.device)]
        acp = acp.reshape(-1, *([1] * (x0.dim() - 1)))
        return acp ** 0.5 * x0 + (1 - acp) ** 0.5 * noise
