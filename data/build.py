"""RetriBooru construction pipeline (paper Supp. A.1, Algorithm 1; docs/design.md section 4).

    python -m data.build --metadata M --vqa V --cloth-tags C --masks DIR --boxes B --out OUT
                         [--root R] [--truth T] [--drop-tags a,b,...] [--question Q] [--max-similar N]

Steps:
  1. filter: drop images carrying an unwanted tag, images without exactly one character tag or
     carrying a multi-character tag (2girls, multiple_boys, 6+girls, ...), without exactly one
     artist tag, without a clothing tag (no general tag in the cloth vocabulary), whose image file
     is missing, or without a VQA answer, a mask or a face box; then images whose file is not the
     size the metadata gives, whose face box is not finite, empty, inverted or not inside the image, or
     whose mask is not a readable image of the image's size (what data.validate would refuse).
     Each dropped image is counted once, under the first reason (in the order of ``DROP_REASONS``).
  2. group the survivors by (character, artist);
  3. inside a group, images whose VQA answers ("top two colours of the character's clothes") match
     exactly after normalising case and whitespace are candidate links; order matters, so
     "red and white" != "white and red". Three rules then remove links, each counted in
     ``stats["links"]["removed"]`` (a link is an unordered pair, counted under the first rule):
     a. ``colourless_answer``: an answer that names no colour (no word of ``COLOUR_WORDS``: "yes",
        "the character is smiling") links nothing;
     b. ``near_duplicate``: two images whose perceptual hashes (``image_hash``, 128 bits) differ in at
        most ``NEAR_DUPLICATE_DISTANCE`` bits are the same picture (a re-upload, a re-saved JPEG, a
        slight crop or resize) and never each other's reference, whatever the answers say;
     c. ``max_similar`` (``--max-similar N``, unlimited by default): links are kept in id order (by
        the smaller id, then the larger) while both samples have fewer than N; a sample left with
        none then links to its first partner with room, or takes over the last link of its first
        full partner whose other end keeps one (``cap_links``).
     The remaining links are symmetric; a "cluster" in the stats is a connected set of them;
  4. keep the samples with >= 1 link; the others are dropped ("no_link").

Writes ``OUT/annotations.jsonl`` (one RetriBooru sample per line, sorted by id; image and mask
paths are relative to OUT and point at the original files, nothing is copied), ``OUT/stats.json``
and three PIL-drawn bar charts ``OUT/stats_references.png``, ``OUT/stats_characters.png`` and
``OUT/stats_cloth_tags.png``. With ``truth`` (``{"id", "identity"}`` lines) the pair precision and
recall of the ``similar`` relation over the kept samples are added to the stats. Every file is
written under a temporary name and renamed, so a full disk leaves no partial file. When no sample
is kept (no image listed, none found under the root, all dropped) nothing is written, so an
earlier build in OUT stays as it was, and the command exits with status 1 naming the root. An OUT
that is a file (or lies under one) is refused before anything is read (status 2). No NaN or
Infinity is ever written (not JSON).

Runtime dependencies: the standard library, numpy and PIL only. Every image that passes the tag
and file filters has its header read (its size) and its mask decoded; only images that have a
candidate link (after rule a) are decoded, once each, to hash them; one that cannot be read is
dropped as "no_image".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import Counter, defaultdict
from itertools import combinations

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from common.images import WriteError, open_image, to_rgb, write_atomically
from common.jsonl import read_objects

DEFAULT_DROP_TAGS = (
    "monochrome", "greyscale", "grayscale", "sketch", "comic", "lineart", "text_only_page",
    "4koma", "2koma", "manga", "partially_colored", "spot_color", "doujin_cover", "cover_page",
    "character_sheet", "reference_sheet", "multiple_views", "translation_request", "no_humans",
)

# Explicit multi-character general tags; numbered forms (2girls, 6+boys, ...) are matched by regex.
MULTI_CHARACTER_TAGS = frozenset({
    "multiple_girls", "multiple_boys", "multiple_others", "multiple_persona", "everyone",
    "crowd", "group_picture",
})
_MULTI_RE = re.compile(r"^(?:[2-9]|[1-9]\d+)\+?(?:girls|boys|others)$")

DROP_REASONS = (
    "unwanted_tag",        # carries one of drop_tags
    "not_single_character",  # != 1 character tag, or a multi-character general tag
    "not_single_artist",   # != 1 artist tag (needed for the (character, artist) grouping)
    "no_cloth_tag",        # no general tag in the clothing vocabulary
    "no_image",            # image file missing under root, or unreadable (found when its size is read, after
                           # the checks up to no_face_box, or when it is hashed: a mode the loader refuses too)
    "no_vqa_answer",       # no (or empty) answer
    "no_mask",             # <masks>/<id>.png missing
    "no_face_box",         # no face box line
    "size_mismatch",       # the image file's size is not the metadata's width x height
    "bad_face_box",        # a face box coordinate not finite, or the box empty / inverted / not inside the image
    "bad_mask",            # the mask is not a readable image (as the loader reads it) of the image's size
    "no_link",             # survived the filters (and the hash) but kept no link (see LINK_RULES)
)

# Rules that remove candidate links (images of one (character, artist) with equal answers), in the
# order they apply; stats["links"]["removed"] counts each removed pair under the first that applies.
LINK_RULES = ("colourless_answer", "near_duplicate", "max_similar")

# Words that name a colour in a VQA answer. An answer with none of them ("yes", "the character is
# smiling", "i don't know") says nothing about the clothes, so two such equal answers link nothing.
# It holds every clothing colour data.synthetic draws (CLOTH_COLORS, tested) and the colour words of
# Danbooru's colour tags and common VQA answers; answers are split on anything but a-z, so
# "light-blue" and "blue/white" name colours. Modifiers alone ("dark", "light") are not colours.
COLOUR_WORDS = frozenset({
    "red", "blue", "white", "black", "green", "yellow", "pink", "purple", "orange", "grey", "gray",
    "brown", "aqua", "cyan", "teal", "turquoise", "navy", "indigo", "violet", "lavender", "magenta",
    "maroon", "burgundy", "crimson", "scarlet", "beige", "tan", "khaki", "cream", "ivory", "gold",
    "golden", "silver", "blonde", "blond", "olive", "lime", "mint", "peach", "coral", "salmon",
    "amber", "bronze", "copper", "charcoal", "rose", "emerald",
})

# The perceptual hash (image_hash): HASH_GRID x HASH_GRID horizontal differences of a
# (HASH_GRID + 1) x HASH_GRID grey thumbnail plus as many vertical ones of a HASH_GRID x
# (HASH_GRID + 1) thumbnail, both resized with LANCZOS: 2 * 8 * 8 = 128 bits.
HASH_GRID = 8
HASH_BITS = 2 * HASH_GRID * HASH_GRID

# Two images whose hashes differ in at most this many of the 128 bits are one picture, never each
# other's reference. Measured on data.synthetic images (60 identities x 4 images at 64 px mixed,
# 128 px mixed, 128 px flat and 64 px white backgrounds: 960 images, 1,440 same-identity pairs;
# data/README.md has the numbers): a PNG re-save is 0 bits away, JPEG q75-q90 re-saves and 0.5x-1.5x
# resizes at most 19; 2-3 % crops of one, two or four sides at most 31 (99th percentile 21), and
# with a resize and a JPEG re-save after the crop 30 (99th percentile 24). Two different images of
# one identity (another pose, position, scale, background) are at least 10 bits apart, 27 at the
# 1st percentile. At 24 every re-save and resize is caught and 99.8 % of all the copies (the 36
# misses of 21,120 are crops, 32 of them 3 % off two sides, that move a small figure across the
# thumbnail grid), while 5 of the
# 1,440 same-identity pairs (0.35 %: the same figure drawn at nearly the same place and pose) are
# taken for copies; 22 would miss 0.5 % of the copies, 26 would take 1 % of the pairs.
NEAR_DUPLICATE_DISTANCE = 24

TOP_CHARACTERS = 15   # paper Fig. 2: top-15 characters
TOP_CLOTH_TAGS = 30   # paper Fig. 2: top-30 cloth tags

_META_FIELDS = ("id", "image", "width", "height", "general_tags", "character_tags", "artist_tags")


class BuildError(ValueError):
    """Malformed or inconsistent input; the message names the file (and line where relevant)."""


# ----------------------------------------------------------------------------------------- input

def _read_jsonl(path, required):
    """Yield (line_number, object) for each non-blank line; errors name file and line."""
    for n, obj in read_objects(path, BuildError):
        missing = [k for k in required if k not in obj]
        if missing:
            raise BuildError(f"{path}:{n}: missing field(s) {', '.join(missing)}")
        yield n, obj


def _check_str_list(obj, key, path, n):
    v = obj[key]
    if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
        raise BuildError(f"{path}:{n}: field {key!r} must be a list of strings")
    return v


def _key(id_):
    """Lookup key for an id, so 5 in one file matches "5" in another."""
    return str(id_)


def normalize_answer(answer: str) -> str:
    """Case- and whitespace-normalised VQA answer (order and punctuation are kept)."""
    return " ".join(str(answer).lower().split())


def names_colour(answer: str) -> bool:
    """Whether a (normalised or raw) VQA answer names a colour (a word of ``COLOUR_WORDS``)."""
    return any(w in COLOUR_WORDS for w in re.findall(r"[a-z]+", str(answer).lower()))


def image_hash(image) -> int:
    """128-bit difference hash of an image (a ``PIL.Image`` or a path), as an int.

    The image is seen as the loader sees it (common.images.to_rgb: 16-bit scaled, alpha over
    white), then grey; bit i of the first 64 is
    "this thumbnail pixel is brighter than its right neighbour" on a 9x8 LANCZOS thumbnail, of the
    last 64 "brighter than the pixel below" on an 8x9 one. A re-save, a small resize or a slight
    crop moves few bits; ``hash_distance`` counts them. A path that cannot be read raises OSError
    (PIL's UnidentifiedImageError is one); an image whose mode the loader refuses raises
    UnsupportedImage (a ValueError)."""
    if not isinstance(image, Image.Image):
        with Image.open(image) as im:
            im.load()
            return image_hash(to_rgb(im, f"image {image}"))
    grey = to_rgb(image).convert("L")
    n = HASH_GRID
    across = np.asarray(grey.resize((n + 1, n), Image.Resampling.LANCZOS), dtype=np.int16)
    down = np.asarray(grey.resize((n, n + 1), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = np.concatenate([(across[:, :-1] > across[:, 1:]).ravel(), (down[:-1, :] > down[1:, :]).ravel()])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hash_distance(a: int, b: int) -> int:
    """Hamming distance between two ``image_hash`` values (0 ... HASH_BITS)."""
    return bin(a ^ b).count("1")


def is_near_duplicate(a: int, b: int) -> bool:
    """The near-duplicate rule, shared by the build and the validator."""
    return hash_distance(a, b) <= NEAR_DUPLICATE_DISTANCE


def _is_multi_character(tag: str) -> bool:
    return tag in MULTI_CHARACTER_TAGS or bool(_MULTI_RE.match(tag))


def _sort_key(id_):
    # Numbers sort numerically and before strings; strings sort lexically.
    if isinstance(id_, (int, float)) and not isinstance(id_, bool):
        return (0, id_, "")
    return (1, 0, str(id_))


def _load_metadata(path):
    rows, seen = [], {}
    for n, obj in _read_jsonl(path, _META_FIELDS):
        for k in ("general_tags", "character_tags", "artist_tags"):
            _check_str_list(obj, k, path, n)
        for k in ("width", "height"):
            if not isinstance(obj[k], int) or isinstance(obj[k], bool) or obj[k] <= 0:
                raise BuildError(f"{path}:{n}: field {k!r} must be a positive integer")
        if not isinstance(obj["image"], str) or not obj["image"]:
            raise BuildError(f"{path}:{n}: field 'image' must be a non-empty string")
        if isinstance(obj["id"], float) and not math.isfinite(obj["id"]):   # it is written back
            raise BuildError(f"{path}:{n}: field 'id' is {obj['id']}, expected a string or a finite number")
        k = _key(obj["id"])
        if k in seen:
            raise BuildError(f"{path}:{n}: duplicate id {obj['id']!r} (first on line {seen[k]})")
        seen[k] = n
        rows.append(obj)
    return rows


def _load_vqa(path, question=None):
    """id key -> normalised answer. With ``question`` only lines asking it (normalised) count."""
    out, where = {}, {}
    q = normalize_answer(question) if question is not None else None
    for n, obj in _read_jsonl(path, ("id", "answer") if q is None else ("id", "question", "answer")):
        if q is not None and normalize_answer(obj["question"]) != q:
            continue
        if not isinstance(obj["answer"], str):
            raise BuildError(f"{path}:{n}: field 'answer' must be a string")
        k, a = _key(obj["id"]), normalize_answer(obj["answer"])
        if k in out and out[k] != a:
            raise BuildError(f"{path}:{n}: conflicting second answer for id {obj['id']!r} "
                             f"(first on line {where[k]}); pass question= to select one")
        out[k], where[k] = a, n
    return out


def _load_boxes(path):
    out = {}
    for n, obj in _read_jsonl(path, ("id", "face_bbox")):
        b = obj["face_bbox"]
        if (not isinstance(b, list) or len(b) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)):
            raise BuildError(f"{path}:{n}: field 'face_bbox' must be [x0, y0, x1, y1] numbers")
        out[_key(obj["id"])] = b
    return out


def box_inside(box, width, height) -> bool:
    """Whether [x0, y0, x1, y1] is finite, non-empty and inside a width x height image (the
    validator's face box rule: 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height)."""
    if any(isinstance(v, float) and not math.isfinite(v) for v in box):
        return False
    x0, y0, x1, y1 = box
    return 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


def _file_problem(row, image_path, mask_path, box):
    """(drop reason, what is wrong) for a sample whose image file, face box or mask disagrees with
    its metadata, or (None, "") when they agree. Only the image's header is read; the mask is
    decoded as the loader decodes it (common.images.open_image)."""
    size = (row["width"], row["height"])
    try:
        with Image.open(image_path) as im:
            actual = im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return "no_image", f"cannot read {image_path} ({e})"
    if actual != size:
        return "size_mismatch", f"{image_path} is {actual[0]}x{actual[1]}, the metadata says {size[0]}x{size[1]}"
    if not box_inside(box, *size):
        return "bad_face_box", f"face box {box} of {image_path} is not inside its {size[0]}x{size[1]} pixels"
    try:
        mask = open_image(mask_path, "mask", grey=True)
    except ValueError as e:
        return "bad_mask", str(e)
    if mask.size != size:
        return "bad_mask", f"mask {mask_path} is {mask.size[0]}x{mask.size[1]}, its image {size[0]}x{size[1]}"
    return None, ""


def _load_truth(path):
    return {_key(obj["id"]): obj["identity"] for _, obj in _read_jsonl(path, ("id", "identity"))}


def _load_cloth_tags(path):
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return {t.strip() for t in f if t.strip() and not t.lstrip().startswith("#")}
    except OSError as e:
        raise BuildError(f"{path}: cannot open: {e.strerror or e}") from None


# ----------------------------------------------------------------------------------------- build

def _out_problem(out):
    """Why ``out`` cannot be the output folder (it, or the nearest of its parents that exists, is not
    a folder), or None."""
    path = os.path.abspath(out)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if os.path.isdir(path):
        return None
    where = "is not a folder" if path == os.path.abspath(out) else f"lies under {path}, not a folder"
    return f"--out {out} {where}; expected a folder or a path that does not exist yet"


def build(metadata, vqa, cloth_tags, masks, boxes, out, root=None, truth=None,
          drop_tags=DEFAULT_DROP_TAGS, question=None, log=None, max_similar=None) -> dict:
    """Run the construction pipeline; write annotations.jsonl, stats.json and the charts to ``out``.

    ``root`` is the folder image paths in ``metadata`` are relative to (default: the parent of the
    metadata file's folder). ``question`` optionally selects VQA lines by their question (default:
    every line counts; two different answers for one id are an error). ``max_similar`` caps every
    ``similar`` list (None: no cap; see the module docstring for which links stay). ``log`` is an
    optional ``callable(str)`` for progress messages (the CLI passes a stderr printer). Returns the
    stats.
    """
    if max_similar is not None and (isinstance(max_similar, bool) or not isinstance(max_similar, int)
                                    or max_similar < 1):
        raise BuildError(f"max_similar must be a positive integer or None, got {max_similar!r}")
    say = log or (lambda msg: None)
    metadata, vqa, cloth_tags = os.fspath(metadata), os.fspath(vqa), os.fspath(cloth_tags)
    masks, boxes, out = os.fspath(masks), os.fspath(boxes), os.fspath(out)
    if root is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(metadata)))
    root = os.fspath(root)
    if not os.path.isdir(masks):
        raise BuildError(f"{masks}: mask folder does not exist")
    problem = _out_problem(out)
    if problem:
        raise BuildError(problem)
    drop = set(drop_tags)

    rows = _load_metadata(metadata)
    answers = _load_vqa(vqa, question)
    face_boxes = _load_boxes(boxes)
    cloth_vocab = _load_cloth_tags(cloth_tags)
    identities = _load_truth(truth) if truth is not None else None
    say(f"loaded {len(rows)} metadata rows, {len(answers)} answers, {len(face_boxes)} face boxes, "
        f"{len(cloth_vocab)} cloth tags")

    dropped = {r: 0 for r in DROP_REASONS}
    candidates, told = [], set()
    for row in rows:
        k = _key(row["id"])
        general = row["general_tags"]
        image_path = os.path.join(root, row["image"])
        mask_path = os.path.join(masks, f"{k}.png")
        if any(t in drop for t in general + row["character_tags"] + row["artist_tags"]):
            reason = "unwanted_tag"
        elif len(row["character_tags"]) != 1 or any(_is_multi_character(t) for t in general):
            reason = "not_single_character"
        elif len(row["artist_tags"]) != 1:
            reason = "not_single_artist"
        elif not any(t in cloth_vocab for t in general):
            reason = "no_cloth_tag"
        elif not os.path.isfile(image_path):
            reason = "no_image"
        elif not answers.get(k):
            reason = "no_vqa_answer"
        elif not os.path.isfile(mask_path):
            reason = "no_mask"
        elif k not in face_boxes:
            reason = "no_face_box"
        else:
            reason, why = _file_problem(row, image_path, mask_path, face_boxes[k])
            if reason and reason not in told:   # a wrong metadata column would log every image
                told.add(reason)
                say(f"{why}; dropped as {reason} (the first such; the stats count them all)")
        if reason:
            dropped[reason] += 1
            continue
        candidates.append((row, image_path, mask_path))
    say(f"{len(candidates)} images pass the filters")

    # Group by (character, artist), then by normalised answer: equal answers are candidate links.
    groups = defaultdict(list)
    for row, image_path, mask_path in candidates:
        groups[(row["character_tags"][0], row["artist_tags"][0], answers[_key(row["id"])])].append(
            (row, image_path, mask_path))

    removed = {rule: 0 for rule in LINK_RULES}
    hashes, n_candidates, unreadable = {}, 0, 0
    neighbours = defaultdict(list)          # id key -> linked id keys (symmetric)
    entries = {}                            # id key -> (row, image_path, mask_path)
    for (_, _, answer), members in groups.items():
        for m in members:
            entries[_key(m[0]["id"])] = m
        if len(members) < 2:
            continue
        if not names_colour(answer):
            pairs = len(members) * (len(members) - 1) // 2
            n_candidates += pairs
            removed["colourless_answer"] += pairs
            continue
        readable = []
        for m in members:
            try:
                hashes[_key(m[0]["id"])] = image_hash(m[1])
                readable.append(m)
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
                say(f"cannot read {m[1]} ({e}); dropped as no_image")
                dropped["no_image"] += 1
                unreadable += 1
                del entries[_key(m[0]["id"])]
        readable.sort(key=lambda m: _sort_key(m[0]["id"]))
        for a, b in combinations([_key(m[0]["id"]) for m in readable], 2):
            n_candidates += 1
            if is_near_duplicate(hashes[a], hashes[b]):
                removed["near_duplicate"] += 1
            else:
                neighbours[a].append(b)
                neighbours[b].append(a)
    if max_similar is not None:
        neighbours, removed["max_similar"] = cap_links(neighbours, max_similar, entries)
    links = sorted({(a, b) if _sort_key(entries[a][0]["id"]) <= _sort_key(entries[b][0]["id"]) else (b, a)
                    for a, nbrs in neighbours.items() for b in nbrs},
                   key=lambda ab: (_sort_key(entries[ab[0]][0]["id"]), _sort_key(entries[ab[1]][0]["id"])))
    say(f"{n_candidates} candidate links (equal answers); removed " +
        ", ".join(f"{removed[r]} {r}" for r in LINK_RULES) + f"; {len(links)} kept")

    out_abs = os.path.abspath(out)
    samples = []
    for k, (row, image_path, mask_path) in entries.items():
        if not neighbours.get(k):
            dropped["no_link"] += 1
            continue
        general = row["general_tags"]
        samples.append({
            "id": row["id"],
            "image": os.path.relpath(os.path.abspath(image_path), out_abs),
            "mask": os.path.relpath(os.path.abspath(mask_path), out_abs),
            "width": row["width"],
            "height": row["height"],
            "character": row["character_tags"][0],
            "artist": row["artist_tags"][0],
            "tags": list(general),
            "cloth_tags": [t for t in general if t in cloth_vocab],
            "prompt": ", ".join(t.replace("_", " ") for t in general),
            "face_bbox": face_boxes[k],
            "similar": sorted((entries[j][0]["id"] for j in neighbours[k]), key=_sort_key),
        })
    samples.sort(key=lambda s: _sort_key(s["id"]))
    kept_clusters = _components(links)

    ref_hist = Counter(len(s["similar"]) for s in samples)
    char_counts = Counter(s["character"] for s in samples)
    cloth_counts = Counter(t for s in samples for t in s["cloth_tags"])
    stats = {
        "input_images": len(rows),
        "dropped": dropped,
        "dropped_total": sum(dropped.values()),
        "passed_filters": len(candidates) - unreadable,
        "kept_samples": len(samples),
        "clusters": len(kept_clusters),
        "character_artist_groups": len({(s["character"], s["artist"]) for s in samples}),
        "links": {
            "candidates": n_candidates,
            "removed": removed,
            "kept": len(links),
            "near_duplicate_distance": NEAR_DUPLICATE_DISTANCE,
            "max_similar": max_similar,
        },
        "references_histogram": {str(n): ref_hist[n] for n in sorted(ref_hist)},
        "top_characters": [[c, n] for c, n in _top(char_counts, TOP_CHARACTERS)],
        "top_cloth_tags": [[t, n] for t, n in _top(cloth_counts, TOP_CLOTH_TAGS)],
    }
    if identities is not None:
        stats["truth"] = pair_precision_recall(links, [_key(x["id"]) for x in samples], identities)

    if not samples:   # nothing is written: an earlier build in `out` stays as it was
        say(f"kept no sample; nothing written to {out}")
        return stats
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:   # made a file, or read-only, since the check above
        raise WriteError(out, e) from None
    _write_text(os.path.join(out, "annotations.jsonl"),
                "".join(json.dumps(s, ensure_ascii=False, allow_nan=False) + "\n" for s in samples))
    _write_text(os.path.join(out, "stats.json"),
                json.dumps(stats, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    bar_chart(os.path.join(out, "stats_references.png"),
              "Same-identity references per sample",
              [str(n) for n in sorted(ref_hist)], [ref_hist[n] for n in sorted(ref_hist)],
              label_title="# references", value_title="# samples")
    bar_chart(os.path.join(out, "stats_characters.png"),
              f"Top {TOP_CHARACTERS} characters by sample count",
              [c for c, _ in stats["top_characters"]], [n for _, n in stats["top_characters"]],
              label_title="character", value_title="# samples")
    bar_chart(os.path.join(out, "stats_cloth_tags.png"),
              f"Top {TOP_CLOTH_TAGS} clothing tags",
              [t for t, _ in stats["top_cloth_tags"]], [n for _, n in stats["top_cloth_tags"]],
              label_title="cloth tag", value_title="# samples")
    say(f"kept {len(samples)} samples in {len(kept_clusters)} clusters -> {out}")
    return stats


def _write_text(path, text):
    """Write `text` atomically (common.images.write_atomically: a full disk leaves no partial file)."""
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _top(counter, k):
    """Most common first; ties broken by name so the output is deterministic."""
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def cap_links(neighbours, n, entries=None):
    """Cap every sample's links at ``n``, keeping them symmetric; return (new neighbours, removed).

    ``neighbours`` maps an id key to its linked id keys (symmetric); ``entries`` (id key -> entry whose
    first item is the metadata row) gives the ids to order by (default: the keys). Links are taken in
    id order (by the smaller id, then the larger) while both ends have fewer than ``n``: in a clique
    of m > n + 1 images the first n + 1 ids link to each other, the next n + 1 too, and so on. Then
    each sample the cap left without a link (in id order) links to its first partner in id order
    that has room or can hand over its last link whose other end keeps at least one. In a clique no
    sample loses all its links to the cap unless ``n == 1`` and the clique is odd (its last sample
    stays alone); in other graphs (near-duplicate links removed) a sample rarely can. Such samples
    are dropped as no_link. ``removed`` counts the unordered links the cap removed."""
    order = (lambda k: _sort_key(entries[k][0]["id"])) if entries is not None else _sort_key
    nodes = sorted(neighbours, key=order)
    rank = {k: i for i, k in enumerate(nodes)}
    kept = {k: [] for k in nodes}
    pairs = sorted({(min(rank[a], rank[b]), max(rank[a], rank[b])) for a in nodes for b in neighbours[a]})
    for i, j in pairs:
        a, b = nodes[i], nodes[j]
        if len(kept[a]) < n and len(kept[b]) < n:
            kept[a].append(b)
            kept[b].append(a)
    for x in nodes:
        if kept[x] or not neighbours[x]:
            continue
        for p in sorted(neighbours[x], key=order):
            if len(kept[p]) >= n:   # full: hand over its last link whose other end keeps one
                q = next((q for q in reversed(kept[p]) if len(kept[q]) >= 2), None)
                if q is None:
                    continue
                kept[p].remove(q)
                kept[q].remove(p)
            kept[p].append(x)
            kept[x].append(p)
            break
    before = sum(len(v) for v in neighbours.values()) // 2
    after = sum(len(v) for v in kept.values()) // 2
    return {k: v for k, v in kept.items() if v}, before - after


def _components(links):
    """Connected sets (lists of id keys, each >= 2) of an undirected list of (a, b) links."""
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in links:
        parent[find(a)] = find(b)
    groups = defaultdict(list)
    for x in parent:
        groups[find(x)].append(x)
    return list(groups.values())


def pair_precision_recall(links, samples, identities) -> dict:
    """Pair precision / recall of the ``similar`` relation vs "same ground-truth identity".

    ``links``: the kept (a, b) id-key pairs; ``samples``: the kept samples' id keys. Over the kept
    samples that have a ground-truth identity (the others are counted in ``missing_truth`` and take
    part in no pair). Predicted pairs: the links; true pairs: unordered pairs of kept samples with
    equal identity (a near-duplicate pair or a pair over ``--max-similar`` is true but never
    predicted). With no link removed by a rule the links are exactly the pairs inside each cluster.
    A ratio with a zero denominator is reported as null.
    """
    known = [k for k in samples if k in identities]
    predicted = tp = 0
    for a, b in links:
        if a in identities and b in identities:
            predicted += 1
            tp += identities[a] == identities[b]
    by_identity = Counter(identities[k] for k in known)
    true_pairs = sum(n * (n - 1) // 2 for n in by_identity.values())
    return {
        "precision": tp / predicted if predicted else None,
        "recall": tp / true_pairs if true_pairs else None,
        "true_positive_pairs": tp,
        "predicted_pairs": predicted,
        "true_pairs": true_pairs,
        "evaluated_samples": len(known),
        "missing_truth": len(samples) - len(known),
    }


# ----------------------------------------------------------------------------------------- charts

def _font(size):
    try:
        return ImageFont.load_default(size=size)   # Pillow >= 10.1 (scalable when FreeType is there)
    except TypeError:
        return ImageFont.load_default()


def _text_size(draw, text, font):
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def bar_chart(path, title, labels, values, label_title="", value_title=""):
    """Horizontal bar chart (PIL only): title, one labelled bar per row with its value at the end."""
    font, title_font = _font(14), _font(18)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [str(s) for s in labels] or ["(none)"]
    values = list(values) or [0]
    row_h = max(22, _text_size(probe, "Ag", font)[1] + 10)
    label_w = max([_text_size(probe, s, font)[0] for s in labels + [label_title]]) + 16
    title_w, title_h = _text_size(probe, title, title_font)
    bar_w, pad = 480, 16
    value_w = _text_size(probe, str(max(values)), font)[0] + 12
    top = pad + title_h + 16 + row_h   # title, then the column headers row
    width = max(pad + label_w + bar_w + value_w + pad, title_w + 2 * pad)
    height = top + row_h * len(labels) + pad
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text(((width - title_w) // 2, pad), title, fill="black", font=title_font)
    header_y = pad + title_h + 16
    d.text((pad, header_y), label_title, fill=(90, 90, 90), font=font)
    d.text((pad + label_w, header_y), value_title, fill=(90, 90, 90), font=font)
    vmax = max(max(values), 1)
    x_axis = pad + label_w
    for i, (lab, v) in enumerate(zip(labels, values)):
        y = top + i * row_h
        tw, th = _text_size(d, lab, font)
        d.text((x_axis - 8 - tw, y + (row_h - th) // 2 - 2), lab, fill="black", font=font)
        w = int(round(bar_w * v / vmax))
        if w > 0:
            d.rectangle([x_axis, y + 3, x_axis + w, y + row_h - 4], fill=(66, 114, 196))
        d.text((x_axis + w + 6, y + (row_h - th) // 2 - 2), str(v), fill="black", font=font)
    d.line([x_axis, top, x_axis, top + row_h * len(labels)], fill="black", width=1)
    write_atomically(path, lambda tmp: img.save(tmp, format="PNG"))


# ----------------------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--metadata", required=True, help="metadata.jsonl")
    p.add_argument("--vqa", required=True, help="vqa_answers.jsonl")
    p.add_argument("--cloth-tags", required=True, help="clothing-tag vocabulary, one per line")
    p.add_argument("--masks", required=True, help="folder of <id>.png segmentation masks")
    p.add_argument("--boxes", required=True, help="face_boxes.jsonl")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--root", default=None,
                   help="folder metadata image paths are relative to "
                        "(default: parent of the metadata file's folder)")
    p.add_argument("--truth", default=None, help="identities.jsonl ground truth (optional)")
    p.add_argument("--drop-tags", default=None,
                   help="comma-separated unwanted tags (default: %s)" % ",".join(DEFAULT_DROP_TAGS))
    p.add_argument("--question", default=None,
                   help="use only VQA lines asking this question (default: every line)")
    p.add_argument("--max-similar", type=int, default=None, metavar="N",
                   help="keep at most N references per sample, symmetric, the first in id order "
                        "(default: no cap; the paper's histogram stops at 15)")
    args = p.parse_args(argv)
    if args.max_similar is not None and args.max_similar < 1:
        p.error(f"--max-similar must be >= 1, got {args.max_similar}")
    drop = (DEFAULT_DROP_TAGS if args.drop_tags is None
            else tuple(t.strip() for t in args.drop_tags.split(",") if t.strip()))

    def log(msg):
        print(f"[build] {msg}", file=sys.stderr, flush=True)

    try:
        stats = build(args.metadata, args.vqa, args.cloth_tags, args.masks, args.boxes, args.out,
                      root=args.root, truth=args.truth, drop_tags=drop, question=args.question,
                      log=log, max_similar=args.max_similar)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:   # a full disk or a read-only --out: no partial file is left
        print(f"error: {e}", file=sys.stderr)
        return 1
    for reason, n in stats["dropped"].items():
        if n:
            log(f"dropped {n:6d}  {reason}")
    for rule, n in stats["links"]["removed"].items():
        if n:
            log(f"removed {n:6d}  links: {rule}")
    if not stats["kept_samples"]:
        root = args.root or os.path.dirname(os.path.dirname(os.path.abspath(args.metadata)))
        if not stats["input_images"]:
            print(f"error: {args.metadata} lists no images (root {root}); nothing written to {args.out}",
                  file=sys.stderr)
        else:
            reasons = ", ".join(f"{n} {r}" for r, n in stats["dropped"].items() if n)
            print(f"error: no sample kept from the {stats['input_images']} images of root {root} (dropped: "
                  f"{reasons}); nothing written to {args.out}", file=sys.stderr)
        return 1
    if "truth" in stats:
        t = stats["truth"]
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
        msg = (f"pair precision {fmt(t['precision'])}  recall {fmt(t['recall'])}  "
               f"({t['true_positive_pairs']} tp / {t['predicted_pairs']} predicted / "
               f"{t['true_pairs']} true pairs)")
        print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
