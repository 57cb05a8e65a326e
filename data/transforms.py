"""Geometry of the training loader: the views of setting a and of every target, and the face box and
segmentation mask after `common.images.fit_and_pad`.

Images and references are fitted into a square and padded by `fit_and_pad` (re-exported here), the
function sampling uses too, so the model sees references as in training.

A view (`draw_augment` + `augment`) is a horizontal flip, a crop keeping 70-100% of each side and a
brightness factor 0.8-1.2. Setting a's references are views of the target's image (paper Sec. 3.1:
"two different transforms [of] the same image as target and reference"); the target is a view in
both settings, made harmless to its prompt by `keep_prompt_true`. The parameters are drawn from a
seeded numpy generator (never torchvision's global RNG, so a sample depends only on (seed, epoch,
index)) and applied by torchvision.transforms.v2.functional to the image, its segmentation mask and
its face box together, at the image's own size, before `fit_and_pad`: the valid-area mask
`fit_and_pad` returns then marks the view's real pixels, and the face box stays on the view's face.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from common.images import fit_and_pad, fit_box  # noqa: F401  (the loader's image geometry)

from .build import COLOUR_WORDS

# A view's augmentation (the values the loader has always used for setting a's references).
FLIP_P = 0.5                # probability of a horizontal flip
CROP_KEEP = (0.7, 1.0)      # the crop keeps this fraction of each side, drawn uniformly per side
BRIGHTNESS = (0.8, 1.2)     # brightness factor, drawn uniformly


class AugmentParams(NamedTuple):
    """One view: flip first, then the crop (in the flipped image), then brightness."""
    flip: bool
    top: int
    left: int
    height: int
    width: int
    brightness: float


def draw_augment(rng: np.random.Generator, width: int, height: int, box=None) -> AugmentParams:
    """Draw one view's parameters for a width x height image from `rng`.

    The crop window is placed uniformly among the positions that keep the face box `box` (image
    coordinates, before the flip) whole, or, along a side where the box is longer than the window,
    among the positions inside the box: the view always shows the face, so a compose "face" crop is
    never empty and the target's face loss has its face. Without a box the placement is uniform."""
    flip = bool(rng.random() < FLIP_P)
    cw = max(1, round(width * rng.uniform(*CROP_KEEP)))
    ch = max(1, round(height * rng.uniform(*CROP_KEEP)))
    if box is None:
        left_range, top_range = (0, width - cw), (0, height - ch)
    else:
        x0, y0, x1, y1 = box
        if flip:
            x0, x1 = width - x1, width - x0
        left_range, top_range = _keeping(x0, x1, cw, width), _keeping(y0, y1, ch, height)
    left = int(rng.integers(left_range[0], left_range[1] + 1))
    top = int(rng.integers(top_range[0], top_range[1] + 1))
    return AugmentParams(flip, top, left, ch, cw, float(rng.uniform(*BRIGHTNESS)))


def _keeping(a: int, b: int, window: int, side: int) -> tuple[int, int]:
    """First and last offset of a `window` on [0, side) that contains [a, b), or lies inside it."""
    if b - a <= window:
        return max(0, b - window), min(a, side - window)
    return a, b - window


SIDE_WORDS = frozenset({"left", "right"})  # a tag naming a side forbids the flip
WHOLE_TAGS = frozenset({"full body"})     # a tag that a crop would make false


def keep_prompt_true(params: AugmentParams, prompt: str, width: int, height: int) -> AugmentParams:
    """`params` of a width x height image, with what would make `prompt` false undone.

    On the prompt's comma-separated tags (case and underscores aside): a tag with the word "left" or
    "right" ("facing left") forbids the flip; a tag with a colour word (data.build.COLOUR_WORDS:
    Danbooru's colour words and every synthetic palette name: "blue background", "red hair") forbids
    the brightness change (factor 1.0); the tag "full body" forbids the crop (the whole image). The
    parameters were all drawn before, so the generator's sequence does not depend on the prompt."""
    tags = [re.findall(r"[a-z]+", t.lower()) for t in prompt.replace("_", " ").split(",")]
    flip, top, left, h, w, brightness = params
    if any(SIDE_WORDS.intersection(words) for words in tags):
        flip = False
    if any(COLOUR_WORDS.intersection(words) for words in tags):
        brightness = 1.0
    if any(" ".join(words) in WHOLE_TAGS for words in tags):
        top, left, h, w = 0, 0, height, width
    return AugmentParams(flip, top, left, h, w, brightness)


def augment(params: AugmentParams, *inputs):
    """Apply one view's flip, crop and brightness to tv_tensors of one image together: an Image (the
    brightness applies to it alone), Masks and XYXY BoundingBoxes (clamped to the crop). Returns
    the inputs transformed, in order."""
    out = []
    for x in inputs:
        if params.flip:
            x = TF.horizontal_flip(x)
        x = TF.crop(x, params.top, params.left, params.height, params.width)
        if isinstance(x, tv_tensors.Image):
            x = TF.adjust_brightness(x, params.brightness)
        out.append(x)
    return tuple(out)


def augment_pil(params: AugmentParams, image: Image.Image, box, mask: Image.Image | None = None):
    """`augment` on PIL images: RGB image, face box [x0, y0, x1, y1] and optional "L" mask ->
    (image, box as four ints, mask or None) of the view."""
    tv_image = tv_tensors.Image(TF.pil_to_tensor(image))
    boxes = tv_tensors.BoundingBoxes([list(box)], format="XYXY", canvas_size=(image.height, image.width),
                                     dtype=torch.float32)
    inputs = (tv_image, boxes) if mask is None else (tv_image, boxes, tv_tensors.Mask(TF.pil_to_tensor(mask)))
    out = augment(params, *inputs)
    view_box = [int(round(v)) for v in out[1][0].tolist()]
    view_mask = TF.to_pil_image(out[2].as_subclass(torch.Tensor)) if mask is not None else None
    return TF.to_pil_image(out[0].as_subclass(torch.Tensor)), view_box, view_mask


def box_mask(box, width: int, height: int, size: int) -> torch.Tensor:
    """The pixel box [x0, y0, x1, y1] of a width x height image as a (1, size, size) mask after fit_and_pad."""
    scale, _, _, left, top = fit_box(width, height, size)
    x0, y0, x1, y1 = (round(v * scale) for v in box)
    mask = torch.zeros(1, size, size)
    mask[:, top + y0:top + max(y1, y0 + 1), left + x0:left + max(x1, x0 + 1)] = 1
    return mask


def fit_mask(mask: Image.Image, size: int) -> torch.Tensor:
    """An "L" segmentation mask (> 0 = figure) as a (1, size, size) mask in {0, 1}, placed as
    `fit_and_pad` places its image: resized with the image's filter, then thresholded at one half."""
    _, nw, nh, left, top = fit_box(mask.width, mask.height, size)
    m = torch.from_numpy(np.array(mask) > 0).float()[None, None]
    if (nh, nw) != (mask.height, mask.width):
        m = torch.nn.functional.interpolate(m, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    out = torch.zeros(1, size, size)
    out[:, top:top + nh, left:left + nw] = (m[0] >= 0.5).float()
    return out
