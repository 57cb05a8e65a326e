"""The Stable Diffusion v1.5 VAE (AutoencoderKL) with native LDM keys (DESIGN.md section 2)."""
from .loading import config_from_diffusers, diffusers_to_ldm, diffusers_to_ldm_table, load_vae
from .model import AutoencoderKL, DiagonalGaussian, VAEConfig

__all__ = ["AutoencoderKL", "VAEConfig", "DiagonalGaussian", "load_vae", "diffusers_to_ldm", "diffusers_to_ldm_table",
           "config_from_diffusers"]
