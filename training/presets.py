"""Training presets (paper Sec. 5.2, Supp. A.4; docs/design.md sections 3, 5): sd15, RetriNet on SD
v1.5 as the paper trains it, and tiny, SD's architecture shrunk for the CPU, fine-tuned from the
shipped pre-trained tiny stack (tiny-stack/, made by pretrain.py = make base) as the paper fine-tunes SD."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from clip import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection,
                  load_image_encoder)
from diffusion.schedule import NoiseSchedule
from diffusion.sd15 import StableDiffusion
from retrinet import ReferenceUNet
from unet import UNet, UNetConfig
from vae import PixelSpace, PixelSpaceConfig

# Defaults per preset; a command-line value given explicitly wins. sd15 follows the paper (Sec. 5.2:
# 384 px, batch 1, 8 accumulation steps); its lr and restart period were lost in extraction, so
# they are ControlNet's lr and the ablation length. tiny is calibrated to learn identity colours
# on the synthetic dataset within minutes on two CPU cores.
# sd15-256 is the paper's benchmark recipe for every method of Sec. 3.1 (Supp. A.3: 256 px, FP16; its
# batch, accumulation and learning rate were lost, so they stay sd15's).
_SD15 = dict(heads=8, resolution=384, batch_size=1, grad_accum=8, lr=1e-5, restart_every=9000, warmup=0,
             max_steps=9000, val_steps=25, workers=4, precision="fp32")
PRESETS = {
    "sd15": _SD15,
    "sd15-256": {**_SD15, "resolution": 256, "precision": "fp16"},
    "tiny": dict(heads=1, resolution=24, ref_resolution=16, batch_size=32, grad_accum=1, lr=1e-3, restart_every=100_000,
                 warmup=50, max_steps=1500, val_steps=25, workers=0, precision="fp32"),
}


def tiny_configs() -> dict:
    """The tiny preset: SD's architecture shrunk (two down-sampling levels, 32-64 channels, one
    transformer per attention level, 4 GroupNorm groups, a 2-layer 64-wide CLIP text tower),
    diffusing pixels and predicting v.
    Attention heads are 32 wide: narrower heads make the CPU's attention kernels several times
    slower (measured: 8 heads of 4 channels, 0.71 s; 1 head of 32, 0.09 s, same FLOPs)."""
    # 4 GroupNorm groups, not LDM's 32: on 32 channels, 32 groups are an instance norm, which takes
    # each channel's mean over the image away, and in this miniature that mean is the colours an
    # identity is made of (measured when RetriNet's reference attention still normalised with the
    # U-Net's GroupNorm: with 32 groups the references did not count after 500 steps; with 4 the
    # held-out x_0 error at t = 300 fell from 0.20 to 0.17).
    unet = UNetConfig(in_channels=3, out_channels=3, model_channels=32, attention_resolutions=(4,),
                      num_res_blocks=1, channel_mult=(1, 1, 2), num_heads=2, context_dim=64,
                      use_linear_in_transformer=True, norm_groups=4)
    text = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          projection_dim=64)
    # SD's schedule keeps sqrt(0.0047) of the image at t = 999: in pixel space that leak of the mean
    # colour, absent from the pure noise sampling starts from, casts every sample's colours. beta_end
    # 0.03 leaves sqrt(5.7e-6). So close to pure noise an eps model cannot give x_0 (its error is
    # divided by sqrt(acp_t) < 0.03 for the last 30% of timesteps): the tiny U-Net predicts v.
    schedule = NoiseSchedule(beta_end=0.03, prediction="v_prediction")
    # The IP-Adapter's frozen image encoder: a small random CLIP vision tower (its embeddings need only
    # tell references apart), with SD's patch size; it sees the references at 32 px.
    image = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8, projection_dim=64)
    return {"unet": unet, "vae": PixelSpaceConfig(), "text_encoder": text, "schedule": schedule,
            "image_encoder": image}


# The shipped tiny stack: a miniature SD v1.5 (U-Net + CLIP text tower, base.safetensors) and its
# CLIP (clip/), pre-trained by `make base` (pretrain.py; stack.json says how).
STACK = Path(__file__).resolve().parents[1] / "tiny-stack"


def stack_problems(folder: str | Path) -> list[str]:
    """What is missing from a tiny stack folder (one line each, naming the file)."""
    folder = Path(folder)
    need = [folder / "base.safetensors", folder / "base-config.json", folder / "clip" / "model.safetensors",
            folder / "clip" / "config.json"]
    return [f"{p}: missing (a tiny stack holds base.safetensors, base-config.json and clip/; "
            f"`make base` makes one)" for p in need if not p.is_file()]


def load_tiny_stack(folder: str | Path = STACK) -> StableDiffusion:
    """The pre-trained tiny SD of a stack folder: U-Net and frozen CLIP text tower, pixel space,
    v-prediction (its base-config.json)."""
    from diffusion.sd15 import load_configs, load_sd15
    folder = Path(folder)
    problems = stack_problems(folder)
    if problems:
        raise FileNotFoundError(problems[0])
    return load_sd15(folder / "base.safetensors", configs=load_configs(folder / "base-config.json"))


def build_tiny(seed: int) -> StableDiffusion:
    """A fresh tiny SD (train.py --from-scratch): its U-Net trains from scratch; its random text
    encoder stays frozen (it only has to tell prompts apart)."""
    cfg = tiny_configs()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(cfg["text_encoder"])
        unet = UNet(cfg["unet"])
    return StableDiffusion(unet, PixelSpace(cfg["vae"]), text_encoder, CLIPTokenizer.default(), cfg["schedule"])


def save_base(sd: StableDiffusion, out: Path, half: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """The tiny base as an SD single file (U-Net + text encoder, no VAE) and the `--config` JSON
    that sample.py needs to build it. Tensors whose key ends with one of `half` are stored in half
    precision (loading casts them back)."""
    state = {f"model.diffusion_model.{k}": v for k, v in sd.unet.state_dict().items()}
    state.update({f"cond_stage_model.transformer.{k}": v for k, v in sd.text_encoder.state_dict().items()})
    weights, configs = out / "base.safetensors", out / "base-config.json"
    save_file({k: (v.half() if half and k.endswith(half) else v).detach().contiguous() for k, v in state.items()},
              str(weights))
    cfg = tiny_configs()
    configs.write_text(json.dumps({"unet": dataclasses.asdict(cfg["unet"]), "vae": "pixel",
                                   "text_encoder": dataclasses.asdict(cfg["text_encoder"]),
                                   "schedule": dataclasses.asdict(sd.schedule)}, indent=1))
    return weights, configs


def load_run(run: Path, ckpt: Path | None = None, raw: bool = False):
    """A tiny run for evaluation: the base it saved (save_base) and the conditioning model of its
    checkpoint folder `ckpt` (default: the last) on it, read from its weight average (ema.safetensors)
    when training kept one and not `raw`, else from its weights; an IP-Adapter gets the run's image
    encoder (image_encoder_for). Returns (sd, model in eval mode, the file used)."""
    from diffusion.sd15 import load_configs, load_sd15
    from retrinet import METHODS, inspect_checkpoint, load_reference_model
    from training.checkpoints import checkpoint_dirs, model_file
    from training.ema import EMA_FILE
    run = Path(run)
    sd = load_sd15(run / "base.safetensors", configs=load_configs(run / "base-config.json"))
    ckpt = checkpoint_dirs(run)[-1] if ckpt is None else Path(ckpt)
    file = ckpt / EMA_FILE if (ckpt / EMA_FILE).is_file() and not raw else model_file(ckpt)
    encoder = (load_image_encoder(run / "image-encoder").eval()
               if METHODS[inspect_checkpoint(file).method].needs_image_encoder else None)
    return sd, load_reference_model(file, sd.unet, image_encoder=encoder).eval(), file


def image_encoder_for(args, out: Path, rank: int) -> CLIPVisionModelWithProjection:
    """The IP-Adapter's frozen CLIP image encoder: --image-encoder's weights for sd15; for the tiny
    preset the image tower of the stack's CLIP (--stack), or with --from-scratch a small random one
    drawn from the seed (so every process and every resumed run has the same). For the tiny preset
    rank 0 also writes it to out/image-encoder/ in the layout of IP-Adapter's image_encoder/ folder,
    for sample.py --image-encoder."""
    if args.preset != "tiny":
        return load_image_encoder(args.image_encoder).eval().requires_grad_(False)
    if not args.from_scratch:
        encoder = load_image_encoder(Path(args.stack) / "clip")
        cfg = encoder.config
    else:
        cfg = tiny_configs()["image_encoder"]
        with torch.random.fork_rng():
            torch.manual_seed(args.seed + 1)
            encoder = CLIPVisionModelWithProjection(cfg)
    folder = out / "image-encoder"
    if rank == 0 and not (folder / "model.safetensors").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(folder / ".model.tmp"))
        (folder / ".model.tmp").replace(folder / "model.safetensors")
    return encoder.eval().requires_grad_(False)


def frozen_to(sd: StableDiffusion, model: ReferenceUNet, dtype: torch.dtype) -> None:
    """Cast every frozen part to `dtype` (half precision under amp): the VAE, the text encoder, and
    the U-Net parts and added parts the lock freezes. Trainable weights stay fp32."""
    sd.vae.to(dtype)
    sd.text_encoder.to(dtype)
    for part in model.frozen_parts():
        part.to(dtype)
