"""Drawing one synthetic image: a figure (render.draw_figure, from geometry.py's table) in a pose on a
background, with PIL at SUPERSAMPLE x the output size, then LANCZOS-downsampled."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from .geometry import (CLOSE_UP_HEAD, CLOTH_COLORS, CLOTH_SHADE, EYE, EYES_X, EYE_COLORS, FIGURE_SCALE, FOOT,
                       HAIR_CAP, HAIR_COLORS, HAIR_SHADE, HAIR_TOP, HAT, HAT_TOP, HEAD, HEAD_BOTTOM, HEAD_HEIGHT,
                       HIPS, LEG, LEG_SPREAD, LIGHT_CLOTH, LONG_HAIR, NECK, PATTERN_SHADE, PATTERN_TINT, PONYTAIL,
                       RIBBON_BOWS, RIBBON_KNOT, SCENE_ARMS, SCENE_BACKGROUNDS, SCENE_FACING, SCENE_LEGS, SHOE,
                       SIDE_LEN, SKIN_TONES, TORSO, TWINTAIL, front_hair)
from .identities import Identity, Scene

SUPERSAMPLE = 4
BACKGROUNDS = ("mixed", "flat", "white")


def _shade(rgb, f: float):
    return tuple(int(round(v * f)) for v in rgb)


def _mix(a, b, t: float):
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))


@dataclass
class Pose:
    cx: float      # figure centre x, output pixels
    top: float     # y of the local origin (head top is at local y = 2), output pixels
    scale: float   # output pixels per local unit (the figure is ~106 units tall)
    facing: int    # +1 right, -1 left
    arms: tuple    # (left, right) arm angles in degrees from hanging down, outward positive
    legs: float    # leg spread in degrees


class _Canvas:
    """An RGB picture and its figure mask, drawn together at SUPERSAMPLE x the output size."""

    def __init__(self, background: Image.Image):
        self.rgb = background
        self.mask = Image.new("L", background.size, 0)
        self.d = ImageDraw.Draw(self.rgb)
        self.m = ImageDraw.Draw(self.mask)

    def polygon(self, pts, fill, line, ow):
        self.d.polygon(pts, fill=fill, outline=line if ow else None, width=max(ow, 1))
        self.m.polygon(pts, fill=255, outline=255, width=max(ow, 1))

    def ellipse(self, box, fill, line, ow):
        self.d.ellipse(box, fill=fill, outline=line if ow else None, width=max(ow, 1))
        self.m.ellipse(box, fill=255, outline=255, width=max(ow, 1))

    def limb(self, p0, p1, width, fill, line, ow):
        """A thick segment with round ends and an outline."""
        for draw, w, colour in ((self.d, width + 2 * ow, line), (self.d, width, fill),
                                (self.m, width + 2 * ow, 255)):
            draw.line([p0, p1], fill=colour, width=int(round(w)))
            r = w / 2
            for x, y in (p0, p1):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)

    def paint_clipped(self, region, paint: Callable[[ImageDraw.ImageDraw], None], colour):
        """Paint ``colour`` where both the polygon ``region`` and what ``paint`` draws are."""
        xs, ys = [p[0] for p in region], [p[1] for p in region]
        x0, y0 = max(int(min(xs)) - 1, 0), max(int(min(ys)) - 1, 0)
        x1, y1 = min(int(max(xs)) + 2, self.rgb.width), min(int(max(ys)) + 2, self.rgb.height)
        if x1 <= x0 or y1 <= y0:
            return
        size = (x1 - x0, y1 - y0)
        clip, layer = Image.new("L", size, 0), Image.new("L", size, 0)
        ImageDraw.Draw(clip).polygon([(x - x0, y - y0) for x, y in region], fill=255)
        paint(_Offset(ImageDraw.Draw(layer), x0, y0))
        self.rgb.paste(colour, (x0, y0, x1, y1), ImageChops.multiply(clip, layer))


class _Offset:
    """Forwards line/ellipse/polygon calls to a draw object with coordinates shifted by (-x0, -y0)."""

    def __init__(self, draw, x0, y0):
        self.draw, self.x0, self.y0 = draw, x0, y0

    def line(self, pts, **kw):
        self.draw.line([(x - self.x0, y - self.y0) for x, y in pts], **kw)

    def ellipse(self, box, **kw):
        a, b, c, d = box
        self.draw.ellipse((a - self.x0, b - self.y0, c - self.x0, d - self.y0), **kw)

    def polygon(self, pts, **kw):
        self.draw.polygon([(x - self.x0, y - self.y0) for x, y in pts], **kw)


def draw_figure(cv: _Canvas, ident: Identity, pose: Pose, size: int) -> tuple[int, int, int, int]:
    """Draw one figure; return its face (head) box in output pixels, clipped to the image."""
    k = SUPERSAMPLE
    ch, of, ar = ident.character, ident.outfit, ident.artist
    f, s = pose.facing, pose.scale

    def P(x, y):  # local units -> canvas pixels (x mirrored by the facing direction)
        return (k * (pose.cx + f * x * s), k * (pose.top + y * s))

    def E(x, y, rx, ry):  # ellipse box around a local centre
        cx, cy = P(x, y)
        return (cx - k * rx * s, cy - k * ry * s, cx + k * rx * s, cy + k * ry * s)

    ow = max(1, int(round(ar.outline * k * size / 128)))
    line = ar.line_color
    skin, hair = SKIN_TONES[ch.skin], HAIR_COLORS[ch.hair_color]
    top, bottom = CLOTH_COLORS[of.top], CLOTH_COLORS[of.bottom]
    shade = CLOTH_SHADE if ar.shading else 1.0

    # Back hair.
    if ch.hair_style == "long_hair":
        cv.polygon([P(*q) for q in LONG_HAIR], hair, line, ow)
    elif ch.hair_style == "twintails":
        for side in (-1, 1):
            cv.ellipse(E(side * TWINTAIL[0], *TWINTAIL[1:]), hair, line, ow)
    elif ch.hair_style == "ponytail":
        cv.ellipse(E(*PONYTAIL), hair, line, ow)

    # Legs (skin), then the bottom garment.
    feet = []
    for (hx, hy), side in zip(HIPS, (-1, 1)):
        a = math.radians(pose.legs) * side
        feet.append((hx + LEG * math.sin(a), hy + LEG * math.cos(a)))
    for (hx, hy), (fx, fy) in zip(HIPS, feet):
        cv.limb(P(hx, hy), P(fx, fy), 6 * k * s, skin, line, ow)
    for fx, fy in feet:
        cv.ellipse(E(fx + FOOT[0], fy + FOOT[1], *FOOT[2:]), SHOE, line, ow)
    if of.bottom_kind == "skirt":
        skirt = [P(-9, 52), P(9, 52), P(17, 72), P(-17, 72)]
        cv.polygon(skirt, bottom, line, ow)
        if ar.shading:
            cv.paint_clipped(skirt, lambda d: d.polygon([P(4, 50), P(20, 50), P(20, 74), P(8, 74)],
                                                        fill=255), _shade(bottom, shade))
    else:
        for (hx, hy), (fx, fy) in zip(HIPS, feet):
            kx, ky = hx + 0.85 * (fx - hx), hy + 0.85 * (fy - hy)
            cv.limb(P(hx, hy), P(kx, ky), 8 * k * s, bottom, line, ow)
        cv.polygon([P(-9, 52), P(9, 52), P(9.5, 64), P(-9.5, 64)], bottom, line, ow)

    # Neck and torso (with pattern and shading).
    cv.polygon([P(*q) for q in NECK], skin, line, ow)
    torso = [P(*q) for q in TORSO]
    cv.polygon(torso, top, line, ow)
    pat = _shade(top, PATTERN_SHADE) if sum(top) > LIGHT_CLOTH else _mix(top, (255, 255, 255), PATTERN_TINT)
    if of.pattern == "stripes":
        def stripes(d):
            for y in range(31, 55, 5):
                d.line([P(-14, y), P(14, y)], fill=255, width=max(1, int(round(1.6 * k * s))))
        cv.paint_clipped(torso, stripes, pat)
    elif of.pattern == "dots":
        def dots(d):
            for row, y in enumerate(range(32, 56, 6)):
                for x in range(-12 + 3 * (row % 2), 13, 6):
                    d.ellipse(E(x, y, 1.3, 1.3), fill=255)
        cv.paint_clipped(torso, dots, pat)
    if ar.shading:
        cv.paint_clipped(torso, lambda d: d.polygon([P(4, 26), P(14, 26), P(14, 57), P(3, 57)],
                                                    fill=255), _shade(top, shade))
    if of.pattern != "plain" or ar.shading:
        cv.d.polygon(torso, outline=line, width=ow)  # redraw the outline over the fills

    # Arms: skin with a short sleeve and a hand.
    for side, angle in zip((-1, 1), pose.arms):
        a = math.radians(angle)
        sx, sy = side * 10, 31
        dx, dy = side * math.sin(a), math.cos(a)
        hand = (sx + 24 * dx, sy + 24 * dy)
        cv.limb(P(sx, sy), P(*hand), 5 * k * s, skin, line, ow)
        cv.limb(P(sx, sy), P(sx + 9 * dx, sy + 9 * dy), 7.5 * k * s, top, line, ow)
        cv.ellipse(E(hand[0], hand[1], 3, 3), skin, line, ow)

    # Head, face, front hair.
    cv.ellipse(E(*HEAD), skin, line, ow)
    eye = EYE_COLORS[ch.eye_color]
    for ex in EYES_X:
        cv.ellipse(E(ex + EYE[0], *EYE[1:]), eye, line, max(1, ow // 2))
        cv.d.ellipse(E(ex + 0.9, 15.4, 0.8, 0.8), fill=(255, 255, 255))
    cv.d.line([P(0.8, 22), P(2.6, 22)], fill=line, width=max(1, ow // 2 + 1))
    front = [P(*q) for q in front_hair(SIDE_LEN[ch.hair_style])]
    cv.polygon(front, hair, line, ow)
    if ar.shading:
        cv.paint_clipped(front, lambda d: d.polygon([P(6, -2), P(14, -2), P(14, 30), P(6, 30)],
                                                    fill=255), _shade(hair, HAIR_SHADE))

    # Accessory.
    acc = CLOTH_COLORS[of.accessory_color]
    if of.accessory == "hat":
        for part in HAT:
            cv.ellipse(E(*part), acc, line, ow)
    elif of.accessory == "ribbon":
        for bow in RIBBON_BOWS:
            cv.polygon([P(*q) for q in bow], acc, line, ow)
        cv.ellipse(E(*RIBBON_KNOT), acc, line, ow)

    # Face box: the head ellipse with its hair, clipped to the image.
    (xa, ya), (xb, yb) = P(-HAIR_CAP[1], HAIR_TOP), P(HAIR_CAP[1], HEAD_BOTTOM)
    x0, x1 = sorted((xa / k, xb / k))
    x0, y0 = max(0, int(math.floor(x0))), max(0, int(math.floor(ya / k)))
    x1, y1 = min(size, int(math.ceil(x1))), min(size, int(math.ceil(yb / k)))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def _background(rng: np.random.Generator, side: int, plain_white: bool,
                backgrounds: str = "mixed") -> tuple[Image.Image, str]:
    """A flat, gradient or shapes background at canvas size ("mixed"; "flat": always flat), and its tag."""
    if plain_white or backgrounds == "white":
        return Image.new("RGB", (side, side), (255, 255, 255)), "white_background"
    base = tuple(int(v) for v in rng.integers(150, 256, 3))
    kind = "flat" if backgrounds == "flat" else rng.choice(["flat", "gradient", "shapes"])
    if kind == "flat":
        return Image.new("RGB", (side, side), base), "simple_background"
    if kind == "gradient":
        other = np.array(rng.integers(120, 256, 3), dtype=np.float32)
        t = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None, None]
        grad = np.array(base, dtype=np.float32) * (1 - t) + other * t
        arr = np.broadcast_to(grad, (side, side, 3)).round().astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(arr), "RGB"), "gradient_background"
    im = Image.new("RGB", (side, side), base)
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 8))):
        colour = tuple(int(v) for v in rng.integers(120, 256, 3))
        x, y = rng.uniform(0, side, 2)
        r = rng.uniform(0.05, 0.25) * side
        if rng.random() < 0.5:
            d.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            d.rectangle((x - r, y - r, x + r, y + r), fill=colour)
    return im, "abstract_background"


def _random_pose(rng: np.random.Generator, size: int, close_up: bool,
                 slot: Optional[tuple[float, float]] = None,
                 figure_scale: tuple[float, float] = FIGURE_SCALE) -> Pose:
    """Pose and placement. ``slot`` = (x range start, end) as image fractions for two-figure images;
    a full figure is ``figure_scale`` (a uniform range) of the image high."""
    facing = 1 if rng.random() < 0.5 else -1
    arms = (float(rng.uniform(5, 160)), float(rng.uniform(5, 160)))
    legs = float(rng.uniform(*LEG_SPREAD))
    if close_up:  # head 60-85% of the image high, face box near or at the bottom edge
        scale = rng.uniform(*CLOSE_UP_HEAD) * size / HEAD_HEIGHT
        head_top = rng.uniform(0.15, 0.35) * size
        return Pose(float(rng.uniform(0.35, 0.65) * size), head_top - HAIR_TOP * scale, scale,
                    facing, arms, legs)
    lo, hi = slot if slot else (0.0, 1.0)
    scale = rng.uniform(*figure_scale) * size / 106 * (0.8 if slot else 1.0)
    y_min, y_max = 0.03 * size - HAT_TOP * scale, 0.97 * size - 99 * scale   # a hat's top to the feet
    cx = size * (lo + (hi - lo) * rng.uniform(0.3, 0.7))
    return Pose(float(cx), float(rng.uniform(y_min, max(y_min, y_max))), float(scale),
                facing, arms, legs)


def pose_tags(pose: Pose, close_up: bool) -> list[str]:
    tags = ["portrait" if close_up else "full_body", "standing", "looking_at_viewer"]
    if min(pose.arms) > 100:
        tags.append("arms_up")
    return tags


def render(ident: Identity, size: int, rng: np.random.Generator, *, close_up: bool = False,
           mono: Optional[str] = None, second: Optional[Identity] = None, backgrounds: str = "mixed",
           figure_scale: tuple[float, float] = FIGURE_SCALE, scene: Optional[Scene] = None):
    """Draw one image. Returns (rgb, mask, face_box, pose and background tags). With a `scene`, one
    full figure with the scene's arms and facing on its background (its tags: Scene.tags)."""
    side = size * SUPERSAMPLE
    if scene is not None:
        cv = _Canvas(Image.new("RGB", (side, side), SCENE_BACKGROUNDS[scene.background]))
        pose = _random_pose(rng, size, False, figure_scale=figure_scale)
        lo, hi = SCENE_ARMS[scene.arms]
        pose = replace(pose, facing=SCENE_FACING[scene.facing], arms=(float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))),
                       legs=float(rng.uniform(*SCENE_LEGS)))
        face = draw_figure(cv, ident, pose, size)
        rgb = cv.rgb.resize((size, size), Image.LANCZOS)
        mask = cv.mask.resize((size, size), Image.LANCZOS).point(lambda v: 255 if v >= 128 else 0)
        return rgb, mask, face, scene.tags()
    bg, bg_tag = _background(rng, side, plain_white=(mono == "sketch"), backgrounds=backgrounds)
    cv = _Canvas(bg)
    if second is None:
        pose = _random_pose(rng, size, close_up, figure_scale=figure_scale)
        face = draw_figure(cv, ident, pose, size)
        tags = pose_tags(pose, close_up)
    else:
        pose = _random_pose(rng, size, False, slot=(0.0, 0.5))
        face = draw_figure(cv, ident, pose, size)
        draw_figure(cv, second, _random_pose(rng, size, False, slot=(0.5, 1.0)), size)
        tags = ["full_body", "standing", "looking_at_viewer"]
    rgb = cv.rgb.resize((size, size), Image.LANCZOS)
    if mono:
        rgb = rgb.convert("L").convert("RGB")
    mask = cv.mask.resize((size, size), Image.LANCZOS).point(lambda v: 255 if v >= 128 else 0)
    return rgb, mask, face, tags + [bg_tag]


# ----------------------------------------------------------------------------------------------
