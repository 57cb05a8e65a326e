"""No autoencoder at all: "latents" are the pixels. The tiny training preset diffuses in pixel
space, because a VAE cannot be trained within the demo's minutes and a random one is no codec.
It has AutoencoderKL's interface, so every caller treats both alike (with latent scale 1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class PixelSpaceConfig:
    channels: int = 3

    @property
    def downscale(self) -> int:
        return 1

    @property
    def embed_dim(self) -> int:
        return self.channels


class PointMass:
    """The posterior of the identity encoder: exactly its input (std 0)."""

    def __init__(self, x: torch.Tensor):
        self.mean, self.std = x, torch.zeros_like(x)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean


class PixelSpace(nn.Module):
    latent_scale = 1.0

    def __init__(self, cfg: PixelSpaceConfig | None = None):
        super().__init__()
        self.config = cfg or PixelSpaceConfig()

    def encode(self, x: torch.Tensor) -> PointMass:
        if x.dim() != 4 or x.shape[1] != self.config.channels:
            raise ValueError(f"encode expects (B, {self.config.channels}, H, W), got {tuple(x.shape)}")
        return PointMass(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def set_attention(self, **_) -> None:
        pass
