"""Stable Diffusion v1.5 as one object: loading every part, and text-to-image sampling.

`load_sd15` reads the single file (`v1-5-pruned-emaonly.safetensors`) or the diffusers folder
(`unet/ vae/ text_encoder/ tokenizer/`), strictly, with each part's loader. `text_to_image`
is the sampling loop of the diffusers pipeline written out: encode the prompts, draw the initial
latents, run the sampler with classifier-free guidance in one batched U-Net call per step, decode.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, load_text_encoder
from common.weights import CheckpointError
from unet import UNet, UNetConfig, config_from_diffusers, load_unet
from vae import AutoencoderKL, PixelSpace, PixelSpaceConfig, VAEConfig, load_vae
from .samplers import SAMPLERS, make_sampler
from .schedule import NoiseSchedule

LATENT_SCALE = 0.18215  # LDM's scale_factor: latents = 0.18215 * vae.encode(x).sample()


@dataclass
class StableDiffusion:
    unet: UNet
    vae: AutoencoderKL | PixelSpace
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule.sd15)  # the training noise schedule

    @property
    def device(self) -> torch.device:
        return self.unet.out[2].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.out[2].weight.dtype

    @property
    def latent_scale(self) -> float:
        """LDM's scale_factor for SD's VAE; 1 in pixel space (the tiny training preset)."""
        return 1.0 if isinstance(self.vae, PixelSpace) else LATENT_SCALE

    @property
    def clip_sample(self) -> float | None:
        """The bound a DDIM x_0 prediction is clamped to: 1 in pixel space (images live in [-1, 1], and
        without the clamp the prediction explodes at high noise, as pixel-space DDPM / DDIM sampling
        knows); None for SD's latents, which have no such bound."""
        return 1.0 if isinstance(self.vae, PixelSpace) else None

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, 77, 768) text context; over-long prompts are truncated with a warning."""
        return self.text_encoder(self.tokenizer(prompts).to(self.device))


def load_configs(path: str | Path) -> dict:
    """Model configs from a JSON file {"unet": {...}, "vae": {...}, "text_encoder": {...}} (LDM names
    for unet/vae, transformers names for the text encoder); any part may be left out. `"vae": "pixel"`
    means no autoencoder: the model diffuses pixels (the tiny training preset); `"schedule"`
    ({"beta_start", "beta_end", "num_train_timesteps", "prediction"}) replaces SD's noise schedule
    and says what the U-Net predicts."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read model configs ({e})") from None
    unknown = set(raw) - {"unet", "vae", "text_encoder", "schedule"}
    if unknown:
        raise ValueError(f"{path}: unknown parts {sorted(unknown)}; expected unet, vae, text_encoder, schedule")
    try:
        return {"unet": UNetConfig(**raw["unet"]) if "unet" in raw else None,
                "vae": (PixelSpaceConfig() if raw.get("vae") == "pixel" else
                        VAEConfig(**raw["vae"]) if "vae" in raw else None),
                "text_encoder": CLIPTextConfig.from_hf(raw["text_encoder"]) if "text_encoder" in raw else None,
                "schedule": NoiseSchedule(**raw["schedule"]) if "schedule" in raw else None}
    except TypeError as e:
        raise ValueError(f"{path}: bad config field ({e})") from None


