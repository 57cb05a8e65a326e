"""Procedural synthetic RetriBooru dataset (docs/design.md section 4).

Draws anime-like figures with PIL (at 4x, then LANCZOS-downsampled) and writes

* ``annotations.jsonl`` + ``images/`` + ``masks/``: the RetriBooru format, clean images only;
* ``raw/``: the construction pipeline's inputs (Danbooru-like metadata for every image, noise images
  included; simulated VQA answers; face boxes; the clothing-tag vocabulary; ground-truth identities).

An identity is a character look (hair colour and style, eye colour, skin tone) + an outfit (top and
bottom colours, bottom kind, pattern, accessory) + an artist style (outline width and colour,
shading). Identities share characters and artists; two outfits of one character always differ in
their (top colour, bottom colour) pair, so identities are recoverable from the VQA colour answers.
Each image varies pose, facing, position, scale and background. With ``--scene`` (the leakage
benchmark) the background is one of four named colours and the arms and facing are chosen, all tagged
and written as the image's prompt instead of the identity's tags. Everything is a function of
``(seed, image index)``, so the same arguments give byte-identical files. No two images of one
identity (each other's ``similar`` references) are near-duplicates by data.validate's rule: a draw
that would be one is redrawn.

    python -m data.synthetic --out DIR --identities 12 --images-per-identity 4 --size 128 --seed 0
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from .build import image_hash, is_near_duplicate

SUPERSAMPLE = 4
VQA_QUESTION = "What are the top two colors of the character's clothes?"

HAIR_COLORS = {
    "black": (40, 35, 45), "brown": (120, 75, 40), "blonde": (240, 210, 110),
    "red": (200, 50, 45), "blue": (60, 100, 210), "pink": (245, 150, 190),
    "white": (238, 238, 245), "green": (70, 170, 90), "purple": (140, 80, 180),
    "grey": (150, 150, 160),
}
HAIR_STYLES = ("long_hair", "short_hair", "twintails", "ponytail")
EYE_COLORS = {
    "blue": (50, 90, 220), "red": (200, 30, 40), "green": (40, 160, 70),
    "brown": (110, 65, 30), "purple": (130, 60, 190), "yellow": (230, 190, 30),
}
SKIN_TONES = ((255, 226, 204), (240, 196, 162), (176, 120, 84))  # the last one is tagged dark_skin
CLOTH_COLORS = {
    "red": (210, 40, 45), "blue": (40, 80, 200), "white": (245, 245, 245),
    "black": (30, 30, 35), "green": (40, 150, 70), "yellow": (245, 210, 50),
    "pink": (245, 140, 180), "purple": (130, 70, 170), "orange": (245, 140, 40),
    "grey": (140, 140, 145), "brown": (120, 80, 45),
}
BOTTOM_KINDS = ("skirt", "pants")
PATTERNS = ("plain", "stripes", "dots")
PATTERN_TAGS = {"plain": None, "stripes": ("striped", "striped_shirt"),
                "dots": ("polka_dot", "polka_dot_shirt")}
ACCESSORIES = ("none", "hat", "ribbon")
ACCESSORY_TAGS = {"none": None, "hat": "hat", "ribbon": "hair_ribbon"}
OUTLINE_COLORS = ((20, 20, 25), (70, 40, 30), (30, 30, 70))
MONO_TAGS = ("monochrome", "greyscale", "sketch")
NOISE_KINDS = ("mono", "multi", "nocloth")
FIGURE_SCALE = (0.5, 0.85)  # a full figure's height as a fraction of the image, drawn uniformly

# Scenes (the leakage benchmark, eval/leakage.py): a flat background from a named palette and a pose
# the prompt can name, drawn for each image independently of its identity. The background colours are
# light tints at least 58 RGB units from every hair, skin and cloth colour and at least 47 from each
# other, so that a scorer tells them from each other and from the figure.
SCENE_BACKGROUNDS = {"blue": (150, 200, 235), "green": (170, 225, 165), "purple": (205, 180, 235),
                     "grey": (190, 190, 190)}
SCENE_ARMS = {"arms_up": (105.0, 125.0), "arms_down": (5.0, 25.0)}  # both arms' angle range, degrees from hanging
SCENE_FACING = {"facing_right": 1, "facing_left": -1}               # Pose.facing
SCENE_LEGS = (2.0, 12.0)  # leg spread of a scene's figure: narrower than the usual 2-22, so arms up is the widest pose

MAX_REDRAWS = 100  # draws of a clean image after the first, while it near-duplicates one of its identity's

# Stream ids for numpy.random.default_rng([seed, stream, ...]).
_S_IDENTITIES, _S_LAYOUT, _S_IMAGE, _S_VQA = 0, 1, 2, 3


def cloth_vocabulary() -> list[str]:
    """Every clothing tag the generator can emit, sorted."""
    tags = {"shirt", "skirt", "pants", "hat", "hair_ribbon", "striped_shirt", "polka_dot_shirt"}
    for c in CLOTH_COLORS:
        tags.update({f"{c}_shirt", f"{c}_skirt", f"{c}_pants"})
    return sorted(tags)


# ----------------------------------------------------------------------------------------------
# Identities
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Character:
    name: str
    hair_color: str
    hair_style: str
    eye_color: str
    skin: int


@dataclass(frozen=True)
class Artist:
    name: str
    outline: float  # outline width in output pixels at 128 px
    line_color: tuple
    shading: bool


@dataclass(frozen=True)
class Outfit:
    index: int  # the character's outfit number
    top: str
    bottom: str
    bottom_kind: str
    pattern: str
    accessory: str
    accessory_color: str


@dataclass(frozen=True)
class Identity:
    character: Character
    artist: Artist
    outfit: Outfit

    @property
    def key(self) -> str:
        return f"{self.character.name}|{self.artist.name}|{self.outfit.index}"


def make_identities(n: int, seed: int, hats: bool = True) -> list[Identity]:
    """``n`` identities: identity i has character ``i % C`` and artist ``(i + i // C) % A`` with
    C = ceil(n / 3), A = ceil(n / 4); a character's outfits have distinct (top, bottom) colour pairs.
    ``hats=False`` turns the hats (which hide most of the hair) into no accessory; everything else is
    drawn as with hats."""
    rng = np.random.default_rng([seed, _S_IDENTITIES])
    n_chars, n_artists = max(1, math.ceil(n / 3)), max(1, math.ceil(n / 4))
    looks = [(h, s) for h in HAIR_COLORS for s in HAIR_STYLES]
    order = rng.permutation(len(looks))
    characters = []
    for c in range(n_chars):
        hair, style = looks[order[c % len(looks)]]
        characters.append(Character(
            name=f"char_{c:02d}", hair_color=hair, hair_style=style,
            eye_color=list(EYE_COLORS)[rng.integers(len(EYE_COLORS))],
            skin=int(rng.choice(len(SKIN_TONES), p=[0.45, 0.4, 0.15]))))
    artists = [Artist(name=f"artist_{a:02d}", outline=float(rng.choice([0.7, 1.1, 1.6, 2.1])),
                      line_color=OUTLINE_COLORS[rng.integers(len(OUTLINE_COLORS))],
                      shading=bool(rng.random() < 0.6))
               for a in range(n_artists)]
    colors = list(CLOTH_COLORS)
    pairs = [(t, b) for t in colors for b in colors if t != b]
    pair_order = {c.name: list(rng.permutation(len(pairs))) for c in characters}
    outfits_used = {c.name: 0 for c in characters}
    identities = []
    for i in range(n):
        char, artist = characters[i % n_chars], artists[(i + i // n_chars) % n_artists]
        k = outfits_used[char.name]
        outfits_used[char.name] += 1
        if k >= len(pairs):
            raise ValueError("too many outfits for one character")
        top, bottom = pairs[pair_order[char.name][k]]
        outfit = Outfit(index=k, top=top, bottom=bottom,
                        bottom_kind=BOTTOM_KINDS[rng.integers(len(BOTTOM_KINDS))],
                        pattern=PATTERNS[rng.integers(len(PATTERNS))],
                        accessory=ACCESSORIES[rng.integers(len(ACCESSORIES))],
                        accessory_color=colors[rng.integers(len(colors))])
        if outfit.accessory == "hat" and not hats:
            outfit = replace(outfit, accessory="none")
        identities.append(Identity(char, artist, outfit))
    return identities


def identity_tags(ident: Identity) -> list[str]:
    """Look and clothing tags of one identity (no pose or background tags)."""
    ch, of = ident.character, ident.outfit
    tags = [ch.hair_style, f"{ch.hair_color}_hair", f"{ch.eye_color}_eyes"]
    if ch.skin == 2:
        tags.append("dark_skin")
    tags += [f"{of.top}_shirt", "shirt", f"{of.bottom}_{of.bottom_kind}", of.bottom_kind]
    if PATTERN_TAGS[of.pattern]:
        tags += list(PATTERN_TAGS[of.pattern])
    if ACCESSORY_TAGS[of.accessory]:
        tags.append(ACCESSORY_TAGS[of.accessory])
    return tags


@dataclass(frozen=True)
class Scene:
    """What a scene prompt names: the background colour (a SCENE_BACKGROUNDS name), the arms (a
    SCENE_ARMS tag) and the facing (a SCENE_FACING tag)."""
    background: str
    arms: str
    facing: str

    def tags(self) -> list[str]:
        return ["full_body", self.arms, self.facing, f"{self.background}_background"]


def draw_scene(rng: np.random.Generator) -> Scene:
    """A uniformly drawn scene."""
    return Scene(list(SCENE_BACKGROUNDS)[rng.integers(len(SCENE_BACKGROUNDS))],
                 list(SCENE_ARMS)[rng.integers(len(SCENE_ARMS))], list(SCENE_FACING)[rng.integers(len(SCENE_FACING))])


def scene_prompt(scene: Scene) -> str:
    """The prompt of a scene image: the scene's tags after "1girl, solo", with spaces for underscores,
    and nothing of the identity (that has to come from the references)."""
    return ", ".join(t.replace("_", " ") for t in ["1girl", "solo", *scene.tags()])


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------

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
    shade = 0.78 if ar.shading else 1.0

    # Back hair.
    if ch.hair_style == "long_hair":
        cv.polygon([P(-13, 10), P(13, 10), P(15, 50), P(-15, 50)], hair, line, ow)
    elif ch.hair_style == "twintails":
        for side in (-1, 1):
            cv.ellipse(E(side * 17, 34, 5.5, 20), hair, line, ow)
    elif ch.hair_style == "ponytail":
        cv.ellipse(E(-15, 28, 5.5, 17), hair, line, ow)

    # Legs (skin), then the bottom garment.
    hips = [(-5, 62), (5, 62)]
    feet = []
    for (hx, hy), side in zip(hips, (-1, 1)):
        a = math.radians(pose.legs) * side
        feet.append((hx + 34 * math.sin(a), hy + 34 * math.cos(a)))
    for (hx, hy), (fx, fy) in zip(hips, feet):
        cv.limb(P(hx, hy), P(fx, fy), 6 * k * s, skin, line, ow)
    for fx, fy in feet:
        cv.ellipse(E(fx + 1.5, fy + 1, 4.5, 2.5), (60, 40, 35), line, ow)
    if of.bottom_kind == "skirt":
        skirt = [P(-9, 52), P(9, 52), P(17, 72), P(-17, 72)]
        cv.polygon(skirt, bottom, line, ow)
        if ar.shading:
            cv.paint_clipped(skirt, lambda d: d.polygon([P(4, 50), P(20, 50), P(20, 74), P(8, 74)],
                                                        fill=255), _shade(bottom, shade))
    else:
        for (hx, hy), (fx, fy) in zip(hips, feet):
            kx, ky = hx + 0.85 * (fx - hx), hy + 0.85 * (fy - hy)
            cv.limb(P(hx, hy), P(kx, ky), 8 * k * s, bottom, line, ow)
        cv.polygon([P(-9, 52), P(9, 52), P(9.5, 64), P(-9.5, 64)], bottom, line, ow)

    # Neck and torso (with pattern and shading).
    cv.polygon([P(-3, 22), P(3, 22), P(3, 30), P(-3, 30)], skin, line, ow)
    torso = [P(-11, 28), P(11, 28), P(9, 55), P(-9, 55)]
    cv.polygon(torso, top, line, ow)
    pat = _shade(top, 0.6) if sum(top) > 450 else _mix(top, (255, 255, 255), 0.6)
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
    cv.ellipse(E(0, 14, 11, 12), skin, line, ow)
    eye = EYE_COLORS[ch.eye_color]
    for ex in (-4.5, 4.5):
        cv.ellipse(E(ex + 1.5, 16.5, 2.2, 3.0), eye, line, max(1, ow // 2))
        cv.d.ellipse(E(ex + 0.9, 15.4, 0.8, 0.8), fill=(255, 255, 255))
    cv.d.line([P(0.8, 22), P(2.6, 22)], fill=line, width=max(1, ow // 2 + 1))
    side_len = {"short_hair": 19, "long_hair": 24, "twintails": 22, "ponytail": 20}[ch.hair_style]
    cap = [P(12.5 * math.cos(t), 13 + 12.5 * math.sin(t))
           for t in np.linspace(math.pi, 2 * math.pi, 13)]
    bangs = [P(12.5, side_len), P(10, side_len - 2), P(10, 11), P(7, 8), P(5, 12), P(2, 8),
             P(-1, 12), P(-4, 8), P(-7, 12), P(-10, 10), P(-10, side_len - 2), P(-12.5, side_len)]
    front = [P(-12.5, side_len), P(-12.5, 13)] + cap[1:] + bangs
    cv.polygon(front, hair, line, ow)
    if ar.shading:
        cv.paint_clipped(front, lambda d: d.polygon([P(6, -2), P(14, -2), P(14, 30), P(6, 30)],
                                                    fill=255), _shade(hair, 0.85))

    # Accessory.
    acc = CLOTH_COLORS[of.accessory_color]
    if of.accessory == "hat":
        cv.ellipse(E(0, -1, 10, 7), acc, line, ow)
        cv.ellipse(E(0, 3.5, 16, 3.2), acc, line, ow)
    elif of.accessory == "ribbon":
        for dx in (-1, 1):
            cv.polygon([P(-9, 3), P(-9 + 5 * dx, 0), P(-9 + 5 * dx, 6)], acc, line, ow)
        cv.ellipse(E(-9, 3, 1.5, 1.5), acc, line, ow)

    # Face box: the head ellipse with its hair, clipped to the image.
    (xa, ya), (xb, yb) = P(-12.5, 0.5), P(12.5, 26)
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
    legs = float(rng.uniform(2, 22))
    if close_up:  # head 60-85% of the image high, face box near or at the bottom edge
        scale = rng.uniform(0.6, 0.85) * size / 25.5
        head_top = rng.uniform(0.15, 0.35) * size
        return Pose(float(rng.uniform(0.35, 0.65) * size), head_top - 0.5 * scale, scale,
                    facing, arms, legs)
    lo, hi = slot if slot else (0.0, 1.0)
    scale = rng.uniform(*figure_scale) * size / 106 * (0.8 if slot else 1.0)
    y_min, y_max = 0.03 * size + 8 * scale, 0.97 * size - 99 * scale
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
# Dataset
# ----------------------------------------------------------------------------------------------

def _vqa_answer(of: Outfit, rng: np.random.Generator, error_rate: float) -> str:
    top, bottom = of.top, of.bottom
    if rng.random() < error_rate:
        if rng.random() < 0.5:
            top, bottom = bottom, top
        else:
            colours = list(CLOTH_COLORS)
            pos = int(rng.integers(2))
            old = (top, bottom)[pos]
            new = [c for c in colours if c != old][int(rng.integers(len(colours) - 1))]
            top, bottom = (new, bottom) if pos == 0 else (top, new)
    return f"{top} and {bottom}"


BACKGROUNDS = ("mixed", "flat", "white")


def _check_args(identities, images_per_identity, size, seed, vqa_error_rate, noise_fraction, backgrounds="mixed",
                figure_scale=FIGURE_SCALE):
    if not 0.2 <= figure_scale[0] <= figure_scale[1] <= 0.95:
        raise ValueError(f"figure-scale must be 0.2 <= low <= high <= 0.95, got {tuple(figure_scale)}")
    if backgrounds not in BACKGROUNDS:
        raise ValueError(f"backgrounds must be one of {BACKGROUNDS}, got {backgrounds!r}")
    if identities < 1:
        raise ValueError(f"identities must be >= 1, got {identities}")
    if images_per_identity < 2:
        raise ValueError(f"images-per-identity must be >= 2 (every sample needs a similar image), "
                         f"got {images_per_identity}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= vqa_error_rate <= 1.0:
        raise ValueError(f"vqa-error-rate must be in [0, 1], got {vqa_error_rate}")
    if not 0.0 <= noise_fraction <= 1.0:
        raise ValueError(f"noise-fraction must be in [0, 1], got {noise_fraction}")


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def generate(out: Path, identities: int, images_per_identity: int, size: int, seed: int,
             vqa_error_rate: float = 0.0, noise_fraction: float = 0.1,
             progress: Optional[Callable[[int, int], None]] = None, backgrounds: str = "mixed",
             figure_scale: tuple[float, float] = FIGURE_SCALE, hats: bool = True, scene: bool = False) -> dict:
    """Write the synthetic dataset under ``out`` and return summary counts.

    ``identities * images_per_identity`` clean images plus ``round(noise_fraction * clean)`` noise
    images (cycling monochrome/sketch/greyscale, two characters, no clothing tags). Image ids are
    assigned in a seed-dependent random order; ``progress(done, total)`` is called per image.
    ``scene``: every clean image is a full figure in a uniformly drawn Scene (a SCENE_BACKGROUNDS
    background, arms up or down, facing left or right; its tags join the image's tags) and its prompt
    is ``scene_prompt``: the scene alone, without the identity's tags.
    """
    _check_args(identities, images_per_identity, size, seed, vqa_error_rate, noise_fraction, backgrounds, figure_scale)
    if scene and backgrounds != "mixed":
        raise ValueError(f"scene draws its own backgrounds (SCENE_BACKGROUNDS); backgrounds {backgrounds!r} does not apply")
    out = Path(out)
    for sub in ("images", "masks", "raw"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    idents = make_identities(identities, seed, hats=hats)
    n_clean = identities * images_per_identity
    n_noise = int(round(noise_fraction * n_clean))
    total = n_clean + n_noise
    # slots: ("clean", identity index) or ("noise", kind index); ids are a random permutation.
    slots = [("clean", i) for i in range(identities) for _ in range(images_per_identity)]
    slots += [("noise", j) for j in range(n_noise)]
    order = np.random.default_rng([seed, _S_LAYOUT]).permutation(total)
    width = max(6, len(str(total - 1)))
    ids = [f"{k:0{width}d}" for k in range(total)]

    metadata, vqa, faces, truth, clean = [], [], [], [], []
    hashes: dict[str, list[int]] = {}  # image_hash of every clean image drawn so far, per identity
    for k in range(total):
        kind, idx = slots[order[k]]
        iid = ids[k]
        # A clean image is a `similar` reference of every other image of its identity, so it must not
        # be what data.validate (and data.build) call a near-duplicate of any of them: such a draw is
        # redrawn from the next stream (seed, image, k, attempt). About 1.5% of same-identity pairs are
        # near-duplicates at first draw; attempt 0 is the stream every earlier version used.
        for attempt in range(MAX_REDRAWS + 1):
            rng = np.random.default_rng([seed, _S_IMAGE, k] + ([attempt] if attempt else []))
            if kind == "clean":
                ident, noise = idents[idx], None
            else:
                ident, noise = idents[int(rng.integers(identities))], NOISE_KINDS[idx % len(NOISE_KINDS)]
            drawn = draw_scene(rng) if scene and noise is None else None
            close_up = drawn is None and noise is None and rng.random() < 0.1
            mono = MONO_TAGS[int(rng.integers(len(MONO_TAGS)))] if noise == "mono" else None
            second = None
            if noise == "multi":
                others = [j for j, o in enumerate(idents) if o.character != ident.character]
                second = idents[others[int(rng.integers(len(others)))]] if others else ident
            rgb, mask, face, extra = render(ident, size, rng, close_up=close_up, mono=mono,
                                            second=second, backgrounds=backgrounds, figure_scale=figure_scale,
                                            scene=drawn)
            if noise is not None:
                break
            h = image_hash(rgb)
            siblings = hashes.setdefault(ident.key, [])
            if not any(is_near_duplicate(h, other) for other in siblings):
                siblings.append(h)
                break
        else:
            raise RuntimeError(f"image {iid}: every one of {MAX_REDRAWS + 1} draws of identity {ident.key} is a "
                               f"near-duplicate of another of its images")
        rgb.save(out / "images" / f"{iid}.png")
        mask.save(out / "masks" / f"{iid}.png")

        look = identity_tags(ident)
        if noise == "nocloth":
            vocab = set(cloth_vocabulary())
            look = [t for t in look if t not in vocab and t not in ("striped", "polka_dot")]
        if noise == "multi":
            general = ["2girls", "multiple_girls"] + look + extra
            characters = [ident.character.name, second.character.name]
            artists = [ident.artist.name]
        else:
            general = ["1girl", "solo"] + look + extra + ([mono] if mono else [])
            characters, artists = [ident.character.name], [ident.artist.name]
        metadata.append({"id": iid, "image": f"images/{iid}.png", "width": size, "height": size,
                         "general_tags": general, "character_tags": characters,
                         "artist_tags": artists})
        vqa.append({"id": iid, "question": VQA_QUESTION,
                    "answer": _vqa_answer(ident.outfit, np.random.default_rng([seed, _S_VQA, k]),
                                          vqa_error_rate)})
        faces.append({"id": iid, "face_bbox": list(face)})
        if noise is None:
            truth.append({"id": iid, "identity": ident.key})
            clean.append((iid, ident, general, face, drawn))
        if progress:
            progress(k + 1, total)

    groups: dict[str, list[str]] = {}
    for iid, ident, _, _, _ in clean:
        groups.setdefault(ident.key, []).append(iid)
    vocab = set(cloth_vocabulary())
    annotations = []
    for iid, ident, tags, face, drawn in clean:
        annotations.append({
            "id": iid, "image": f"images/{iid}.png", "mask": f"masks/{iid}.png",
            "width": size, "height": size, "character": ident.character.name,
            "artist": ident.artist.name, "tags": tags,
            "cloth_tags": [t for t in tags if t in vocab],
            "prompt": scene_prompt(drawn) if drawn else ", ".join(t.replace("_", " ") for t in tags),
            "face_bbox": list(face),
            "similar": sorted(j for j in groups[ident.key] if j != iid)})

    _write_jsonl(out / "annotations.jsonl", annotations)
    _write_jsonl(out / "raw" / "metadata.jsonl", metadata)
    _write_jsonl(out / "raw" / "vqa_answers.jsonl", vqa)
    _write_jsonl(out / "raw" / "face_boxes.jsonl", faces)
    _write_jsonl(out / "raw" / "identities.jsonl", truth)
    (out / "raw" / "cloth_tags.txt").write_text("".join(t + "\n" for t in sorted(vocab)),
                                                encoding="utf-8")
    return {"images": total, "clean": n_clean, "noise": n_noise, "identities": identities,
            "characters": len({i.character.name for i in idents}),
            "artists": len({i.artist.name for i in idents}), "annotations": len(annotations)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output dataset root")
    p.add_argument("--identities", type=int, required=True)
    p.add_argument("--images-per-identity", type=int, required=True)
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vqa-error-rate", type=float, default=0.0,
                   help="probability that a VQA answer is corrupted (default 0)")
    p.add_argument("--noise-fraction", type=float, default=0.1,
                   help="extra noise images as a fraction of the clean ones (default 0.1)")
    p.add_argument("--backgrounds", choices=BACKGROUNDS, default="mixed",
                   help="mixed: flat, gradient or shapes (default); flat: one random colour; white")
    p.add_argument("--figure-scale", type=float, nargs=2, default=FIGURE_SCALE, metavar=("LOW", "HIGH"),
                   help="height of a full figure as a fraction of the image, drawn uniformly (default %(default)s)")
    p.add_argument("--no-hats", action="store_true",
                   help="no hats (a third of the outfits wear one, and it hides most of the hair)")
    p.add_argument("--scene", action="store_true",
                   help="scenes for the leakage benchmark: named background colours, arms up or down, facing "
                        "left or right, each drawn per image, tagged, and the prompt (without identity tags)")
    args = p.parse_args(argv)
    try:
        _check_args(args.identities, args.images_per_identity, args.size, args.seed,
                    args.vqa_error_rate, args.noise_fraction, args.backgrounds, tuple(args.figure_scale))
        if args.scene and args.backgrounds != "mixed":
            raise ValueError("--scene draws its own backgrounds; --backgrounds does not apply")
    except ValueError as e:
        p.error(str(e))
    start = time.perf_counter()

    def progress(done, total):
        if done == total or done % 50 == 0:
            print(f"\rsynthetic: {done}/{total} images ({time.perf_counter() - start:.1f}s)",
                  end="\n" if done == total else "", file=sys.stderr, flush=True)

    summary = generate(args.out, args.identities, args.images_per_identity, args.size, args.seed,
                       args.vqa_error_rate, args.noise_fraction, progress=progress, backgrounds=args.backgrounds,
                       figure_scale=tuple(args.figure_scale), hats=not args.no_hats, scene=args.scene)
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
