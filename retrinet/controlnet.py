"""ControlNet (Zhang et al. 2023), the paper's baseline (Sec. 3.1 and 5.2, ControlNet-a / -b;
docs/design.md section 3b): a copy of SD's encoder half reads x_t plus a hint embedding of one
reference image and adds its 13 outputs, through zero convs, to the U-Net's skips and middle feature.

    hint (B, 3, 8h, 8w) in [0, 1] --input_hint_block--> (B, C, h, w), added after conv_in
    x_t --ControlNet encoder (prompt)--> c_1 .. c_13 --zero convs--> residuals
    x_t --frozen SD encoder (prompt)--> h_1 .. h_13;  h_i <- h_i + residual_i
    SD decoder on the modified skips and middle --> eps

Unlike RetriNet's E, the ControlNet sees x_t and a pixel-aligned hint: it controls layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image

from common.images import fit_and_pad
from common.weights import check_fields, detect_layout, load_strict, read_header, read_tensors
from unet import UNet, UNetConfig, UNetEncoder
from unet.model import zero_
from .base import METADATA_KEY, MethodOptions, ReferenceUNet, file_metadata


@dataclass
class ControlNetConfig:
    hint_channels: int = 3
    # Pixels per latent cell: the hint embedding downsamples the image by this factor to the latent
    # grid (8 for SD's VAE, three stride-2 convs; 1 for a U-Net that diffuses pixels, as the tiny preset).
    hint_downscale: int = 8

    def __post_init__(self):
        if self.hint_downscale not in (1, 2, 4, 8):
            raise ValueError(f"hint_downscale must be 1, 2, 4 or 8, got {self.hint_downscale}")

    @classmethod
    def checked(cls, values, key: str = "", unet: UNetConfig | None = None) -> dict:
        """`values` (fields read from a checkpoint's metadata) of the types declared here, a hint of at most
        64 channels downscaled by 1, 2, 4 or 8; FieldError (keys prefixed by `key`) otherwise."""
        return check_fields(cls, values, key=key, limits={"hint_channels": (1, 64)},
                            choices={"hint_downscale": (1, 2, 4, 8)})


class ControlNet(UNetEncoder):
    """The ControlNet module. Keys are the official checkpoint's under `control_model.`: time_embed,
    input_blocks, middle_block, input_hint_block.{0..14}, zero_convs.{0..11}.0, middle_block_out.0."""

    def __init__(self, cfg: UNetConfig, hint_channels: int = 3, hint_downscale: int = 8):
        super().__init__(cfg)
        # 3x3 convs 3-16-16-32-32-96-96-256 (stride 2 into 32, 96, 256 for SD: the image -> latent size),
        # SiLU between, then a zero conv to model_channels.
        widths = [hint_channels, 16, 16, 32, 32, 96, 96, 256]
        strided = (2, 4, 6)[:hint_downscale.bit_length() - 1]
        layers = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers += [nn.Conv2d(a, b, 3, padding=1, stride=2 if i in strided else 1), nn.SiLU()]
        self.input_hint_block = nn.Sequential(*layers, zero_(nn.Conv2d(256, cfg.model_channels, 3, padding=1)))
        self.zero_convs = nn.ModuleList(nn.Sequential(zero_(nn.Conv2d(c, c, 1))) for c in self.skip_channels)
        self.middle_block_out = nn.Sequential(zero_(nn.Conv2d(self.middle_channels, self.middle_channels, 1)))

    def forward(self, x, hint, emb, context, context_mask=None) -> list[torch.Tensor]:
        """x (B, 4, h, w) noisy latents, hint (B, 3, 8h, 8w) in [0, 1] -> the 13 residuals."""
        skips, middle = self.encode(x, emb, context, context_mask, hint=self.input_hint_block(hint))
        return [zc(s) for zc, s in zip(self.zero_convs, skips)] + [self.middle_block_out(middle)]


class ControlNetUNet(ReferenceUNet):
    """The SD U-Net with a ControlNet: `forward(x, timesteps, context, hint) -> eps`, hint (B, 3, H, W)
    the reference image in [0, 1] at the output's pixel size. Its weights are saved under the
    official `control_model.` prefix; `load` reads our files and official ones. The default lock,
    "decoder", trains the ControlNet alone with SD frozen, as diffusers' train_controlnet.py."""

    method, title, prefix, config_class = "controlnet", "ControlNet", "control_model.", ControlNetConfig
    references, reference_at_target_size = 1, True
    # As diffusers' train_controlnet.py: one reference (the hint), SD frozen; prompts emptied at
    # train.py's rate; no face loss (Sec. 3.1 trains the baselines "without extra training tricks").
    # Its optimisation as the script's defaults (Supp. A.3: "other default settings as specified in
    # their official code bases"; the learning rate stays the preset's, one for all methods):
    # --lr_scheduler "constant", which ignores --lr_warmup_steps 500, so no warm-up; --max_grad_norm
    # 1.0; AdamW --adam_weight_decay 1e-2, --adam_epsilon 1e-8.
    training_defaults = dict(refs=references, lock="decoder", prompt_drop=0.5, face_weight=0.0,
                             schedule="constant", warmup=0, clip_grad=1.0, weight_decay=1e-2, adam_eps=1e-8)

    def __init__(self, unet: UNet, lock: str = "decoder", hint_channels: int = 3, hint_downscale: int = 8,
                 train_base: bool = False):
        super().__init__(unet, ControlNetConfig(hint_channels, hint_downscale))
        self.control = self._like_unet(ControlNet(unet.config, hint_channels, hint_downscale))
        self._init_encoder_from_unet(self.control)
        self.set_lock(lock, train_base)

    @classmethod
    def build(cls, unet: UNet, options: MethodOptions) -> "ControlNetUNet":
        return cls(unet, lock=options.lock, hint_downscale=options.hint_downscale, train_base=options.train_base)

    @classmethod
    def option_problems(cls, args) -> list[str]:
        problems = super().option_problems(args)
        if args.ref_resolution != args.resolution:
            problems.append(f"--method {cls.method}: the hint is the reference at the target's size, so "
                            f"--ref-resolution {args.ref_resolution} must equal --resolution {args.resolution}")
        return problems

    @property
    def added(self) -> ControlNet:
        return self.control

    def lockb_frozen(self) -> list[nn.Module]:
        """LockB freezes the ControlNet's encoder and hint embedding; its zero convs still train."""
        c = self.control
        return [c.time_embed, c.input_blocks, c.middle_block, c.input_hint_block]

    def forward(self, x, timesteps, context, hint):
        b = x.shape[0]
        if hint.dim() != 4 or hint.shape[:2] != (b, self.config.hint_channels):
            raise ValueError(f"hint must be ({b}, {self.config.hint_channels}, H, W), got {tuple(hint.shape)}")
        unet = self.unet
        emb = unet.embed_time(timesteps, b, x.dtype)
        with torch.set_grad_enabled(self.train_base and torch.is_grad_enabled()):  # frozen: keep no graph
            skips, middle = unet.encode(x, emb if self.train_base else emb.detach(), context)
        res = self.control(x, hint, self.control.embed_time(timesteps, b, x.dtype), context)
        return unet.decode(skips, middle, emb, context, skip_residuals=res[:-1], middle_residual=res[-1])

    @classmethod
    def load(cls, path: str | Path, unet: UNet, lock: str = "decoder") -> "ControlNetUNet":
        """A file written by `save`, or an official ControlNet file: `control_model.*` (1.1 files, or
        1.0 files holding the whole ControlLDM, whose other keys are ignored) or prefix-less keys;
        an official file has no lock of its own, so it takes `lock`."""
        if METADATA_KEY in file_metadata(path):
            return super().load(path, unet)
        return cls.load_official(path, unet, lock)

    @classmethod
    def load_official(cls, path: str | Path, unet: UNet, lock: str = "decoder") -> "ControlNetUNet":
        keys = list(read_header(path))
        prefix = "control_model." if any(k.startswith("control_model.") for k in keys) else ""
        model = cls(unet, lock=lock)
        p = next(unet.parameters())
        names = [k for k in keys if k.startswith(prefix)] if prefix else keys
        state = read_tensors(path, names, rename=lambda k: k[len(prefix):], device=p.device, dtype=p.dtype)
        load_strict(model.control, state, source=str(path), layout=detect_layout(keys))
        return model

    # -- training ---------------------------------------------------------------------------------
    def training_inputs(self, sd, text, batch: dict, gens: list, u, ref_drop: float) -> dict:
        """The one reference as the hint in [0, 1], at the target's pixel size (as diffusers'
        train_controlnet.py feeds its conditioning image); prompts were emptied by the loader."""
        hint = (batch["refs"][:, 0].to(sd.device, non_blocking=True).float() + 1) / 2
        if hint.shape[-2:] != batch["image"].shape[-2:]:
            raise ValueError(f"the ControlNet's hint must have the target's size {tuple(batch['image'].shape[-2:])}, "
                             f"got {tuple(hint.shape[-2:])} (use --ref-resolution = --resolution)")
        return dict(context=text(batch["prompt"]), hint=hint)

    # -- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def denoiser(self, sd, references: list[Image.Image], concepts: list[str], *, ref_size: int, height: int,
                 width: int):
        """`(x, t, context) -> eps` with the one reference as the hint at the output size, prepared as
        the training loader prepares references (fitted and padded with white), so a ControlNet
        trained here sees what it saw in training."""
        if len(references) != 1:
            raise ValueError(f"the ControlNet baseline takes one reference image, got {len(references)}")
        hint = (fit_and_pad(references[0], (height, width))[0] + 1) / 2
        hint = hint[None].to(sd.device, sd.dtype)
        return lambda x, t, context: self(x, t, context, hint.expand(x.shape[0], -1, -1, -1))
