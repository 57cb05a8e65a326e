"""Sampling with references: preparing reference images and the reference-conditioned denoiser.

References are fitted into a square of the training resolution (aspect kept) and padded with white
by `data.transforms.fit_and_pad`, the function the training loader uses; the VAE encodes them once per run. At each sampling
step E's features are computed once, for one copy of the references, and shared by the whole
classifier-free-guidance batch: `--guidance` drops the text and keeps the references (the paper's
recipe drops only text).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError

from data.transforms import fit_and_pad
from diffusion.sd15 import StableDiffusion
from .model import RetriUNet

CONCEPTS = ("figure", "face", "clothes")


def open_reference(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with an error naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"reference {path}: cannot read it as an image ({e})") from None


def resize_and_crop(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """Cover `height` x `width` (aspect kept), centre crop; float (3, H, W) in [0, 1] (a ControlNet hint)."""
    w, h = image.size
    scale = max(width / w, height / h)
    image = image.resize((max(width, round(w * scale)), max(height, round(h * scale))), Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return TF.pil_to_tensor(image.crop((left, top, left + width, top + height))).float() / 255


class ReferenceDenoiser:
    """`(x, t, context) -> eps` for diffusion.sd15.text_to_image, conditioned on fixed references.

    retrinet mode: `refs` are RGB images; they are VAE-encoded here, once. controlnet mode: `refs`
    holds one image, used as the hint at the output size.
    """

    def __init__(self, sd: StableDiffusion, model: RetriUNet, refs: list[Image.Image], concepts: list[str],
                 size: int, height: int, width: int):
        self.model = model
        device, dtype = sd.device, sd.dtype
        with torch.no_grad():
            if model.mode == "controlnet":
                self.refs = resize_and_crop(refs[0], height, width)[None, None].to(device, dtype)
                self.ref_context = None
            else:
                pixels = torch.stack([fit_and_pad(im, size)[0] for im in refs]).to(device, dtype)
                self.refs = (sd.vae.encode(pixels).mean * sd.latent_scale)[None]      # (1, K, 4, s/8, s/8)
                self.ref_context = sd.encode_prompts(concepts)[None]                 # (1, K, 77, 768)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 ref_drop: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        refs = self.refs.expand(b, *self.refs.shape[1:])
        if self.model.mode == "controlnet":
            if ref_drop is not None:
                raise ValueError("reference guidance needs a RetriNet with a null reference, not a ControlNet")
            return self.model(x, t, context, refs)
        features = [f.expand(b, *f.shape[1:]) for f in self.model.retrinet.encode_refs(self.refs, t, self.ref_context)]
        ref_context = self.ref_context.expand(b, *self.ref_context.shape[1:])
        return self.model(x, t, context, refs, ref_context, features=features, ref_drop=ref_drop)
