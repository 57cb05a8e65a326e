"""Does an image show a synthetic identity's colours? (hair, top and bottom garment of render.draw_figure)

Used to score generated images of held-out identities: ``dominant_colours(image)`` names the hair colour
(a ``HAIR_COLORS`` name) and the top and bottom garment colours (``CLOTH_COLORS`` names) of the figure in
an image; ``identity_match`` compares them with an identity; ``score`` aggregates over a list of images
and adds a chance baseline. Images: PIL, uint8 (H, W, 3) arrays or float (3, H, W) tensors in [-1, 1]
(the loader's convention), any size; they are worked on at most 64 px (antialiased bilinear, as
``data.transforms.fit_and_pad`` resizes).

Method (every shape, colour and size of the figure comes from geometry.py, the table that
``render.draw_figure`` draws from; "local units" are its figure units, the head top at y = HAIR_TOP = 0.5,
a hat top at y = HAT_TOP = -8, the feet at y ~ 97-99.5):

1. Background: a robust vertical-gradient fit to the border pixels (flat and gradient backgrounds) plus
   the colours of large flat light regions that are no figure colour (the "shapes" backgrounds);
   foreground = pixels far from every background colour and from mixes of two of them.
2. Figure frame: the foreground component with the most (dark) mass; its centre column comes from the
   lower body (legs are symmetric, arms never reach it), its head top from the central columns, its
   feet from the lowest rows (their height corrected for the leg spread read off the feet width). That
   gives the scale for two hypotheses, no hat (top at y = 0.5) and hat (top at y = -8). A component
   that fills the bottom edge with a wide top is a close-up ("portrait" pose): scale hypotheses.
3. Head model: for a hypothesis, the head, hair cap, bangs and side locks, eyes, neck, shoulders and
   hat or ribbon are drawn like ``draw_figure`` (8x supersampled) into part-coverage maps; each pixel
   is then predicted as the coverage-weighted sum of part colours. For each of the 10 hair colours, the
   other parts' colours are picked from their palettes (skin tones, outline colours, eye colours, cloth
   colours, background) by alternating minimisation of a truncated squared error. The hypothesis
   (hat or not, head position, outline width, blur, and with a hat the hair style) with the smallest
   error wins; back hair of unknown style is left out of the fit (median head position error ~0.1 px).
4. Hair: the head model's error near the hair plus a per-pixel palette likelihood in the cap zone
   (y 1-12.5, or 7-12.5 under a hat brim, plus the side locks). Per-pixel likelihoods model a pixel as a
   mix (>= 50 %) of one shade of the candidate colour with an outline, skin, shoe or background colour,
   or as a mix of two such colours (which says nothing about the candidate).
5. Top and bottom: the same per-pixel likelihood over the torso core (y 31-51, |x| <= 8) and the bottom
   garment (y 56-70, |x| <= 10, and the pants legs down to y 86), with shaded, striped and dotted shades
   of each cloth colour. The bottom may not take the top's colour (every outfit has two colours), which
   is what separates e.g. a red bottom from the red top above it; hair red and cloth red are told apart
   by where they are, never by colour.

Measured on ground-truth renders (generate(..., seed=2), 24 identities x 4 images, noise_fraction 0;
24 px = fit_and_pad of the 48 px renders; blur = PIL GaussianBlur(1), noise = additive sigma 10):

    set                 exact  hair   top    bottom   (chance exact ~0.02 with the derangement)
    48 px clean         0.88   0.90   0.94   0.96
    48 px blurred       0.64   0.69   0.97   0.93
    32 px clean         0.59   0.64   0.97   0.98
    32 px blurred       0.45   0.47   0.92   0.86
    32 px noisy         0.65   0.67   0.94   0.93
    24 px clean         0.53   0.55   0.92   0.91
    24 px blurred       0.19   0.23   0.82   0.70
    24 px noisy         0.44   0.48   0.85   0.84

Limits: the hair is the weak attribute. At 32 px a full figure's head is 4-7 px and its hair cap 1-2
pixel rows; under a hat (a third of the outfits) only about a pixel row and the back hair show, a hat
is often mistaken for hair or missed, and blur mixes the cap with the background (grey / white are
then the usual wrong answers). Top and bottom are read well down to 24 px. Close-ups show no bottom
garment (sometimes no top): those attributes are None and left out of the scores. Figures that do
not follow draw_figure's layout (two figures, a figure cut by the border, generated garbage) get a
best-effort answer. About 50-150 ms per image on one CPU core.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from common.jsonl import read_objects

from ..annotations import load_records
from .geometry import (CLOTH_COLORS, CLOTH_SHADE, EYE, EYE_COLORS, EYES_X, FEET_WIDTH, HAIR_COLORS,
                       HAIR_SHADE, HAIR_TOP, HAT, HAT_TOP, HEAD, HEAD_HEIGHT, LEG, LEG_SPREAD, LIGHT_CLOTH,
                       LONG_HAIR, NECK, OUTLINE_COLORS, PATTERN_SHADE, PATTERN_TINT, PONYTAIL, RIBBON_BOWS,
                       RIBBON_KNOT, SHOE, SIDE_LEN, SKIN_TONES, TORSO, TWINTAIL, feet_bottom, front_hair)

ATTRIBUTES = ("hair", "top", "bottom")
IDENTITY_KEYS = {"hair": "hair_color", "top": "top", "bottom": "bottom"}
HAIR_NAMES, CLOTH_NAMES = list(HAIR_COLORS), list(CLOTH_COLORS)
WORK_MAX = 64                      # images are analysed at most this large


def _f32(rows) -> np.ndarray:
    return np.array(rows, np.float32).reshape(-1, 3)


def _pattern(c):
    c = np.asarray(c, np.float32)
    return c * PATTERN_SHADE if c.sum() > LIGHT_CLOTH else c * (1 - PATTERN_TINT) + 255 * PATTERN_TINT


HAIR, CLOTH, SKIN = _f32(list(HAIR_COLORS.values())), _f32(list(CLOTH_COLORS.values())), _f32(SKIN_TONES)
LINES, EYES = _f32(OUTLINE_COLORS), _f32(list(EYE_COLORS.values()))
# Shades of each name as the renderer paints them: flat and shaded (HAIR_SHADE, CLOTH_SHADE); tops also
# mixed with their stripe (32 % cover) or dot (15 %) pattern colour.
HAIR_SHADES = np.stack([HAIR, HAIR * HAIR_SHADE], 1)                                          # (10, 2, 3)
CLOTH_SHADES = np.stack([CLOTH, CLOTH * CLOTH_SHADE] + [
    np.stack([c * (1 - t) + _pattern(c) * t for c in CLOTH]) for t in (0.32, 0.15)], 1)  # (11, 4, 3)
FIGURE_COLOURS = np.concatenate([HAIR_SHADES.reshape(-1, 3), CLOTH_SHADES.reshape(-1, 3),
                                 np.stack([_pattern(c) for c in CLOTH]), SKIN, EYES, LINES, _f32([SHOE])])
OTHERS = np.concatenate([LINES, _f32([SHOE]), SKIN])      # colours a figure pixel may be mixed with


# ----------------------------------------------------------------------------------------------
# Input and background
# ----------------------------------------------------------------------------------------------

def to_array(image) -> np.ndarray:
    """PIL image, uint8 (H, W, 3) array or float tensor (3, H, W) in [-1, 1] -> float32 (H, W, 3) in
    0..255, downsampled (antialiased bilinear) so that its longer side is at most WORK_MAX."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    elif isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(t.shape)}")
        arr = ((t.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    else:
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
        arr = arr.astype(np.float32)
    h, w, _ = arr.shape
    if max(h, w) > WORK_MAX:
        f = WORK_MAX / max(h, w)
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]
        t = F.interpolate(t, size=(max(1, round(h * f)), max(1, round(w * f))), mode="bilinear",
                          antialias=True, align_corners=False)
        arr = t[0].permute(1, 2, 0).clamp(0, 255).numpy()
    return np.ascontiguousarray(arr, dtype=np.float32)


def _seg_dist(x, a, b, tmax=1.0):
    """Distance from x to the segments a + t (b - a), t in [0, tmax] (broadcasting over leading axes)."""
    ab = b - a
    t = np.clip(((x - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-6), 0, tmax)
    return np.linalg.norm(x - (a + t[..., None] * ab), axis=-1)


def _gradient_fit(a) -> np.ndarray:
    """Robust fit of a vertical gradient to the border pixels: (H, 1, 3)."""
    h, w, _ = a.shape
    b = max(1, round(w / 16))
    ys = np.arange(h, dtype=np.float32)
    pts = np.concatenate([a[:, :b].reshape(-1, 3), a[:, w - b:].reshape(-1, 3), a[0], a[h - 1]])
    py = np.concatenate([np.repeat(ys, b), np.repeat(ys, b), np.zeros(w), np.full(w, h - 1.0)])
    X = np.stack([np.ones_like(py), py / h], 1)
    wts = np.ones(len(pts), np.float32)
    for it in range(6):
        coef = np.linalg.lstsq(X * wts[:, None], pts * wts[:, None], rcond=None)[0]
        r = np.linalg.norm(pts - X @ coef, axis=1)
        wts = (r < 25).astype(np.float32) if it >= 3 else 1.0 / np.sqrt(np.maximum(r, 3.0))
    return (np.stack([np.ones(h), ys / h], 1) @ coef).astype(np.float32)[:, None, :]


def noise_level(a) -> float:
    """Per-channel pixel noise (std) estimated from differences of neighbouring border pixels."""
    b = max(2, round(a.shape[1] / 16))
    diffs = [np.diff(a[:, :b], axis=1), np.diff(a[:, -b:], axis=1), np.diff(a[:b], axis=0), np.diff(a[-b:], axis=0)]
    d = np.abs(np.concatenate([x.reshape(-1) for x in diffs]))
    return float(1.4826 * np.median(d) / math.sqrt(2))


@dataclass
class Background:
    base: np.ndarray       # (H, 1, 3) flat or vertical-gradient colour per row
    shapes: np.ndarray     # (S, 3) colours of flat background shapes
    dist: np.ndarray       # (H, W) distance of each pixel to the background model
    noise: float = 0.0     # per-channel noise std

    @property
    def sigma(self) -> float:
        """Width of the colour likelihoods: model error plus noise (as a 3-channel distance)."""
        return math.sqrt(14.0 ** 2 + 3 * self.noise ** 2)

    @property
    def fg_thresh(self) -> float:
        return 20.0 + 2.5 * self.noise

    def colours(self, ys) -> np.ndarray:
        """Candidate background colours for pixels in rows ys: (len(ys), 1 + S, 3)."""
        cols = [self.base[ys, 0]] + [np.broadcast_to(c, (len(ys), 3)) for c in self.shapes]
        return np.stack(cols, 1)


def background(a, figure_tol=12.0) -> Background:
    """The background model of an image (see the module docstring)."""
    h, w, _ = a.shape
    noise = noise_level(a)
    flat_tol, radius = 10.0 + 3 * noise, 15.0 + 2 * noise
    base = _gradient_fit(a)
    b = max(1, round(w / 20))
    rows = np.stack([np.median(a[:, :b], 1), np.median(a[:, w - b:], 1)], 1)       # (H, 2, 3)
    d = np.minimum(np.linalg.norm(a - base, axis=2),
                   np.linalg.norm(a[:, :, None] - rows[:, None], axis=3).min(2))
    # Flat light pixels off the base colour, clustered greedily: each big cluster that is not a figure
    # colour is a background shape.
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    dev = np.zeros((h, w), np.float32)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            dev = np.maximum(dev, np.abs(p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] - a).max(2))
    cols = a[(dev < flat_tol) & (a.min(2) >= 112 - 2 * noise) & (d > radius)]
    need = max(4, 0.004 * h * w)
    shapes = []
    while len(cols) >= need and len(shapes) < 8:
        _, inv, cnt = np.unique(np.round(cols / 12).astype(int), axis=0, return_inverse=True,
                                return_counts=True)
        centre = cols[inv.ravel() == np.argmax(cnt)].mean(0)
        near = np.linalg.norm(cols - centre, axis=1) < radius
        if near.sum() < need:
            break
        centre = cols[near].mean(0)
        cols = cols[~near]
        if np.linalg.norm(FIGURE_COLOURS - centre, axis=1).min() >= figure_tol:
            shapes.append(centre)
    S = _f32(shapes)
    if len(S):
        d = np.minimum(d, np.linalg.norm(a[:, :, None] - S[None, None], axis=3).min(2))
        ends = np.concatenate([S, base.mean(0)], 0)
        for i in range(len(S)):
            for j in range(i + 1, len(ends)):
                d = np.minimum(d, _seg_dist(a, ends[i], ends[j]))
    return Background(base, S, d, noise)


# ----------------------------------------------------------------------------------------------
# Figure frame
# ----------------------------------------------------------------------------------------------

@dataclass
class Frame:
    """Local unit (x, y) of draw_figure is at pixel (cx + facing * x * s, y0 + y * s)."""
    cx: float
    y0: float
    s: float
    facing: int = 1
    style: str = "any"         # hair style, or "any": no back hair drawn, its possible area left out
    accessory: str = "none"    # "none", "hat" or "ribbon"
    portrait: bool = False     # a close-up
    feet: float = 0.0          # full figures: pixel y of the feet bottom, and its local y
    feet_local: float = 98.3

    @property
    def top_local(self) -> float:
        return HAT_TOP if self.accessory == "hat" else HAIR_TOP

    def moved(self, dx=0.0, dtop=0.0, ds=0.0) -> "Frame":
        """Centre moved by dx and figure top by dtop pixels; a full figure keeps its feet (the scale
        follows), a close-up scales by (1 + ds) about its top."""
        top = self.y0 + self.top_local * self.s + dtop
        s = self.s * (1 + ds) if self.portrait else (self.feet - top) / (self.feet_local - self.top_local)
        return replace(self, cx=self.cx + dx, y0=top - self.top_local * s, s=s)

    def with_hat(self, hat: bool) -> "Frame":
        """The same figure top and feet read as a hat top (or a hair top)."""
        fr = replace(self, accessory="hat" if hat else "none")
        top = self.y0 + self.top_local * self.s
        s = self.s if self.portrait else (self.feet - top) / (self.feet_local - fr.top_local)
        return replace(fr, s=s, y0=top - fr.top_local * s)


def _components(mask):
    """8-connected components of a boolean mask: (labels, count)."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for yy in range(max(0, y - 1), min(h, y + 2)):
                for xx in range(max(0, x - 1), min(w, x + 2)):
                    if mask[yy, xx] and not labels[yy, xx]:
                        labels[yy, xx] = n
                        stack.append((yy, xx))
    return labels, n


TOP_PAD, BOT_PAD = 0.7, 0.6   # the foreground extent exceeds the figure by about this much (px)


def initial_frames(a, bg: Background) -> list[Frame]:
    """Frame hypotheses from the foreground extent: [no hat, hat] for a full figure, or close-up scales."""
    h, w, _ = a.shape
    fg = bg.dist > bg.fg_thresh
    labels, n = _components(fg)
    if n == 0:
        return []
    mass = np.bincount(labels.ravel(), weights=(fg + 3 * (a.min(2) < 100)).ravel(), minlength=n + 1)
    comp = labels == int(np.argmax(mass[1:]) + 1)
    ys, xs = np.nonzero(comp)
    rows = np.unique(ys)
    widths = [np.ptp(xs[ys == r]) + 1 for r in rows[:max(1, int(0.3 * len(rows)))]]
    if comp[h - 1].sum() >= max(2, 0.15 * w) and np.median(widths) >= 0.45 * w:
        # A close-up: the head is 60-85 % of the image high (draw_figure's close-up poses).
        top = ys.min() + TOP_PAD
        cx = float(np.median(xs[ys < top + 0.25 * h] + 0.5))
        return [Frame(cx, top - HAIR_TOP * k * h / HEAD_HEIGHT, k * h / HEAD_HEIGHT, portrait=True)
                for k in (0.62, 0.72, 0.82)]
    top0, bot0 = ys.min(), ys.max() + 1
    lower = xs[ys + 0.5 > top0 + 0.62 * (bot0 - top0)]
    if lower.size == 0:  # no lower body (a generated image may be anything)
        return []
    cx = float(np.median(lower + 0.5))
    central = ys[np.abs(xs + 0.5 - cx) <= max(1.0, 0.07 * w)]
    if central.size == 0:  # no figure-like column (a generated image may be anything)
        return []
    top = central.min() + TOP_PAD
    wide = np.abs(xs + 0.5 - cx) <= max(2.0, 0.2 * w)
    xs, ys = xs[wide], ys[wide]
    bot = ys.max() + 1 - BOT_PAD
    feet = 98.3
    for _ in range(3):   # spread legs end higher: read the spread off the feet width
        s = (bot - top) / (feet - HAIR_TOP)
        low = ys + 0.5 > bot - 6 * s
        width = (np.ptp(xs[low]) + 1 - 2 * BOT_PAD) / s if low.any() else 21.0
        spread = math.asin(float(np.clip((width - FEET_WIDTH) / (2 * LEG), math.sin(math.radians(LEG_SPREAD[0])),
                                         math.sin(math.radians(LEG_SPREAD[1])))))
        feet = feet_bottom(spread)
    if s * 25 < 1.0:          # a figure under ~4 px high: nothing to read
        return []
    fr = Frame(cx, top - HAIR_TOP * s, s, feet=bot, feet_local=feet)
    return [fr, fr.with_hat(True)]


# ----------------------------------------------------------------------------------------------
# Head model
# ----------------------------------------------------------------------------------------------

PARTS = ("bg", "hair", "skin", "line", "eye", "top", "acc")
PART_OPTIONS = {"skin": SKIN, "line": LINES, "eye": EYES, "top": CLOTH, "acc": CLOTH}
SUPER = 8              # supersampling of the coverage maps
TRUNC = 45.0           # colour error at which a pixel counts as an outlier (arms, shapes), plus noise


def head_coverage(fr: Frame, box, line_px) -> np.ndarray:
    """Coverage of each pixel of box = (x0, y0, x1, y1) by each of PARTS, drawn like draw_figure
    (head, eyes, neck, shoulders, hair, hat or ribbon; no arms), plus a last map covering the areas
    left out of the fit (back hair and long side locks of any style, when fr.style == "any")."""
    x0, y0, x1, y1 = box
    k = SUPER
    size = ((x1 - x0) * k, (y1 - y0) * k)
    lab, unknown = Image.new("L", size, 0), Image.new("L", size, 0)
    d, du = ImageDraw.Draw(lab), ImageDraw.Draw(unknown)
    ow = max(1, int(round(line_px * k)))
    s = fr.s

    def P(x, y, flip=1):
        return (k * (fr.cx + flip * fr.facing * x * s - x0), k * (fr.y0 + y * s - y0))

    def poly(pts, part, width=ow, draw=None, flip=1):
        (draw or d).polygon([P(*q, flip) for q in pts], fill=part,
                            outline=3 if draw is None else part, width=width)

    def ell(x, y, rx, ry, part, width=ow, draw=None, flip=1):
        cx, cy = P(x, y, flip)
        (draw or d).ellipse((cx - k * rx * s, cy - k * ry * s, cx + k * rx * s, cy + k * ry * s),
                            fill=part, outline=3 if draw is None else part, width=width)

    if fr.style == "any":
        for flip in (1, -1):
            poly(LONG_HAIR, 255, draw=du)
            ell(*TWINTAIL, 255, draw=du, flip=flip)
            ell(*PONYTAIL, 255, draw=du, flip=flip)
            poly([(-13.5, 18), (-9, 18), (-9, 25), (-13.5, 25)], 255, draw=du, flip=flip)
    elif fr.style == "long_hair":
        poly(LONG_HAIR, 1)
    elif fr.style == "twintails":
        for side in (-1, 1):
            ell(side * TWINTAIL[0], *TWINTAIL[1:], 1)
    elif fr.style == "ponytail":
        ell(*PONYTAIL, 1)
    poly(NECK, 2)
    poly(TORSO, 5)
    ell(*HEAD, 2)
    for ex in EYES_X:
        ell(ex + EYE[0], *EYE[1:], 4, max(1, ow // 2))
    poly(front_hair(SIDE_LEN.get(fr.style, SIDE_LEN["short_hair"])), 1)
    if fr.accessory == "hat":
        for part in HAT:
            ell(*part, 6)
    elif fr.accessory == "ribbon":
        for bow in RIBBON_BOWS:
            poly(bow, 6)
        ell(*RIBBON_KNOT, 6)
    bh, bw = y1 - y0, x1 - x0
    block = (np.arange(bh * k) // k)[:, None] * bw + (np.arange(bw * k) // k)[None, :]
    n = len(PARTS)
    counts = np.bincount((block * n + np.asarray(lab)).ravel(), minlength=bh * bw * n)
    parts = counts.reshape(bh, bw, n).transpose(2, 0, 1)
    unknown = np.bincount(block.ravel(), weights=(np.asarray(unknown) > 0).ravel(), minlength=bh * bw)
    return np.concatenate([parts, unknown.reshape(1, bh, bw)]).astype(np.float32) / (k * k)


def _blur(maps, sigma):
    """Gaussian blur of (n, h, w) maps, edges repeated."""
    r = max(1, int(math.ceil(3 * sigma)))
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    g = (g / g.sum()).astype(np.float32)
    p = np.pad(maps, ((0, 0), (r, r), (r, r)), mode="edge")
    p = sum(g[i] * p[:, i:i + maps.shape[1], :] for i in range(len(g)))
    return sum(g[i] * p[:, :, i:i + maps.shape[2]] for i in range(len(g)))


@dataclass
class HeadFit:
    loss: np.ndarray       # (10,) error of the whole head box for each hair colour
    hair_loss: np.ndarray  # (10,) error of the pixels near the hair
    npix: int
    blur: float = 0.0      # the blur (px) the model was drawn with

    @property
    def best(self) -> float:
        return float(self.loss.min())


def fit_head(a, bg: Background, fr: Frame, box, keep=None, line_128=1.3, blur=0.0, sweeps=2) -> HeadFit:
    """The head model's truncated squared error for each hair colour (other parts' colours chosen
    from their palettes by alternating minimisation). keep: the box pixels to use (flattened)."""
    x0, y0, x1, y1 = box
    cov = head_coverage(fr, box, line_128 * a.shape[1] / 128)
    if blur > 0:
        cov = _blur(cov, blur)
    if keep is None:
        keep = cov[-1].reshape(-1) < 0.2
    near = (_blur(cov[1:2], 0.7)[0].reshape(-1) > 0.02)[keep]
    A = cov[:-1].reshape(len(PARTS), -1).T[keep]                        # (P, K)
    pix = a[y0:y1, x0:x1].reshape(-1, 3)[keep]
    P, C = len(pix), len(HAIR)
    trunc2 = (TRUNC + 2 * bg.noise) ** 2
    bg_opts = np.stack([np.broadcast_to(bg.base[y0:y1], (y1 - y0, x1 - x0, 3)).reshape(-1, 3)[keep]]
                       + [np.broadcast_to(c, (P, 3)) for c in bg.shapes])  # (nb, P, 3)
    target = pix[None] - A[None, :, 1:2] * HAIR[:, None, :]              # (C, P, 3)
    parts = [k for k in range(len(PARTS)) if k != 1 and A[:, k].sum() > 1e-3]
    contrib = {k: np.zeros((C, P, 3), np.float32) for k in parts}
    if 0 in parts:
        contrib[0] = np.broadcast_to(A[None, :, 0:1] * bg_opts[0][None], (C, P, 3))
    total = sum(contrib.values()) if parts else np.zeros((C, P, 3), np.float32)
    for _ in range(sweeps):
        for k in parts:
            rest = target - (total - contrib[k])
            opts = bg_opts if k == 0 else PART_OPTIONS[PARTS[k]][:, None, :]    # (n, P or 1, 3)
            pred = A[None, :, k:k + 1] * opts                                   # (n, P, 3)
            pred = np.broadcast_to(pred, (len(opts), P, 3))
            err = ((rest * rest).sum(-1)[:, None] - 2 * np.einsum("cpk,npk->cnp", rest, pred)
                   + (pred * pred).sum(-1)[None])                                # (C, n, P)
            pick = np.minimum(err, trunc2).sum(-1).argmin(1)
            new = pred[pick]
            total = total - contrib[k] + new
            contrib[k] = new
    err = np.minimum(((target - total) ** 2).sum(-1), trunc2)                  # (C, P)
    return HeadFit(err.sum(1), err[:, near].sum(1), P, blur)


def head_box(fr: Frame, h, w):
    return (max(0, int(math.floor(fr.cx - 27 * fr.s))), max(0, int(math.floor(fr.y0 - 11 * fr.s))),
            min(w, int(math.ceil(fr.cx + 27 * fr.s))), min(h, int(math.ceil(fr.y0 + 30 * fr.s))))


def locate(a, bg: Background) -> tuple[Optional[Frame], Optional[HeadFit]]:
    """The best frame hypothesis by the head model, and its fit."""
    h, w, _ = a.shape
    frames = initial_frames(a, bg)
    if not frames:
        return None, None
    box = head_box(frames[0], h, w)
    if box[2] - box[0] < 2 or box[3] - box[1] < 2:
        return frames[0], None
    keep = np.ones((box[3] - box[1]) * (box[2] - box[0]), bool)    # one pixel set for every hypothesis
    for f0 in frames + [f.with_hat(True) for f in frames if f.portrait]:
        keep &= head_coverage(f0, box, 1.3 * w / 128)[-1].reshape(-1) < 0.2
    if keep.sum() < 4:
        return frames[0], None

    def fit(fr, **kw):
        return fit_head(a, bg, fr, box, keep, **kw)

    def refine(fr, hf, kw, steps, rounds=3):
        """Pattern search over the centre and top (and a close-up's scale): best move per round."""
        for step in steps:
            for _ in range(rounds):
                moves = [(step, 0, 0), (-step, 0, 0), (0, step, 0), (0, -step, 0)]
                if fr.portrait:
                    moves += [(0, 0, 0.1 * step), (0, 0, -0.1 * step)]
                fits = [(fit(c, **kw), c) for c in (fr.moved(*m) for m in moves)]
                f, c = min(fits, key=lambda t: t[0].best)
                if f.best >= hf.best - 1e-6:
                    break
                fr, hf = c, f
        return fr, hf

    if frames[0].portrait:
        hyps = [f.with_hat(hat) for f in frames for hat in (False, True)]
    else:
        hyps = frames
    best = None
    for f0 in hyps:
        fr, hf = refine(f0, fit(f0), {}, (0.3,))
        if best is None or hf.best < best[1].best:
            best = (fr, hf)
    fr, hf = best
    kw = {}
    for line_128 in (0.9, 1.8):                   # outline width (0.7-2.1 px at 128 px) and blur
        for blur in (0.0, 0.7, 1.2):
            f = fit(fr, line_128=line_128, blur=blur)
            if f.best < hf.best:
                hf, kw = f, dict(line_128=line_128, blur=blur)
    fr, hf = refine(fr, hf, kw, (0.15,))
    if fr.accessory == "hat":                     # under a hat the back hair is most of what shows
        cands = [(fit_head(a, bg, c, box, None, **kw), c)
                 for c in (replace(fr, style=st, facing=fc) for st in SIDE_LEN for fc in (1, -1))]
        hf, fr = min(cands, key=lambda c: c[0].best / max(c[0].npix, 1))
    return fr, hf


# ----------------------------------------------------------------------------------------------
# Per-pixel palette likelihoods in zones
# ----------------------------------------------------------------------------------------------

def palette_scores(pix, bg_cols, shades, sigma=14.0, alpha_min=0.5, floor=1e-4) -> np.ndarray:
    """Log-likelihood of the pixels pix (P, 3) under each candidate colour (shades (n, v, 3)).

    A pixel is either a mix of one shade (at least alpha_min of it) with an 'other' colour (outline,
    shoe, skin, or one of its background colours bg_cols (P, m, 3)), or a mix of two others; each
    explanation is a Gaussian of width sigma around the closest such mix."""
    P = len(pix)
    oth = np.concatenate([np.broadcast_to(OTHERS, (P,) + OTHERS.shape), bg_cols], 1)   # (P, m, 3)
    m = oth.shape[1]
    x = pix[:, None, :]
    r_other = _seg_dist(x, np.repeat(oth, m, 1), np.tile(oth, (1, m, 1))).min(1)
    l_other = 0.5 * np.exp(-r_other ** 2 / (2 * sigma ** 2))
    out = np.zeros(len(shades))
    for i, vs in enumerate(shades):
        b = np.tile(oth, (1, len(vs), 1))
        a = np.broadcast_to(np.repeat(vs, m, 0)[None], b.shape)
        r = _seg_dist(x, a, b, 1 - alpha_min).min(1)
        out[i] = np.log(0.5 * np.exp(-r ** 2 / (2 * sigma ** 2)) + l_other + floor).sum()
    return out


def _local(fr: Frame, h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    return (xx - fr.cx) / fr.s, (yy - fr.y0) / fr.s


def zones(fr: Frame, h, w) -> dict:
    """Boolean pixel masks of the hair cap, torso core and bottom-garment zones."""
    lx, ly = _local(fr, h, w)
    ax = np.abs(lx)
    h0 = 7.0 if fr.accessory == "hat" else 1.0
    return {"hair": ((ly >= h0) & (ly <= 12.5) & (ax <= 12)) | ((ly > 12.5) & (ly <= 19) & (ax >= 10) & (ax <= 12.5)),
            "top": (ly >= 31) & (ly <= 51) & (ax <= 8),
            "bottom": ((ly >= 56) & (ly <= 70) & (ax <= 10)) | ((ly > 70) & (ly <= 86) & (ax <= 14))}


def _zone_scores(a, bg, zone, shades):
    ys, xs = np.nonzero(zone)
    return palette_scores(a[ys, xs], bg.colours(ys), shades, sigma=bg.sigma)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

MIN_ZONE_PIXELS = 2
HEAD_WEIGHT = 1.0        # weight of the head model's hair evidence against the cap-zone likelihood,
BLUR_HEAD_WEIGHT = 4.0   # times this when the image looks blurred (per-pixel mixes then mislead)


def analyse(image) -> dict:
    """dominant_colours plus the details: the figure 'frame' and per-candidate 'scores' (higher =
    better) of each attribute."""
    a = to_array(image)
    h, w, _ = a.shape
    bg = background(a)
    fr, hf = locate(a, bg)
    out = {"hair": None, "top": None, "bottom": None, "frame": fr, "scores": {}}
    if fr is None:
        return out
    z = zones(fr, h, w)
    if z["hair"].sum() >= MIN_ZONE_PIXELS or hf is not None:
        sc = _zone_scores(a, bg, z["hair"], HAIR_SHADES) if z["hair"].any() else np.zeros(len(HAIR))
        if hf is not None:   # the head model's error as a log-likelihood
            wt = HEAD_WEIGHT * (BLUR_HEAD_WEIGHT if hf.blur > 0 else 1.0)
            sc = sc - wt * (hf.hair_loss - hf.hair_loss.min()) / (2 * bg.sigma ** 2)
        out["scores"]["hair"] = dict(zip(HAIR_NAMES, sc.tolist()))
        out["hair"] = HAIR_NAMES[int(np.argmax(sc))]
    for att in ("top", "bottom"):
        if z[att].sum() < MIN_ZONE_PIXELS:
            continue
        sc = _zone_scores(a, bg, z[att], CLOTH_SHADES)
        if att == "bottom" and out["top"] is not None:
            sc[CLOTH_NAMES.index(out["top"])] = -np.inf    # an outfit's two colours always differ
        out["scores"][att] = dict(zip(CLOTH_NAMES, sc.tolist()))
        out[att] = CLOTH_NAMES[int(np.argmax(sc))]
    return out


def dominant_colours(image) -> dict:
    """{'hair': HAIR_COLORS name, 'top': CLOTH_COLORS name, 'bottom': CLOTH_COLORS name} of the figure in
    the image; an attribute is None where it is not in the picture (no figure found; a close-up's
    bottom garment, or its top when the torso is below the edge)."""
    out = analyse(image)
    return {k: out[k] for k in ATTRIBUTES}


# ----------------------------------------------------------------------------------------------
# Identities and scores
# ----------------------------------------------------------------------------------------------

def identity_from_tags(tags) -> dict:
    """The colour triple named by a sample's tags: '<hair>_hair', '<top>_shirt', '<bottom>_skirt' or
    '<bottom>_pants' (data.synthetic.identity_tags). Missing ones are None."""
    out = {"hair_color": None, "top": None, "bottom": None, "bottom_kind": None}
    for t in tags:
        name, _, kind = t.rpartition("_")
        if kind == "hair" and name in HAIR_COLORS:
            out["hair_color"] = name
        elif kind == "shirt" and name in CLOTH_COLORS:
            out["top"] = name
        elif kind in ("skirt", "pants") and name in CLOTH_COLORS:
            out["bottom"], out["bottom_kind"] = name, kind
    return out


def sample_identity(sample: dict) -> dict:
    """An annotations.jsonl record -> its identity's colours (from its tags), character and artist."""
    return {"character": sample.get("character"), "artist": sample.get("artist"),
            **identity_from_tags(sample.get("tags", []))}


def _read_truth(path: Path) -> dict:
    """{sample id: identity key} from the generator's raw/identities.jsonl ({"id", "identity"} lines)."""
    truth = {}
    for n, obj in read_objects(path):
        missing = [k for k in ("id", "identity") if k not in obj]
        if missing:
            raise ValueError(f"{path}:{n}: missing field(s) {', '.join(missing)} "
                             "(each line holds a sample id and its identity key)")
        truth[obj["id"]] = obj["identity"]
    return truth


def load_sample_identities(root) -> dict:
    """{sample id: identity dict} for a RetriBooru root; samples of one identity share one dict.

    Identity keys come from raw/identities.jsonl (the synthetic generator's ground truth,
    "character|artist|outfit number") when present, else "character|artist|hair|top|bottom". An
    identity dict has: key, character, artist, hair_color, top, bottom, bottom_kind, ids (its samples)."""
    root = Path(root)
    truth_path = root / "raw" / "identities.jsonl"
    truth = _read_truth(truth_path) if truth_path.is_file() else {}
    idents, by_sample = {}, {}
    for rec in load_records(root):
        ident = sample_identity(rec)
        key = truth.get(rec["id"]) or "|".join(str(ident[k]) for k in
                                               ("character", "artist", "hair_color", "top", "bottom"))
        if key not in idents:
            idents[key] = {"key": key, **ident, "ids": []}
        elif any(idents[key][k] != ident[k] for k in ("hair_color", "top", "bottom")):
            raise ValueError(f"sample {rec['id']}: its tags disagree with the other samples of {key}")
        idents[key]["ids"].append(rec["id"])
        by_sample[rec["id"]] = idents[key]
    return by_sample


def load_identities(root) -> dict:
    """{identity key: identity dict} (see load_sample_identities)."""
    return {ident["key"]: ident for ident in load_sample_identities(root).values()}


def _triple(identity) -> dict:
    return {att: identity.get(IDENTITY_KEYS[att], identity.get(att)) for att in ATTRIBUTES}


def identity_match(image, identity: dict) -> dict:
    """Does the image show the identity's colours? identity: a dict with hair_color, top and bottom
    (load_identities / sample_identity; 'hair' also accepted). image: anything dominant_colours takes,
    or its result. Per attribute True / False, or None where the image does not show it; exact: every
    shown attribute matches (False when none is shown)."""
    colours = image if isinstance(image, dict) else dominant_colours(image)
    want = _triple(identity)
    out = {att: None if colours.get(att) is None else colours[att] == want[att] for att in ATTRIBUTES}
    shown = [v for v in out.values() if v is not None]
    out["exact"] = bool(shown) and all(shown)
    return out


def derangement(identities: list) -> list:
    """Each identity replaced by the next one in the list (cyclically) whose colour triple differs;
    the chance baseline compares images with these."""
    n = len(identities)
    triples = [tuple(_triple(i).values()) for i in identities]
    out = []
    for i in range(n):
        j = next((j % n for j in range(i + 1, i + n) if triples[j % n] != triples[i]), (i + 1) % n)
        out.append(identities[j])
    return out


def _summary(matches: list[dict]) -> dict:
    out = {"exact": float(np.mean([m["exact"] for m in matches])),
           "exact_count": int(sum(m["exact"] for m in matches))}
    for att in ATTRIBUTES:
        shown = [m[att] for m in matches if m[att] is not None]
        out[att] = float(np.mean(shown)) if shown else float("nan")
        out[f"{att}_count"] = int(sum(shown))
        out[f"{att}_shown"] = len(shown)
    return out


def binomial_p(k: int, n: int, p0: float) -> float:
    """One-sided binomial test: P(X >= k) for X ~ Binomial(n, p0), the chance of scoring at least k
    of n by luck when each trial succeeds with probability p0 (summed in log space, exact)."""
    if k <= 0:
        return 1.0
    if p0 <= 0:
        return 0.0
    if p0 >= 1:
        return 1.0
    lp, lq = math.log(p0), math.log1p(-p0)
    terms = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq
             for j in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _identity_key(identity: dict):
    """What makes two identities the same: their key, else their colour triple."""
    return identity.get("key") or tuple(_triple(identity).values())


def candidate_identities(identities: list) -> list[dict]:
    """The distinct identities of a list (by key, else by colour triple), in first-seen order: the
    candidates that identification chooses among."""
    seen, out = set(), []
    for ident in identities:
        key = _identity_key(ident)
        if key not in seen:
            seen.add(key)
            out.append(ident)
    return out


LOG_FLOOR = -1e4   # an attribute reading that rules a candidate out (the bottom may not be the top's colour)


def identification_scores(analysis: dict, candidates: list[dict]) -> np.ndarray:
    """How well an image (`analyse`'s result) matches each candidate identity: the sum over the
    attributes the image shows of log P(candidate's colour), P the softmax of the attribute's
    colour scores. A candidate that matches every read colour scores ~0; each mismatch costs
    the reading's confidence margin."""
    total = np.zeros(len(candidates))
    for att in ATTRIBUTES:
        scores = analysis["scores"].get(att)
        if not scores:
            continue
        names = list(scores)
        v = np.array([scores[n] for n in names], dtype=np.float64)
        finite = np.isfinite(v)
        logp = np.full(len(v), LOG_FLOOR)
        top = v[finite].max()
        logp[finite] = np.maximum(v[finite] - top - np.log(np.exp(v[finite] - top).sum()), LOG_FLOOR)
        index = {n: i for i, n in enumerate(names)}
        total += [logp[index[_triple(c)[att]]] if _triple(c)[att] in index else LOG_FLOOR for c in candidates]
    return total


def identify(analysis: dict, candidates: list[dict], rng: np.random.Generator) -> int:
    """The index of the candidate identity an image matches best (`identification_scores`); ties
    (candidates with the same colours, or an image that shows none) are broken at random, so that
    an image that carries no identity picks the right one with probability 1 / len(candidates)."""
    total = identification_scores(analysis, candidates)
    best = np.flatnonzero(total >= total.max() - 1e-9)
    return int(best[rng.integers(len(best))]) if len(best) > 1 else int(best[0])


def score(images, identities: list, mismatched: Optional[list] = None, seed: int = 0) -> dict:
    """Scores of images (list, or a (N, 3, H, W) tensor in [-1, 1]) against their identities.

    Returns n; exact (fraction of images whose shown attributes all match) and exact_count; hair, top,
    bottom accuracies over the images that show the attribute (with _count and _shown); the same
    under chance_ for the images compared with `mismatched` identities (default: derangement(identities),
    each image against another identity of the list with a different colour triple), which is what
    matching by luck alone scores; the predicted colours.

    And whether the images carry their identities, as tests against chance:
    - identification: the fraction of images whose best-matching identity among the list's distinct
      identities (`identify`) is their own (per image: `identified`); chance_identification = 1 / that
      number;
    - null_X for X in exact, hair, top, bottom: the match rate against every other identity of the
      list (all pairs; the derangement's chance_X is one draw of it), estimated as
      (matches + 1/2) / (comparisons + 1) so that it is never 0;
    - p_X: the one-sided binomial p-value of X's count against its chance rate (null_X, or
      1 / identities for identification). Images of one identity share its references, so they are
      not independent trials: read p as a guide, not an exact probability."""
    images = list(images)
    if not images or len(images) != len(identities):
        raise ValueError(f"need as many identities as images, got {len(images)} images and {len(identities)}")
    mismatched = derangement(identities) if mismatched is None else list(mismatched)
    if len(mismatched) != len(images):
        raise ValueError("mismatched must have one identity per image")
    analyses = [analyse(im) for im in images]
    colours = [{k: a[k] for k in ATTRIBUTES} for a in analyses]
    out = {"n": len(images), **_summary([identity_match(c, i) for c, i in zip(colours, identities)])}
    chance = _summary([identity_match(c, i) for c, i in zip(colours, mismatched)])
    out.update({f"chance_{k}": v for k, v in chance.items()})

    candidates = candidate_identities(identities)
    rng = np.random.default_rng(seed)
    picks = [identify(a, candidates, rng) for a in analyses]
    identified = [_identity_key(candidates[j]) == _identity_key(i) for j, i in zip(picks, identities)]
    hits = sum(identified)
    out.update(identification=hits / len(images), identification_count=hits, identified=identified,
               candidates=len(candidates),
               chance_identification=1 / len(candidates),
               p_identification=binomial_p(hits, len(images), 1 / len(candidates)))
    # chance per score: every image against every other identity (with other colours)
    counts = {k: [0, 0] for k in ("exact", *ATTRIBUTES)}
    for c, ident in zip(colours, identities):
        for other in candidates:
            if tuple(_triple(other).values()) == tuple(_triple(ident).values()):
                continue
            m = identity_match(c, other)
            counts["exact"][0] += m["exact"]
            counts["exact"][1] += 1
            for att in ATTRIBUTES:
                if m[att] is not None:
                    counts[att][0] += m[att]
                    counts[att][1] += 1
    for k, (hit, total) in counts.items():
        null = (hit + 0.5) / (total + 1)
        n_k = len(images) if k == "exact" else out[f"{k}_shown"]
        out[f"null_{k}"] = null
        out[f"p_{k}"] = binomial_p(out[f"{k}_count"], n_k, null)
    out["colours"] = colours
    return out


def significance_line(result: dict, alpha: float = 1e-3) -> str:
    """One line: is retrieval real? (identification against 1 / identities, with its p-value)."""
    k, n, c = result["identification_count"], result["n"], result["candidates"]
    p = result["p_identification"]
    verdict = (f"retrieval is real (p < {alpha:g})" if p < alpha else
               f"not distinguishable from chance at p < {alpha:g}")
    return (f"identification: {k} of {n} samples ({k / n:.1%}) show their own identity's colours best among "
            f"{c} identities (chance {1 / c:.1%}); binomial p = {p:.2g}: {verdict}")
