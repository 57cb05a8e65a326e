"""Stable Diffusion v1.5 as one object: loading every part, and text-to-image sampling.

`load_sd15` reads the single file (`v1-5-pruned-emaonly.safetensors`) or the diffusers folder
(`unet/ vae/ text_encoder/ tokenizer/`), strictly, with each part's loader. `text_to_image`
is the sampling loop of the diffusers pipeline written out: encode the prompts, draw the initial
latents, run the sampler with classifier-free guidance in one batched U-Net call per step, decode.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, load_text_encoder
from common.weights import CheckpointError, FieldError, check_fields
from unet import UNet, UNetConfig, config_from_diffusers, load_unet
from vae import AutoencoderKL, PixelSpace, PixelSpaceConfig, VAEConfig, load_vae
from .samplers import SAMPLERS, make_sampler
from .schedule import PREDICTIONS, NoiseSchedule

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
    and says what the U-Net predicts. A config is a file one downloads: every value is type-checked
    and bounded before anything is built from it (each config's `checked`); ValueError naming the
    file, the key, the value and what was expected."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read model configs ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object with unet / vae / text_encoder / schedule, got "
                         f"{type(raw).__name__}")
    unknown = set(raw) - {"unet", "vae", "text_encoder", "schedule"}
    if unknown:
        raise ValueError(f"{path}: unknown parts {sorted(unknown)}; expected unet, vae, text_encoder, schedule")
    out = {}
    for part, read in _CONFIG_READERS.items():
        try:
            out[part] = read(raw[part]) if part in raw else None
        except FieldError as e:
            raise ValueError(f"{path}: the {part} config cannot be built ({e.kind}: {e})") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}: bad config field ({e})") from None
    return out


def _vae_config(value) -> VAEConfig | PixelSpaceConfig:
    if value == "pixel":
        return PixelSpaceConfig()
    if not isinstance(value, dict):
        raise FieldError("vae", value, "a JSON object or 'pixel' (no autoencoder)", "TypeError")
    return VAEConfig(**VAEConfig.checked(value, "vae."))


# The schedule's bounds beyond _schedule_problems' (which wants at least 2 timesteps): its tables have one
# entry per training timestep.
SCHEDULE_LIMITS = {"num_train_timesteps": (None, 1_000_000)}


def _schedule(value) -> NoiseSchedule:
    return NoiseSchedule(**check_fields(NoiseSchedule, value, key="schedule.", limits=SCHEDULE_LIMITS,
                                        choices={"prediction": PREDICTIONS}))


# How load_configs reads each part of a --config file, checked first.
_CONFIG_READERS = {
    "unet": lambda value: UNetConfig(**UNetConfig.checked(value, "unet.")),
    "vae": _vae_config,
    "text_encoder": lambda value: CLIPTextConfig.from_hf(CLIPTextConfig.checked(value, "text_encoder.")),
    "schedule": _schedule,
}


def _text_config_from_json(d) -> CLIPTextConfig:
    """A diffusers folder's text_encoder/config.json (a CLIPTextConfig, or a CLIPConfig's text_config), checked."""
    nested = isinstance(d, dict) and "text_config" in d
    return CLIPTextConfig.from_hf(CLIPTextConfig.checked(d["text_config"] if nested else d,
                                                         "text_config." if nested else ""))


def model_configs(weights: str | Path, config: str | Path | None = None) -> dict:
    """The configs `load_sd15(weights, configs=load_configs(config))` will build, without reading
    any weights: {"unet", "vae", "text_encoder", "schedule"}, each `config`'s, else the diffusers
    folder's `<part>/config.json`, else SD v1.5's; "sources" names where each came from (None: the
    default). ValueError naming the file for one that cannot be read."""
    from vae import config_from_diffusers as vae_from_diffusers
    given = load_configs(config) if config else {}
    parts = {"unet": (config_from_diffusers, UNetConfig.sd15), "vae": (vae_from_diffusers, VAEConfig.sd15),
             "text_encoder": (_text_config_from_json, CLIPTextConfig.vit_l14)}
    out, sources = {}, {}
    for part, (from_json, default) in parts.items():
        if given.get(part) is not None:
            out[part], sources[part] = given[part], str(config)
            continue
        path = Path(weights) / part / "config.json"
        out[part], sources[part] = default(), None
        if path.is_file():
            try:
                out[part], sources[part] = from_json(json.loads(path.read_text())), str(path)
            except (OSError, json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
                kind = e.kind if isinstance(e, FieldError) else type(e).__name__
                raise ValueError(f"{path}: not a valid {part} config ({kind}: {e})") from None
    out["schedule"] = given.get("schedule") or NoiseSchedule.sd15()
    sources["schedule"] = str(config) if given.get("schedule") else None
    return {**out, "sources": sources}


def unet_config_for(weights: str | Path, config: str | Path | None = None) -> UNetConfig:
    """The U-Net config `load_sd15(weights, configs=load_configs(config))` will build, without
    reading any weights: `config`'s, else the diffusers folder's unet/config.json, else SD v1.5's."""
    return model_configs(weights, config)["unet"]


def steps_limit(sampler: str, num_train_timesteps: int) -> int:
    """The most steps `sampler` takes on a schedule of `num_train_timesteps` (T) timesteps
    (diffusion.samplers; tests/test_faults_sample.py runs each sampler at its limit and one above):
    T - 1 for pndm, ddim, euler and euler_a ("leading" timesteps stride * k + 1 must stay below T;
    PNDM's steps + 1 model calls repeat one timestep, so they do not count), T - 2 for dpmpp_2m (its
    timesteps are shifted up by one stride)."""
    return num_train_timesteps - (2 if sampler == "dpmpp_2m" else 1)


