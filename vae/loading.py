"""Loading the VAE from SD v1.5's single file or a diffusers folder, strictly.

The single file keeps LDM names under `first_stage_model.` (our module paths). A diffusers
`vae/diffusion_pytorch_model.safetensors` renames blocks, reverses the decoder's level order and
stores the mid-block attention projections as linear weights (C, C) instead of 1x1 convs
(C, C, 1, 1); `diffusers_to_ldm_table` plus the reshape in `diffusers_to_ldm` is the one mapping.
"""
from __future__ import annotations

from pathlib import Path

import torch

from common.weights import SDPart, check_values, load_sd_part, rename_by_prefix
from .model import VAE_LIMITS, AutoencoderKL, VAEConfig

SD_VAE_PREFIX = "first_stage_model."

# Inside blocks: diffusers name -> LDM name (older diffusers files use query/key/value/proj_attn).
INNER_NAMES = {"conv_shortcut": "nin_shortcut", "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
               "to_out.0": "proj_out", "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def diffusers_to_ldm_table(cfg: VAEConfig) -> dict[str, str]:
    """Block prefixes, diffusers -> LDM, for a VAE of config `cfg`."""
    levels = len(cfg.ch_mult)
    table = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for part in ("encoder", "decoder"):
        table[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        table[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        table[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            table[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        table[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        for j in range(cfg.num_res_blocks + 1):  # diffusers runs up_blocks in order; LDM indexes by level
            table[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{levels - 1 - i}.block.{j}."
        table[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{levels - 1 - i}.upsample.conv."
    return table


def diffusers_to_ldm(state: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to LDM keys; attention projections become 1x1
    conv weights. Unmatched keys are kept as they are, so a strict load names them."""
    def inner(prefix, rest, value):
        name, _, leaf = rest.rpartition(".")
        if ".attentions." in prefix and leaf == "weight" and value.dim() == 2:
            value = value[:, :, None, None]
        return (f"{INNER_NAMES.get(name, name)}.{leaf}" if name else leaf), value
    return rename_by_prefix(state, diffusers_to_ldm_table(cfg), inner)


# The keys of a diffusers vae/config.json that config_from_diffusers reads, and their bounds (as VAE_LIMITS).
DIFFUSERS_TYPES = dict(in_channels=int, out_channels=int, latent_channels=int, block_out_channels=tuple,
                       layers_per_block=int)
DIFFUSERS_LIMITS = dict(in_channels=VAE_LIMITS["in_channels"], out_channels=VAE_LIMITS["out_ch"],
                        latent_channels=VAE_LIMITS["z_channels"], block_out_channels=(1, 65536),
                        layers_per_block=VAE_LIMITS["num_res_blocks"])


def config_from_diffusers(d: dict) -> VAEConfig:
    """VAEConfig from a diffusers `vae/config.json` (AutoencoderKL); the values it reads are checked
    (FieldError naming the key)."""
    check_values(d, DIFFUSERS_TYPES, limits=DIFFUSERS_LIMITS, lengths={"block_out_channels": (1, 8)}, unknown=True)
    channels = list(d.get("block_out_channels", (128, 256, 512, 512)))
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first")
    z = d.get("latent_channels", 4)
    # `resolution` only places level attention, which diffusers' AutoencoderKL has none of; diffusers'
    # `sample_size` (512 for SD) is a different notion, so LDM's value stays.
    return VAEConfig(embed_dim=z, z_channels=z, in_channels=d.get("in_channels", 3),
                     out_ch=d.get("out_channels", 3), ch=ch, ch_mult=tuple(c // ch for c in channels),
                     num_res_blocks=d.get("layers_per_block", 2))


PART = SDPart(name="VAE", subfolder="vae", sd_prefix=SD_VAE_PREFIX, diffusers_layout="diffusers-vae",
              ldm_layout="ldm-vae", build=AutoencoderKL, default_config=VAEConfig.sd15, config_from_diffusers=config_from_diffusers,
              diffusers_to_ldm=diffusers_to_ldm)


def load_vae(path: str | Path, cfg: VAEConfig | None = None, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """The VAE from SD's single file (`first_stage_model.*`; everything else ignored), a diffusers folder
    (`vae/diffusion_pytorch_model.safetensors`, or that file) or a bare LDM-named file. Config:
    `cfg`, else the diffusers `config.json` beside the file, else SD v1.5's."""
    return load_sd_part(PART, path, cfg, device=device, dtype=dtype)