def unet_config_for(weights: str | Path, config: str | Path | None = None) -> UNetConfig:
    """The U-Net config `load_sd15(weights, configs=load_configs(config))` will build, without
    reading any weights: `config`'s, else the diffusers folder's unet/config.json, else SD v1.5's."""
    cfg = load_configs(config)["unet"] if config else None
    unet_json = Path(weights) / "unet" / "config.json"
    if cfg is None and unet_json.is_file():
        try:
            cfg = config_from_diffusers(json.loads(unet_json.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{unet_json}: not valid JSON ({e})") from None
    return cfg or UNetConfig.sd15()


def sampling_problems(*, weights: str | Path, config: str | Path | None, sampler: str, height: int, width: int,
                      steps: int, num: int) -> list[str]:
    """Problems with a text-to-image request, found before any model is built (messages name the
    options of sample.py and eval.protocol, which share them)."""
    problems = []
    if not Path(weights).exists():
        problems.append(f"--weights {weights}: no such file or folder")
    if sampler not in SAMPLERS:
        problems.append(f"--sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    problems += [f"--{name} {value} must be a positive multiple of 8" for name, value in (("height", height),
                 ("width", width)) if value <= 0 or value % 8]
    if steps < 1 or num < 1:
        problems.append(f"--steps ({steps}) and --num ({num}) must be at least 1")
    if config and not Path(config).is_file():
        problems.append(f"--config {config}: no such file")
    return problems


def load_sd15(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              configs: dict | None = None) -> StableDiffusion:
    """All of SD v1.5 from the single file or the diffusers folder, on `device` in `dtype`.

    Configs: `configs` ({"unet", "vae", "text_encoder"}), else the diffusers folder's config.json
    files, else SD v1.5's. The tokenizer is the folder's `tokenizer/` or the bundled vocabulary.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    configs = configs or {}
    parts = dict(device=device, dtype=dtype)
    unet = load_unet(path, configs.get("unet"), **parts)
    if isinstance(configs.get("vae"), PixelSpaceConfig):
        vae = PixelSpace(configs["vae"])
    else:
        vae = load_vae(path, configs.get("vae"), **parts)
    text_encoder = load_text_encoder(path, configs.get("text_encoder"), **parts)
    tokenizer_dir = path / "tokenizer"
    tokenizer = CLIPTokenizer.from_folder(tokenizer_dir) if tokenizer_dir.is_dir() else CLIPTokenizer.default()
    return StableDiffusion(unet, vae, text_encoder, tokenizer, configs.get("schedule") or NoiseSchedule.sd15())


class ClassifierFreeGuidance:
    """The guided prediction of `model(x, t, context)` at `scale`, in one batched call per step:
        out = model(x, negative) + scale * (model(x, prompt) - model(x, negative))
    `scale` <= 1 runs the prompt alone."""

    def __init__(self, model: Callable[..., torch.Tensor], scale: float):
        self.model, self.scale = model, scale

    def __call__(self, x: torch.Tensor, t: torch.Tensor, negative: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.scale <= 1.0:
            return self.model(x, t, context)
        uncond, cond = self.model(torch.cat([x] * 2), t, torch.cat([negative, context])).chunk(2)
        return uncond + self.scale * (cond - uncond)


@torch.no_grad()
def text_to_image(sd: StableDiffusion, prompt: str, negative_prompt: str = "", *, num: int = 1, steps: int = 50,
                  guidance: float = 7.0, sampler: str = "pndm", seed: int = 0, height: int = 512, width: int = 512,
                  progress: Callable[[int, int], None] | None = None,
                  predictor: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Generate `num` images for one prompt; returns uint8 (num, H, W, 3) on the CPU.

    `predictor(x, t, negative, context)` is the guided model output at one step, given the negative
    and the prompt embeddings (num, L, D) each; by default `ClassifierFreeGuidance(sd.unet,
    guidance)`, and `guidance` serves only that default. Conditioning models bring their own
    (`retrinet.sampling`); this loop knows nothing of them.

    Matches diffusers' StableDiffusionPipeline called with a CPU `torch.Generator().manual_seed(seed)`:
    the initial latents (num, 4, H/8, W/8) are drawn at once from that generator, and stochastic
    samplers draw their noise from it too.
    """
    f = sd.vae.config.downscale
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    generator = torch.Generator().manual_seed(seed)
    predictor = predictor or ClassifierFreeGuidance(sd.unet, guidance)
    context = sd.encode_prompts([prompt] * num)
    negative = sd.encode_prompts([negative_prompt] * num)

    clip = {"clip_sample": sd.clip_sample} if sd.clip_sample is not None and sampler == "ddim" else {}
    s = make_sampler(sampler, steps, sd.schedule, **clip)
    shape = (num, sd.unet.config.in_channels, height // f, width // f)
    x = torch.randn(shape, generator=generator, dtype=sd.dtype).to(sd.device) * s.init_noise_sigma
    for i, t in enumerate(s.timesteps):
        model_in = s.scale_model_input(x, i)
        out = predictor(model_in, t.to(sd.device), negative, context)
        # A v model's output becomes eps after guidance: the conversion is affine with weights summing
        # to 1, so guiding v or eps is the same.
        x = s.step(sd.schedule.to_eps(out, model_in, t), i, x, generator=generator)
        if progress:
            progress(i + 1, len(s.timesteps))
    image = sd.vae.decode(x / sd.latent_scale)
    image = (image.float() / 2 + 0.5).clamp(0, 1)
    return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
