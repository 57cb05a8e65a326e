"""Loading the U-Net from SD v1.5's single file or a diffusers folder, strictly.

The single file keeps LDM names under `model.diffusion_model.`, which are our module paths. A
diffusers `unet/diffusion_pytorch_model.safetensors` uses other names for the same tensors (same
shapes); `diffusers_to_ldm_table` is the one place that maps them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from common.weights import SDPart, check_values, load_sd_part, rename_by_prefix
from .model import UNET_HEADS, UNET_LIMITS, UNet, UNetConfig

SD_UNET_PREFIX = "model.diffusion_model."

# Inside a ResBlock: diffusers name -> LDM name.
RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def diffusers_to_ldm_table(cfg: UNetConfig) -> dict[str, str]:
    """Block prefixes, diffusers -> LDM, for a U-Net of config `cfg`. Inside attention blocks the
    names agree; inside ResBlocks `RESNET_NAMES` applies."""
    n, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    table = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
             "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
             "mid_block.resnets.1.": "middle_block.2."}
    for i in range(levels):
        for j in range(n):  # LDM input block 0 is conv_in; each level has n blocks + a downsampler
            table[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(n + 1) * i + j + 1}.0."
            table[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(n + 1) * i + j + 1}.1."
        if i < levels - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(n + 1) * (i + 1)}.0.op."
        for j in range(n + 1):  # up block i is LDM level (levels - 1 - i)
            table[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(n + 1) * i + j}.0."
            table[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(n + 1) * i + j}.1."
        if i < levels - 1:
            has_attention = 2 ** (levels - 1 - i) in cfg.attention_resolutions
            table[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{(n + 1) * i + n}.{2 if has_attention else 1}.conv."
    return table


def diffusers_to_ldm(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet2DConditionModel state dict to LDM keys (unmatched keys kept, so that
    the strict load names them as unexpected)."""
    def inner(prefix, rest, value):
        if ".resnets." in prefix:
            head, _, tail = rest.partition(".")
            rest = f"{RESNET_NAMES.get(head, head)}.{tail}"
        return rest, value
    return rename_by_prefix(state, diffusers_to_ldm_table(cfg), inner)


# The keys of a diffusers unet/config.json that config_from_diffusers reads, and their bounds (as UNET_LIMITS).
DIFFUSERS_TYPES = dict(in_channels=int, out_channels=int, block_out_channels=tuple, down_block_types=tuple[str, ...],
                       layers_per_block=int, num_attention_heads=int | tuple | None,
                       attention_head_dim=int | tuple | None,
                       transformer_layers_per_block=int | tuple, cross_attention_dim=int, use_linear_projection=bool,
                       norm_num_groups=int)
DIFFUSERS_LIMITS = dict(in_channels=UNET_LIMITS["in_channels"], out_channels=UNET_LIMITS["out_channels"],
                        block_out_channels=(1, 65536), layers_per_block=UNET_LIMITS["num_res_blocks"],
                        num_attention_heads=(1, UNET_HEADS["num_heads"]), attention_head_dim=(1, 65536),
                        transformer_layers_per_block=UNET_LIMITS["transformer_depth"],
                        cross_attention_dim=UNET_LIMITS["context_dim"], norm_num_groups=UNET_LIMITS["norm_groups"])


def config_from_diffusers(d: dict) -> UNetConfig:
    """UNetConfig from a diffusers `unet/config.json` (UNet2DConditionModel); the values it reads are
    checked (FieldError naming the key)."""
    check_values(d, DIFFUSERS_TYPES, limits=DIFFUSERS_LIMITS, unknown=True,
                 lengths={"block_out_channels": (1, 8), "down_block_types": (1, 8)})
    channels = list(d.get("block_out_channels", (320, 640, 1280, 1280)))
    mc = channels[0]
    if any(c % mc for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first")
    down = d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    attention_resolutions = tuple(2 ** i for i, t in enumerate(down) if t.startswith("CrossAttn"))
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    num_heads, num_head_channels = -1, -1
    if isinstance(heads, int):
        num_heads = heads
    else:  # per level (SD 2): a fixed head width
        widths = {c // h for c, h in zip(channels, heads)}
        if len(widths) != 1:
            raise ValueError(f"attention_head_dim {heads} gives head widths {sorted(widths)}; only one is supported")
        num_head_channels = widths.pop()
    depth = d.get("transformer_layers_per_block", 1)
    return UNetConfig(in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4), model_channels=mc,
                      attention_resolutions=attention_resolutions, num_res_blocks=d.get("layers_per_block", 2),
                      channel_mult=tuple(c // mc for c in channels), num_heads=num_heads,
                      transformer_depth=depth if isinstance(depth, int) else tuple(depth),
                      context_dim=d.get("cross_attention_dim", 768),
                      use_linear_in_transformer=d.get("use_linear_projection", False),
                      num_head_channels=num_head_channels, norm_groups=d.get("norm_num_groups", 32))


PART = SDPart(name="U-Net", subfolder="unet", sd_prefix=SD_UNET_PREFIX, diffusers_layout="diffusers-unet",
              ldm_layout="ldm-unet", build=UNet, default_config=UNetConfig.sd15, config_from_diffusers=config_from_diffusers,
              diffusers_to_ldm=diffusers_to_ldm)


def load_unet(path: str | Path, cfg: UNetConfig | None = None, *, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> UNet:
    """The U-Net from SD's single file (`model.diffusion_model.*`; everything else ignored), a diffusers folder
    (`unet/diffusion_pytorch_model.safetensors`, or that file) or a bare LDM-named file. Config:
    `cfg`, else the diffusers `config.json` beside the file, else SD v1.5's."""
    return load_sd_part(PART, path, cfg, device=device, dtype=dtype)
