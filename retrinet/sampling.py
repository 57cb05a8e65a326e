"""Sampling with references: the one function every caller uses (sample.py, the evaluation
protocol, the demo, the training validation grid), the three-way reference guidance, and the checks a
command line makes before it builds any model.

    images, params = generate(sd, "1girl, on a beach", model=model, references=[face, outfit],
                              concepts=["face", "clothes"], steps=50, guidance=7.0, seed=0)

Each conditioning model turns its references into a denoiser `(x, t, context) -> eps`
(`model.denoiser`): RetriNet fits, pads and VAE-encodes them once and runs E once per step for the
whole guidance batch; the ControlNet uses its one reference as the hint. `guidance` is the model's
own (`model.guided_predictor`): RetriNet and the ControlNet drop the text and keep the references (as
training drops only the text: the paper says nothing about guidance with references); the
IP-Adapter, as its official pipeline, gives the negative branch a zero image embedding too
(`retrinet.ip_adapter.IP_ADAPTER_NEGATIVE` is that pipeline's default negative prompt).
`ref_guidance` (a RetriNet with a null reference, trained with reference dropout) guides references
and text separately (docs/design.md section 5).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from common.images import open_image
from common.options import CONCEPTS
from diffusion.sd15 import StableDiffusion, text_to_image
from unet import UNetConfig
from .base import ReferenceUNet
from .checkpoints import METHODS, inspect_checkpoint


class ReferenceGuidance:
    """Three-way guidance, InstructPix2Pix-style, in one batched call over (null references, no
    text), (references, no text), (references, text):
        out = e_null + ref_guidance * (e_ref - e_null) + guidance * (e_full - e_ref)
    `denoiser(x, t, context, ref_drop)` must accept `ref_drop` (a RetriNet with a null reference)."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], guidance: float, ref_guidance: float):
        self.denoiser, self.guidance, self.ref_guidance = denoiser, guidance, ref_guidance
        self.drop = None  # (3B,) the first third sees the null reference; made at the first step

    def __call__(self, x: torch.Tensor, t: torch.Tensor, negative: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.drop is None or self.drop.shape[0] != 3 * b:
            self.drop = torch.tensor([True] * b + [False] * 2 * b, device=x.device)
        e_null, e_ref, e_full = self.denoiser(torch.cat([x] * 3), t, torch.cat([negative, negative, context]),
                                              ref_drop=self.drop).chunk(3)
        return e_null + self.ref_guidance * (e_ref - e_null) + self.guidance * (e_full - e_ref)


def expand_concepts(concepts: list[str] | None, n_refs: int) -> list[str]:
    """One concept per reference from none (all "figure"), one for all, or one each."""
    concepts = list(concepts or [])
    if len(concepts) not in (0, 1, n_refs):
        raise ValueError(f"give one concept for all {n_refs} references or one per reference, got {len(concepts)}")
    bad = [c for c in concepts if c not in CONCEPTS]
    if bad:
        raise ValueError(f"unknown concepts {bad}; expected {', '.join(CONCEPTS)}")
    return concepts * n_refs if len(concepts) == 1 else concepts or ["figure"] * n_refs


@torch.no_grad()
def generate(sd: StableDiffusion, prompt: str, *, model: ReferenceUNet | None = None,
             references: list[Image.Image] = (), concepts: list[str] | None = None, negative_prompt: str = "",
             num: int = 1, steps: int = 50, guidance: float = 7.0, ref_guidance: float | None = None,
             sampler: str = "pndm", seed: int = 0, height: int = 512, width: int = 512, ref_size: int = 384,
             ip_scale: float | None = None, progress: Callable[[int, int], None] | None = None
             ) -> tuple[torch.Tensor, list[dict]]:
    """`num` images for one prompt, conditioned on `references` (RGB images of one identity, each
    with its concept) when `model` is given, else plain SD. `ip_scale` weighs an IP-Adapter's image
    attention (default 1; the paper evaluates 0.5 and shows 0.75). Returns uint8 (num, H, W, 3) on the
    CPU and, per image, its generation parameters (what `png_parameters` records). The same
    arguments give the same images on the same machine."""
    if model is None and (references or ref_guidance is not None):
        raise ValueError("references and ref_guidance need a conditioning model")
    if model is not None and not references:
        raise ValueError(f"the {model.method} model needs at least one reference image")
    if ref_guidance is not None and not getattr(model.config, "null_reference", False):
        raise ValueError(f"ref_guidance needs a RetriNet with a null reference (trained with reference dropout), "
                         f"not this {model.method}")
    ip_adapter = model is not None and model.image_scale
    if ip_scale is not None and not ip_adapter:
        raise ValueError(f"ip_scale weighs an IP-Adapter's image attention; not for {model.method if model else 'SD'}")
    predictor = None
    if model is not None:
        concepts = expand_concepts(concepts, len(references))
        options = {"scale": 1.0 if ip_scale is None else ip_scale} if ip_adapter else {}
        denoiser = model.denoiser(sd, list(references), concepts, ref_size=ref_size, height=height, width=width,
                                  **options)
        predictor = (model.guided_predictor(denoiser, guidance) if ref_guidance is None
                     else ReferenceGuidance(denoiser, guidance, ref_guidance))
    images = text_to_image(sd, prompt, negative_prompt, num=num, steps=steps, guidance=guidance, sampler=sampler,
                           seed=seed, height=height, width=width, progress=progress, predictor=predictor)
    params = []
    for i in range(num):
        p = dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance, sampler=sampler,
                 seed=seed, index=i, num=num, height=height, width=width)
        if model is not None:
            p.update(mode=model.method, concepts=concepts, ref_size=ref_size, ref_guidance=ref_guidance)
        if ip_adapter:
            p.update(ip_scale=options["scale"])
        params.append(p)
    return images, params


