"""Image geometry shared by the training loader and sampling: fit into a square and pad.

Training images and references are resized so that their longer side equals the training
resolution (aspect kept) and centred on a white square; the valid-area mask marks the real pixels.
Sampling prepares its references with the same function, so the model sees them as in training.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

WHITE = (255, 255, 255)


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


def box_mask(box, width: int, height: int, size: int) -> torch.Tensor:
    """The pixel box [x0, y0, x1, y1] of a width x height image as a (1, size, size) mask after fit_and_pad."""
    scale, _, _, left, top = fit_box(width, height, size)
    x0, y0, x1, y1 = (round(v * scale) for v in box)
    mask = torch.zeros(1, size, size)
    mask[:, top + y0:top + max(y1, y0 + 1), left + x0:left + max(x1, x0 + 1)] = 1
    return mask
