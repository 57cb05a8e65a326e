"""The Stable Diffusion v1.5 VAE (AutoencoderKL) with native LDM keys (docs/design.md section 2)."""
from .loading import config_from_diffusers, diffusers_to_ldm, diffusers_to_ldm_table, load_vae
from .model import AutoencoderKL, DiagonalGaussian, VAEConfig
from .pixel import PixelSpace, PixelSpaceConfig, PointMass

__all__ = ["AutoencoderKL", "VAEConfig", "DiagonalGaussian", "load_vae", "diffusers_to_ldm", "diffusers_to_ldm_table",
           "config_from_diffusers", "PixelSpace", "PixelSpaceConfig", "PointMass"]