SEED_LIMIT = 2 ** 64  # torch.Generator.manual_seed takes [0, 2^64)


def _schedule_problems(schedule: NoiseSchedule, source: str) -> list[str]:
    T, b0, b1 = schedule.num_train_timesteps, schedule.beta_start, schedule.beta_end
    if isinstance(T, bool) or not isinstance(T, int) or T < 2:
        return [f"{source}: schedule num_train_timesteps must be an integer >= 2, got {T!r}"]
    numbers = all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in (b0, b1))
    if not numbers or not (math.isfinite(b0) and math.isfinite(b1) and 0 < b0 <= b1 < 1):
        return [f"{source}: schedule betas must satisfy 0 < beta_start <= beta_end < 1, got {b0!r}, {b1!r}"]
    return []


def _model_problems(cfg: dict) -> list[str]:
    """Configs that cannot be built (on the meta device: nothing is allocated) or do not fit
    together (latent channels, text width): what would otherwise fail after the weights are read."""
    problems, sources = [], cfg["sources"]
    builders = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    for part, build in builders.items():
        if sources[part] is None or isinstance(cfg[part], PixelSpaceConfig):
            continue  # SD's own configs build
        try:
            with torch.device("meta"):
                build(cfg[part])
        except Exception as e:  # a config field of the wrong type or value: any error of the constructors
            problems.append(f"{sources[part]}: the {part} config cannot be built ({type(e).__name__}: {e})")
    if problems:
        return problems
    unet, vae, text = cfg["unet"], cfg["vae"], cfg["text_encoder"]
    where = lambda *parts: " / ".join(dict.fromkeys(sources[p] or f"SD v1.5's {p}" for p in parts))  # noqa: E731
    latent = vae.embed_dim
    if unet.in_channels != latent or unet.out_channels != latent:
        problems.append(f"{where('unet', 'vae')}: the U-Net takes {unet.in_channels} and gives {unet.out_channels} "
                        f"channels, the {'pixel space' if isinstance(vae, PixelSpaceConfig) else 'VAE'} has {latent}")
    if unet.context_dim != text.hidden_size:
        problems.append(f"{where('unet', 'text_encoder')}: the U-Net's context_dim {unet.context_dim} differs from "
                        f"the text encoder's hidden_size {text.hidden_size}")
    return problems


def sampling_problems(*, weights: str | Path, config: str | Path | None, sampler: str, height: int, width: int,
                      steps: int, num: int, seed: int | None = None,
                      floats: dict[str, float | None] | None = None) -> list[str]:
    """Problems with a text-to-image request, found before any model is built (messages name the
    options of sample.py and eval.protocol, which share them): the weights and --config exist and
    the configs build and fit together (`model_configs`: --config, the diffusers folder's
    config.json files, SD's), sizes are multiples of 8 and of the VAE's downscale, --steps is
    within the sampler's limit on the schedule (`steps_limit`: --config's schedule or SD's 1000
    timesteps), --seed is within torch's range, and every float option in `floats` is finite."""
    from common.options import finite_problems
    problems = []
    if not Path(weights).exists():
        problems.append(f"--weights {weights}: no such file or folder")
    if sampler not in SAMPLERS:
        problems.append(f"--sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    problems += [f"--{name} {value} must be a positive multiple of 8" for name, value in (("height", height),
                 ("width", width)) if value <= 0 or value % 8]
    if steps < 1 or num < 1:
        problems.append(f"--steps ({steps}) and --num ({num}) must be at least 1")
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        problems.append(f"--seed {seed} must be in [0, 2^64 - 1] (the range of torch's generator)")
    problems += finite_problems(floats or {})
    if config and not Path(config).is_file():
        what = "is a folder, expected a JSON file" if Path(config).is_dir() else "no such file"
        problems.append(f"--config {config}: {what}")
        return problems
    try:
        cfg = model_configs(weights, config)
    except ValueError as e:
        return problems + [str(e)]
    schedule = cfg["schedule"]
    found = _schedule_problems(schedule, cfg["sources"]["schedule"] or "SD's schedule")
    problems += found
    if not found and sampler in SAMPLERS and steps >= 1:
        T = schedule.num_train_timesteps
        limit = steps_limit(sampler, T)
        if steps > limit:
            source = cfg["sources"]["schedule"] or "SD's"
            problems.append(f"--steps {steps}: the {sampler} sampler takes at most {limit} steps on a schedule of "
                            f"{T} training timesteps ({source})")
    found = _model_problems(cfg)
    problems += found
    f = cfg["vae"].downscale if not found else 8
    if f > 8:
        problems += [f"--{name} {value} must be a multiple of {f}, the downscale of the VAE "
                     f"({cfg['sources']['vae']})" for name, value in (("height", height), ("width", width))
                     if value > 0 and value % f]
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
                  predictor: Callable[..., torch.Tensor] | None = None, decode: bool = True) -> torch.Tensor:
    """Generate `num` images for one prompt; returns uint8 (num, H, W, 3) on the CPU, or with
    `decode=False` the final latents (num, C, H/8, W/8) as sampled (diffusers' output_type="latent").

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
    if not decode:
        return x
    image = sd.vae.decode(x / sd.latent_scale)
    image = (image.float() / 2 + 0.5).clamp(0, 1)
    return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
