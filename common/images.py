"""Image preparation shared by the training loader and sampling: open, fit into a square and pad,
cover and crop.

Training images and references are resized so that their longer side equals the training
resolution (aspect kept) and centred on a white square; the valid-area mask marks the real pixels.
Sampling prepares its references with the same function, so the model sees them as in training.
A ControlNet hint instead covers the output size and is centre-cropped (`resize_and_crop`).
Generated images are saved as PNGs that record their generation parameters (`save_png`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

WHITE = (255, 255, 255)


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """Open an image file as RGB, with a one-line error naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{what} {path}: cannot read it as an image ({e})") from None


def fit_box(width: int, height: int, size: int) -> tuple[float, int, int, int, int]:
    """(scale, new_w, new_h, left, top) placing a width x height image inside a size x size square."""
    scale = size / max(width, height)
    nw, nh = max(1, round(width * scale)), max(1, round(height * scale))
    return scale, nw, nh, (size - nw) // 2, (size - nh) // 2


def fit_and_pad(image: Image.Image, size: int, fill=WHITE) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB image -> (float (3, size, size) in [-1, 1], valid-area mask (1, size, size) in {0, 1}).

    Resizing is antialiased bilinear on the uint8 pixels through torch (its channels-last uint8 kernel
    is several times faster than PIL's resize, which dominated the loader's time)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    _, nw, nh, left, top = fit_box(image.width, image.height, size)
    hwc = torch.from_numpy(np.array(image))                       # (H, W, 3) uint8
    pixels = hwc.permute(2, 0, 1)[None]                           # (1, 3, H, W), channels-last in memory
    if (nh, nw) != (image.height, image.width):
        pixels = F.interpolate(pixels, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    canvas = torch.empty(3, size, size, dtype=torch.uint8)
    canvas[:] = torch.tensor(fill, dtype=torch.uint8)[:, None, None]
    canvas[:, top:top + nh, left:left + nw] = pixels[0]
    valid = torch.zeros(1, size, size)
    valid[:, top:top + nh, left:left + nw] = 1
    return canvas.float().div_(127.5).sub_(1), valid


def resize_and_crop(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """Cover `height` x `width` (aspect kept), centre crop; float (3, H, W) in [0, 1] (a ControlNet hint)."""
    w, h = image.size
    scale = max(width / w, height / h)
    image = image.resize((max(width, round(w * scale)), max(height, round(h * scale))), Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return TF.pil_to_tensor(image.crop((left, top, left + width, top + height))).float() / 255


def save_png(image: torch.Tensor, params: dict, path: str | Path) -> None:
    """Write a uint8 (H, W, 3) image as PNG with `params` as JSON in the text chunk "parameters"."""
    info = PngInfo()
    info.add_text("parameters", json.dumps(params, ensure_ascii=False))
    Image.fromarray(image.numpy()).save(path, pnginfo=info)
