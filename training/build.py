"""What a training run is made of: the SD parts for the preset (the tiny stack, a tiny base from
scratch, or SD v1.5's weights), the --method model around SD's U-Net (retrinet.build_model), set up
for training; and AdamW with its parameter groups. bench/ builds SD v1.5-size models with random
weights through the same setup (`random_sd15`)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.distributed.optim import ZeroRedundancyOptimizer

from clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection
from common.options import PRECISIONS
from diffusion.sd15 import StableDiffusion, load_configs, load_sd15
from retrinet import METHODS, MethodOptions, ReferenceUNet, build_model
from unet import UNet, UNetConfig, UNetEncoder
from vae import AutoencoderKL, VAEConfig
from .presets import build_tiny, frozen_to, image_encoder_for, load_tiny_stack, save_base


def build(args, device, rank: int, out: Path) -> tuple[StableDiffusion, ReferenceUNet]:
    """The SD parts and the --method model around SD's U-Net, on `device`; frozen parts in half
    precision under amp."""
    sd = base_model(args, rank, out)
    for part in (sd.unet, sd.vae, sd.text_encoder):
        part.to(device)
    encoder = image_encoder_for(args, out, rank).to(device) if METHODS[args.method].needs_image_encoder else None
    options = MethodOptions(lock=args.lock, train_base=args.preset == "tiny" and args.from_scratch, heads=args.heads,
                            null_reference=args.ref_drop > 0, hint_downscale=sd.vae.config.downscale,
                            image_encoder=encoder)
    model = build_model(args.method, sd.unet, options)
    half = getattr(torch, PRECISIONS[args.precision]) if args.precision != "fp32" else None
    set_up(sd, model, checkpointing=args.checkpointing, half=half)
    return sd, model


def base_model(args, rank: int, out: Path) -> StableDiffusion:
    """The SD the run starts from. The tiny preset: the stack (a resumed run: its own copy in --out,
    whatever --stack holds now), or with --from-scratch a fresh tiny SD whose frozen text encoder
    is saved into --out once and read back on resume; sd15: --weights."""
    if args.preset == "tiny" and not args.from_scratch:
        if args.resume and (out / "base.safetensors").is_file():
            return load_sd15(out / "base.safetensors", configs=load_configs(out / "base-config.json"))
        sd = load_tiny_stack(args.stack)
        if rank == 0:
            copy_base(Path(args.stack), out)
        return sd
    if args.preset == "tiny":
        sd = build_tiny(args.seed)
        if rank == 0 and not (out / "base.safetensors").is_file():
            save_base(sd, out)
        if (out / "base.safetensors").is_file():  # resume: the very same frozen text encoder
            state = load_file(out / "base.safetensors")
            p = "cond_stage_model.transformer."
            sd.text_encoder.load_state_dict({k[len(p):]: v for k, v in state.items() if k.startswith(p)})
        return sd
    return load_sd15(args.weights, configs=load_configs(args.config) if args.config else None)


def copy_base(stack: Path, out: Path) -> None:
    """The run's own copy of the stack's base (base.safetensors, base-config.json), for sample.py and
    the evaluations, which load a tiny run from its folder; the weights file goes in last, under a
    temporary name first, as its presence marks the copy complete."""
    shutil.copyfile(stack / "base-config.json", out / "base-config.json")
    shutil.copyfile(stack / "base.safetensors", out / ".base.safetensors.tmp")
    (out / ".base.safetensors.tmp").replace(out / "base.safetensors")


def set_up(sd: StableDiffusion, model: ReferenceUNet, *, checkpointing: bool, half: torch.dtype | None,
           cast=frozen_to) -> None:
    """Gradient checkpointing in every U-Net-shaped part (SD's U-Net, RetriNet's E, the ControlNet),
    the frozen parts cast to `half` (None: all fp32) by `cast`, the VAE and text encoder in eval mode."""
    if checkpointing:
        for m in model.modules():
            if isinstance(m, UNetEncoder):
                m.gradient_checkpointing = True
    if half is not None:  # frozen weights may live in half precision; trainable ones stay fp32
        cast(sd, model, half)
    sd.vae.eval()
    sd.text_encoder.eval()


def random_sd15(method: str, lock: str, *, checkpointing: bool = True, half: torch.dtype | None = torch.float16,
                cast=frozen_to) -> tuple[StableDiffusion, ReferenceUNet]:
    """SD v1.5-size parts (and for the IP-Adapter the official ViT-H/14 image encoder) with random
    weights, and `method`'s model on them, set up as `build` sets up a --preset sd15 run: what bench/
    measures memory and speed on without the weight files. Built on the current default device
    (`with torch.device(...)`); `cast` replaces `frozen_to` where tensors cannot be cast in place
    (bench/memory.py's fake tensors)."""
    sd = StableDiffusion(UNet(UNetConfig.sd15()), AutoencoderKL(VAEConfig.sd15()),
                         CLIPTextModel(CLIPTextConfig.vit_l14()), CLIPTokenizer.default())
    encoder = (CLIPVisionModelWithProjection(CLIPVisionConfig.vit_h14()).requires_grad_(False).eval()
               if METHODS[method].needs_image_encoder else None)
    model = build_model(method, sd.unet, MethodOptions(lock=lock, image_encoder=encoder))
    set_up(sd, model, checkpointing=checkpointing, half=half, cast=cast)
    return sd, model


def param_groups(model: ReferenceUNet, params: list, scale: float) -> list:
    """AdamW's parameter groups: one, or with --added-lr-scale != 1 two, the method's added modules
    (RetriNet's E, cross-attention and zero convs; the ControlNet; the IP-Adapter's layers) apart
    from the U-Net's, their learning rate `scale` times --lr."""
    if scale == 1:
        return params
    added = {id(p) for p in model.added.parameters()}
    return [{"params": [p for p in params if id(p) not in added], "lr_scale": 1.0},
            {"params": [p for p in params if id(p) in added], "lr_scale": scale}]


def make_optimizer(params, args, world: int):
    """AdamW; on CUDA its fused kernel, which updates in place: torch's default there (foreach)
    allocates temporaries the size of every trainable weight at once (3.4 GB for RetriNet's 0.92 G
    trainable parameters; bench/memory.py)."""
    kw = dict(lr=args.lr, betas=(0.9, 0.999), eps=args.adam_eps, weight_decay=args.weight_decay)
    if args.device.startswith("cuda"):
        kw["fused"] = True
    if args.zero and world > 1:
        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **kw)
    return torch.optim.AdamW(params, **kw)
