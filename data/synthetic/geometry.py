"""The one table of what the synthetic generator draws: palettes, figure shapes and sizes.

The renderer (render.py) draws from it and the scorers (identity_score.py, scene_score.py) read
images against it, so a colour or a shape changed here changes both. Figure shapes are in local
units: x from the figure's centre line (mirrored by its facing), y downwards from the local origin;
a full figure is about 106 units tall. Shapes that only the renderer draws (arms, sleeves, skirt,
pants, patterns, the eyes' highlights) stay in render.draw_figure.
"""
from __future__ import annotations

import math

import numpy as np

# ---- palettes (RGB)
HAIR_COLORS = {
    "black": (40, 35, 45), "brown": (120, 75, 40), "blonde": (240, 210, 110),
    "red": (200, 50, 45), "blue": (60, 100, 210), "pink": (245, 150, 190),
    "white": (238, 238, 245), "green": (70, 170, 90), "purple": (140, 80, 180),
    "grey": (150, 150, 160),
}
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
OUTLINE_COLORS = ((20, 20, 25), (70, 40, 30), (30, 30, 70))
SHOE = (60, 40, 35)

# ---- shading: a shaded artist darkens the far side of hair and cloth by these factors
HAIR_SHADE = 0.85
CLOTH_SHADE = 0.78
# A top's stripes or dots: a light cloth (RGB sum above LIGHT_CLOTH) darkened to PATTERN_SHADE of its
# colour, a dark one mixed PATTERN_TINT of the way to white.
LIGHT_CLOTH = 450
PATTERN_SHADE = 0.6
PATTERN_TINT = 0.6

# ---- the identity's options
HAIR_STYLES = ("long_hair", "short_hair", "twintails", "ponytail")
BOTTOM_KINDS = ("skirt", "pants")
PATTERNS = ("plain", "stripes", "dots")
ACCESSORIES = ("none", "hat", "ribbon")
OUTLINE_WIDTHS = (0.7, 1.1, 1.6, 2.1)  # an artist's outline width in output pixels at 128 px

# ---- figure shapes, local units. Polygons are point lists; an ellipse is (x, y, rx, ry).
LONG_HAIR = ((-13, 10), (13, 10), (15, 50), (-15, 50))    # back hair of long_hair
TWINTAIL = (17, 34, 5.5, 20)                               # one on each side (x and -x)
PONYTAIL = (-15, 28, 5.5, 17)
HIPS = ((-5, 62), (5, 62))
LEG = 34                                                   # hip to foot, along the leg
FOOT = (1.5, 1, 4.5, 2.5)                                  # shoe ellipse: offset from the leg's end, radii
NECK = ((-3, 22), (3, 22), (3, 30), (-3, 30))
TORSO = ((-11, 28), (11, 28), (9, 55), (-9, 55))
HEAD = (0, 14, 11, 12)
EYES_X = (-4.5, 4.5)
EYE = (1.5, 16.5, 2.2, 3.0)                                # (x offset from EYES_X, y, rx, ry)
HAIR_CAP = (13, 12.5)                                      # the front hair's cap: centre y, radius
SIDE_LEN = {"short_hair": 19, "long_hair": 24, "twintails": 22, "ponytail": 20}  # side locks' lower end (y)
HAT = ((0, -1, 10, 7), (0, 3.5, 16, 3.2))                  # crown, brim
RIBBON_BOWS = tuple(((-9, 3), (-9 + 5 * dx, 0), (-9 + 5 * dx, 6)) for dx in (-1, 1))
RIBBON_KNOT = (-9, 3, 1.5, 1.5)

HAIR_TOP = HAIR_CAP[0] - HAIR_CAP[1]                       # 0.5: the top of a figure without a hat
HAT_TOP = HAT[0][1] - HAT[0][3]                            # -8: with one
HEAD_BOTTOM = HEAD[1] + HEAD[3]                            # 26
HEAD_HEIGHT = HEAD_BOTTOM - HAIR_TOP                       # 25.5: the face box's height
FEET_WIDTH = 2 * (HIPS[1][0] + FOOT[2])                    # 19: both shoes, legs together; + 2 LEG sin(spread)

# ---- sizes and poses
FIGURE_SCALE = (0.5, 0.85)     # a full figure's height as a fraction of the image, drawn uniformly
CLOSE_UP_HEAD = (0.6, 0.85)    # a close-up's head height as a fraction of the image, drawn uniformly
LEG_SPREAD = (2.0, 22.0)       # degrees between a leg and the vertical, drawn uniformly

# Scenes (the leakage benchmark, experiments/leakage.py): a flat background from a named palette and
# a pose the prompt can name, drawn for each image independently of its identity. The background
# colours are light tints at least 58 RGB units from every hair, skin and cloth colour and at least
# 47 from each other, so that a scorer tells them from each other and from the figure.
SCENE_BACKGROUNDS = {"blue": (150, 200, 235), "green": (170, 225, 165), "purple": (205, 180, 235),
                     "grey": (190, 190, 190)}
SCENE_ARMS = {"arms_up": (105.0, 125.0), "arms_down": (5.0, 25.0)}  # both arms' angle range, degrees from hanging
SCENE_FACING = {"facing_right": 1, "facing_left": -1}               # Pose.facing
SCENE_LEGS = (2.0, 12.0)  # leg spread of a scene's figure: narrower than LEG_SPREAD, so arms up is the widest pose


def front_hair(side_len: float) -> list[tuple[float, float]]:
    """The front hair polygon: the cap over the head, the bangs, and side locks down to y = side_len."""
    y, r = HAIR_CAP
    cap = [(r * math.cos(t), y + r * math.sin(t)) for t in np.linspace(math.pi, 2 * math.pi, 13)]
    bangs = [(r, side_len), (10, side_len - 2), (10, 11), (7, 8), (5, 12), (2, 8), (-1, 12), (-4, 8), (-7, 12),
             (-10, 10), (-10, side_len - 2), (-r, side_len)]
    return [(-r, side_len), (-r, y)] + cap[1:] + bangs


def feet_bottom(spread: float) -> float:
    """Local y of the shoes' lowest point with the legs spread `spread` radians each."""
    return HIPS[1][1] + FOOT[1] + FOOT[3] + LEG * math.cos(spread)
