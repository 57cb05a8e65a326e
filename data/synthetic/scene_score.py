"""What scene does an image show? Background colour, arms and facing of data.synthetic's scenes.

The leakage benchmark (experiments/leakage.py) asks a model for one scene in the prompt while its
references show another, then reads the scene of each sample with these readers:

* ``background(image)``: the SCENE_BACKGROUNDS name nearest the median of the image's border pixels,
  or None when no palette colour is within BACKGROUND_TOL (a sample whose border is no scene colour);
* ``arms(image)``: "arms_up" or "arms_down" from the figure's silhouette: the widest foreground row
  in the upper 40% of the figure, over the figure's height. Raised arms (geometry.SCENE_ARMS:
  105-125 degrees from hanging) put the hands beside the head, far outside the shoulders (about 0.7
  of the height); hanging arms leave the head, hair and shoulders the widest (at most 0.5);
* ``facing(image)``: "facing_left" or "facing_right" from identity_score's head model, fitted both
  ways. At 24 px the only cues are a pixel or two of bangs, eyes and shading.

``calibrate`` measures each reader on real images with known scenes; the benchmark scores only the
readers that read real images at least MIN_ACCURACY right. Measured on the default benchmark's 64
held-out scene images (48 px renders at 24 px): background 100%, arms 95%, facing 45% (chance:
facing is not scored). The generated samples' backgrounds are grainy (border pixels about 10 RGB
units per channel from their median); with Gaussian noise of sigma 8, 12 and 16 added to the same
real images the arms reader reads 97%, 98% and 94% (without its noise-adaptive threshold and speck
filter: 97%, 64% and 9%).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import numpy as np

from . import identity_score
from .geometry import SCENE_ARMS, SCENE_BACKGROUNDS, SCENE_FACING

BACKGROUND_TOL = 40.0    # RGB distance from the border median to a palette colour (palette colours are >= 47 apart)
FOREGROUND_TOL = 40.0    # RGB distance from the background at which a pixel is figure
NOISE_FACTOR = 2.0       # ... or this times the border pixels' median distance, if more (grainy backgrounds)
NEIGHBOURS = 2           # figure pixels among a figure pixel's 8 neighbours, at least
UPPER = 0.4              # the fraction of the figure's height (from its top) where raised hands are
ARMS_SPLIT = 0.515       # widest upper row / figure height; real 24 px renders: arms up >= 0.53, down <= 0.50
MIN_ACCURACY = 0.9       # a reader that reads fewer real images right is not scored

_PALETTE = np.array(list(SCENE_BACKGROUNDS.values()), dtype=np.float32)
_NAMES = list(SCENE_BACKGROUNDS)


def _border_colour(a: np.ndarray) -> np.ndarray:
    return np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)


def background(image) -> Optional[str]:
    """The SCENE_BACKGROUNDS name of the image's background, or None when its border is no scene colour."""
    a = identity_score.to_array(image).astype(np.float32)
    d = np.linalg.norm(_PALETTE - _border_colour(a), axis=1)
    return _NAMES[int(d.argmin())] if d.min() <= BACKGROUND_TOL else None


def figure_mask(a: np.ndarray) -> np.ndarray:
    """Figure pixels of an (H, W, 3) float image: farther from the border's median colour than
    FOREGROUND_TOL, or than NOISE_FACTOR x the border's median distance from it where the background
    is grainy (as generated samples are), and with at least NEIGHBOURS figure pixels among their 8
    neighbours (a lone speck of noise is no figure; a 1-px arm has two)."""
    colour = _border_colour(a)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    tol = max(FOREGROUND_TOL, NOISE_FACTOR * float(np.median(np.linalg.norm(border - colour, axis=-1))))
    figure = np.linalg.norm(a - colour, axis=-1) > tol
    padded = np.pad(figure, 1)
    h, w = figure.shape
    neighbours = sum(padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w].astype(int)
                     for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)
    return figure & (neighbours >= NEIGHBOURS)


def arms(image) -> Optional[str]:
    """"arms_up" or "arms_down" (SCENE_ARMS tags), or None when no figure stands out of the background
    (none, or one that touches both side edges)."""
    figure = figure_mask(identity_score.to_array(image).astype(np.float32))
    rows, cols = np.flatnonzero(figure.any(axis=1)), np.flatnonzero(figure.any(axis=0))
    if len(rows) < 4 or (cols[0] == 0 and cols[-1] == figure.shape[1] - 1):
        return None   # no figure, or "figure" pixels from edge to edge: no background to read it against
    height = rows[-1] - rows[0] + 1
    upper = figure[rows[0]:rows[0] + int(np.ceil(UPPER * height))]
    width = max(np.flatnonzero(r)[-1] - np.flatnonzero(r)[0] + 1 for r in upper if r.any())
    return "arms_up" if width / height > ARMS_SPLIT else "arms_down"


def facing(image) -> Optional[str]:
    """"facing_left" or "facing_right" (SCENE_FACING tags) by the better head-model fit, or None when
    no head is found."""
    a = identity_score.to_array(image).astype(np.float32)
    bg = identity_score.background(a)
    frame, fit = identity_score.locate(a, bg)
    if frame is None or fit is None:
        return None
    box = identity_score.head_box(frame, *a.shape[:2])
    errors = {f: identity_score.fit_head(a, bg, replace(frame, facing=f), box).best for f in (1, -1)}
    side = min(errors, key=errors.get)
    return next(tag for tag, f in SCENE_FACING.items() if f == side)


READERS: dict[str, Callable] = {"background": background, "arms": arms, "facing": facing}
CHOICES = {"background": len(SCENE_BACKGROUNDS), "arms": len(SCENE_ARMS), "facing": len(SCENE_FACING)}


def scene_of(tags) -> dict:
    """{'background', 'arms', 'facing'} of an image's tags (identities.Scene.tags); None where absent."""
    out = {"background": None, "arms": None, "facing": None}
    for t in tags:
        if t.endswith("_background") and t[:-len("_background")] in SCENE_BACKGROUNDS:
            out["background"] = t[:-len("_background")]
        elif t in SCENE_ARMS:
            out["arms"] = t
        elif t in SCENE_FACING:
            out["facing"] = t
    return out


def read(image, attributes=tuple(READERS)) -> dict:
    """{attribute: reading} of one image for the given readers."""
    return {k: READERS[k](image) for k in attributes}


def calibrate(images, scenes: list[dict], attributes=tuple(READERS)) -> dict:
    """{attribute: fraction of real `images` whose reading equals their known scene (`scenes`, as
    scene_of gives)}."""
    readings = [read(im, attributes) for im in images]
    return {k: float(np.mean([r[k] == s[k] for r, s in zip(readings, scenes)])) for k in attributes}


def reliable(accuracy: dict, minimum: float = MIN_ACCURACY) -> list[str]:
    """The attributes whose reader is accurate enough to be scored."""
    return [k for k, v in accuracy.items() if v >= minimum]
