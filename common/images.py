"""Image preparation shared by the training loader and sampling: open, fit into a square and pad,
cover and crop.

Training images and references are resized so that their longer side equals the training
resolution (aspect kept) and centred on a white square; the valid-area mask marks the real pixels.
Sampling prepares its references with the same function, so the model sees them as in training
(a ControlNet's hint too, at the output's size).
Generated images are saved as PNGs that record their generation parameters (`save_png`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
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


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def fit_box(width: int, height: int, size: int | tuple[int, int]) -> tuple[float, int, int, int, int]:
    """(scale, new_w, new_h, left, top) placing a width x height image inside a size x size square
    (or a (height, width) box), centred."""
    box_h, box_w = _hw(size)
    scale = size / max(width, height) if isinstance(size, int) else min(box_w / width, box_h / height)
    nw, nh = max(1, round(width * scale)), max(1, round(height * scale))
    return scale, nw, nh, (box_w - nw) // 2, (box_h - nh) // 2


def fit_and_pad(image: Image.Image, size: int | tuple[int, int], fill=WHITE) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB image -> (float (3, H, W) in [-1, 1], valid-area mask (1, H, W) in {0, 1}), H = W = size
    or (H, W) = size.

    Resizing is antialiased bilinear on the uint8 pixels through torch (its channels-last uint8 kernel
    is several times faster than PIL's resize, which dominated the loader's time)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    _, nw, nh, left, top = fit_box(image.width, image.height, size)
    hwc = torch.from_numpy(np.array(image))                       # (H, W, 3) uint8
    pixels = hwc.permute(2, 0, 1)[None]                           # (1, 3, H, W), channels-last in memory
    if (nh, nw) != (image.height, image.width):
        pixels = F.interpolate(pixels, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    canvas = torch.empty(3, *_hw(size), dtype=torch.uint8)
    canvas[:] = torch.tensor(fill, dtype=torch.uint8)[:, None, None]
    canvas[:, top:top + nh, left:left + nw] = pixels[0]
    valid = torch.zeros(1, *_hw(size))
    valid[:, top:top + nh, left:left + nw] = 1
    return canvas.float().div_(127.5).sub_(1), valid


def save_png(image: torch.Tensor, params: dict, path: str | Path) -> None:
    """Write a uint8 (H, W, 3) image as PNG with `params` as JSON in the text chunk "parameters"."""
    info = PngInfo()
    info.add_text("parameters", json.dumps(params, ensure_ascii=False))
    Image.fromarray(image.numpy()).save(path, pnginfo=info)
