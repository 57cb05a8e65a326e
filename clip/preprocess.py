"""CLIP image preprocessing: shortest side to 224 (bicubic, antialiased), centre crop, CLIP mean/std.

Matches openai/CLIP's `_transform` and transformers' `CLIPImageProcessor`. Resizing runs on uint8
tensors through torchvision (as CLIPImageProcessor does), so PIL images and uint8 tensors of the
same pixels give the same result.
"""
from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_uint8_chw(image, index: int) -> torch.Tensor:
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"image {index}: expected a uint8 tensor (3, H, W) or (1, H, W), got "
                             f"{image.dtype} {tuple(image.shape)}")
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image
    raise TypeError(f"image {index}: expected a PIL image or a uint8 tensor, got {type(image).__name__}")


def preprocess(images, size: int = 224) -> torch.Tensor:
    """PIL image(s) or uint8 tensor(s) (3, H, W) / (B, 3, H, W) -> float32 (B, 3, size, size)."""
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        images = list(images)
    elif isinstance(images, (Image.Image, torch.Tensor)):
        images = [images]
    if len(images) == 0:
        raise ValueError("preprocess got no images")
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    out = []
    for i, image in enumerate(images):
        x = _to_uint8_chw(image, i)
        h, w = x.shape[-2:]
        if min(h, w) == 0:
            raise ValueError(f"image {i} is empty ({h}x{w})")
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(size * long / short)
        new_hw = [size, new_long] if h <= w else [new_long, size]
        x = TF.resize(x, new_hw, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[:, top:top + size, left:left + size]
        out.append((x.float() - mean) / std)
    return torch.stack(out)
