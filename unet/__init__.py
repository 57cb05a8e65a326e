"""The Stable Diffusion v1.5 U-Net with native LDM keys (docs/design.md section 2)."""
from .loading import config_from_diffusers, diffusers_to_ldm, diffusers_to_ldm_table, load_unet
from .model import UNet, UNetConfig, UNetEncoder, timestep_embedding

__all__ = ["UNet", "UNetEncoder", "UNetConfig", "timestep_embedding", "load_unet", "diffusers_to_ldm", "diffusers_to_ldm_table",
           "config_from_diffusers"]
