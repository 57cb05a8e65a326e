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

The modules: geometry.py, the one table of palettes, figure shapes and sizes; identities.py, identities
and scenes; render.py, drawing one image; generator.py, writing a dataset (`generate`, the command).
Beside them the scorers that read the generator's images against the same table: identity_score.py
(which identity's colours an image shows) and scene_score.py (which scene).
"""

from .generator import MAX_REDRAWS, MONO_TAGS, NOISE_KINDS, VQA_QUESTION, generate, main
from .geometry import (ACCESSORIES, BOTTOM_KINDS, CLOTH_COLORS, EYE_COLORS, FIGURE_SCALE, HAIR_COLORS, HAIR_STYLES,
                       OUTLINE_COLORS, PATTERNS, SCENE_ARMS, SCENE_BACKGROUNDS, SCENE_FACING, SCENE_LEGS, SKIN_TONES)
from .identities import (ACCESSORY_TAGS, PATTERN_TAGS, Artist, Character, Identity, Outfit, Scene, cloth_vocabulary,
                         draw_scene, identity_tags, make_identities, scene_prompt)
from .render import BACKGROUNDS, SUPERSAMPLE, Pose, draw_figure, pose_tags, render
