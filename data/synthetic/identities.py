"""Who a synthetic image shows and in which scene: identities (a character's look, an outfit, an
artist's style), their tags, and the scenes of the leakage benchmark."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .geometry import (ACCESSORIES, BOTTOM_KINDS, CLOTH_COLORS, EYE_COLORS, HAIR_COLORS, HAIR_STYLES, OUTLINE_COLORS,
                       OUTLINE_WIDTHS, PATTERNS, SCENE_ARMS, SCENE_BACKGROUNDS, SCENE_FACING, SKIN_TONES)

PATTERN_TAGS = {"plain": None, "stripes": ("striped", "striped_shirt"),
                "dots": ("polka_dot", "polka_dot_shirt")}
ACCESSORY_TAGS = {"none": None, "hat": "hat", "ribbon": "hair_ribbon"}

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
    artists = [Artist(name=f"artist_{a:02d}", outline=float(rng.choice(OUTLINE_WIDTHS)),
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