def png_parameters(params: dict, *, weights: str | Path, precision: str, device: str,
                   checkpoint: str | Path | None = None, reference_files: list[str | Path] = (),
                   image_encoder: str | Path | None = None) -> dict:
    """The JSON a PNG's "parameters" text chunk records: `generate`'s parameters of that image, and
    which files made it (base weights, conditioning checkpoint, references and, for an IP-Adapter,
    its image encoder, by file name)."""
    sampling = ("prompt", "negative_prompt", "steps", "guidance", "sampler", "seed", "index", "num", "height", "width")
    out = {k: params[k] for k in sampling}
    out.update(weights=Path(weights).name, precision=precision, device=device)
    if checkpoint is not None:
        out.update(retrinet=Path(checkpoint).name, mode=params["mode"], refs=[Path(p).name for p in reference_files],
                   concepts=params["concepts"], ref_size=params["ref_size"], ref_guidance=params["ref_guidance"])
    if "ip_scale" in params:
        out.update(ip_scale=params["ip_scale"], image_encoder=Path(image_encoder).name if image_encoder else None)
    return out


def reference_problems(checkpoint: str | Path | None, references: list[str | Path], concepts: list[str], *,
                       ref_size: int, ref_guidance: float | None, method: str | None, unet_config: UNetConfig,
                       ip_scale: float | None = None, image_encoder: str | Path | None = None
                       ) -> tuple[list[str], str | None]:
    """Every problem with a request to sample with references, found without building a model:
    unreadable images, concept counts, a checkpoint that is not one or was made for another base
    U-Net, options its method does not take. Returns (problems, the checkpoint's method). Messages
    name the options of sample.py and eval.protocol, which share them."""
    if not checkpoint and not references:
        extra = [f"{flag} needs --retrinet and --refs" for flag, value in
                 (("--ref-guidance", ref_guidance), ("--ip-scale", ip_scale), ("--image-encoder", image_encoder))
                 if value is not None]
        return extra, None
    if not checkpoint or not references:
        return ["--retrinet and --refs go together"], None
    problems = []
    if image_encoder is not None and not Path(image_encoder).exists():
        problems.append(f"--image-encoder {image_encoder}: no such file or folder")
    for path in references:
        try:
            open_image(path, "reference")
        except ValueError as e:
            problems.append(str(e))
    if len(concepts) > len(references):
        problems.append(f"--concepts: {len(concepts)} concepts for {len(references)} references")
    elif len(concepts) not in (0, 1, len(references)):
        problems.append(f"--concepts: give one concept for all references or one per reference, got {len(concepts)} "
                        f"for {len(references)}")
    if ref_size <= 0 or ref_size % 8:
        problems.append(f"--ref-size {ref_size} must be a positive multiple of 8")
    ckpt = Path(checkpoint)
    if ckpt.is_dir():
        return problems + [f"--retrinet {ckpt}: is a folder, expected a .safetensors file (a checkpoint written by "
                           f"train.py, or an official ControlNet / IP-Adapter file)"], None
    if not ckpt.is_file():
        return problems + [f"--retrinet {ckpt}: no such file"], None
    try:
        info = inspect_checkpoint(ckpt)
        diff = info.base_mismatch(unet_config)
    except (OSError, ValueError) as e:
        return problems + [f"--retrinet {ckpt}: {e}"], None
    if diff:
        what = (f"made for another base U-Net (differs in {', '.join(sorted(diff))})" if info.layout == "ours"
                else f"not a {METHODS[info.method].title} for this base U-Net (keys or shapes differ: "
                     f"{', '.join(list(diff)[:3])})")
        return problems + [f"--retrinet {ckpt}: {what}"], info.method
    if method and method != info.method:
        return problems + [f"--method {method}: {ckpt} holds a {info.method} checkpoint"], info.method
    cls = METHODS[info.method]
    if ref_guidance is not None and not getattr(info.config, "null_reference", False):
        problems.append(f"--ref-guidance: {ckpt} has no null reference (it was not trained with reference dropout)"
                        if hasattr(info.config, "null_reference") else
                        f"--ref-guidance needs a RetriNet with a null reference, not a {info.method}")
    if cls.references is not None and len(references) != cls.references:
        problems.append(f"--refs: the {cls.title} baseline takes one reference image, got {len(references)}")
    if cls.needs_image_encoder and image_encoder is None:
        problems.append(f"--retrinet {ckpt} is an {cls.title}: it needs --image-encoder (CLIP vision weights)")
    if not cls.needs_image_encoder:
        problems += [f"{flag} applies to IP-Adapter checkpoints; {ckpt} holds a {info.method}" for flag, value in
                     (("--ip-scale", ip_scale), ("--image-encoder", image_encoder)) if value is not None]
    return problems, info.method
