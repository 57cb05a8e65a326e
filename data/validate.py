"""Check a RetriBooru root (data/README.md): `python -m data.validate ROOT`.

Reports every problem with its sample id (or line number for lines that are not valid JSON): lines
that are not JSON objects and missing or mistyped fields (data.annotations.read_annotations, which
reads the file), duplicate ids, missing / unreadable image or mask files, size mismatches, empty
face boxes or boxes outside the image, `similar` ids that do not exist or point to the sample
itself, asymmetric `similar` lists, and `similar` links between near-duplicate images (the same
picture re-saved, resized or slightly cropped: data.build's perceptual hash and threshold,
`image_hash` and `NEAR_DUPLICATE_DISTANCE`), one problem per pair naming both ids and the distance.
Images and masks are decoded and converted as the loader converts them (common.images.to_rgb /
to_grey): a 16-bit, palette or alpha image that converts is clean; a mode the loader refuses is a
problem naming the file and the mode. An annotations.jsonl without any sample is a problem.
Exit status 0 only for a clean dataset.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from common.images import UnsupportedImage, to_grey, to_rgb

from .annotations import read_annotations
from .build import NEAR_DUPLICATE_DISTANCE, hash_distance, image_hash, is_near_duplicate


def _check_file(root: Path, rel: str, what: str, who: str, size: tuple[int, int], problems: list[str]) -> bool:
    """Append the file's problems; True when it could be read (whatever its size).

    The file is decoded and converted as the loader converts it (common.images: `to_rgb` for an
    image, `to_grey` for a mask), so an image whose mode is refused (a float image outside [0, 1],
    an unknown mode) is a problem naming the file and the mode, and one that converts (16-bit
    greyscale, alpha, palette) is clean."""
    path = root / rel
    if not path.is_file():
        problems.append(f"{who}: {what} {rel} is missing")
        return False
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
            actual = im.size
            (to_grey if what == "mask" else to_rgb)(im, f"{what} {rel}")
    except UnsupportedImage as e:
        problems.append(f"{who}: {e}; the loader cannot use it")
        return False
    except Exception as e:  # PIL raises many types for broken files
        problems.append(f"{who}: {what} {rel} is unreadable ({type(e).__name__})")
        return False
    if actual != size:
        problems.append(f"{who}: {what} {rel} is {actual[0]}x{actual[1]}, annotation says {size[0]}x{size[1]}")
    return True


def _near_duplicate_links(root: Path, records, readable: set, problems: list[str]) -> None:
    """One problem per `similar` pair whose images are near-duplicates (either direction listing the
    other counts once; pairs in file order). Images that are missing or unreadable (already
    reported) are skipped; each image is hashed once."""
    first = {}
    for _, rec in records:
        first.setdefault(rec["id"], rec)
    hashes: dict[str, int | None] = {}

    def hash_of(rec):
        rel = rec["image"]
        if rel not in hashes:
            try:
                hashes[rel] = image_hash(root / rel) if rel in readable else None
            except Exception:  # verify() passed but decoding failed: not this check's problem
                hashes[rel] = None
        return hashes[rel]

    seen = set()
    for _, rec in records:
        for other in rec["similar"]:
            pair = frozenset((rec["id"], other))
            if other == rec["id"] or other not in first or pair in seen:
                continue
            seen.add(pair)
            a, b = hash_of(first[rec["id"]]), hash_of(first[other])
            if a is not None and b is not None and is_near_duplicate(a, b):
                problems.append(f"samples {rec['id']} and {other}: similar links near-duplicate images "
                                f"({first[rec['id']]['image']}, {first[other]['image']}: hash distance "
                                f"{hash_distance(a, b)} <= {NEAR_DUPLICATE_DISTANCE})")


def validate(root: str | Path, check_files: bool = True) -> list[str]:
    """Every problem found in the RetriBooru root, each naming its sample id or line.

    ``check_files=False`` skips everything that opens files: the image and mask checks and the
    near-duplicate check."""
    root = Path(root)
    problems: list[str] = []
    records = read_annotations(root, problems)
    if not records and not problems:
        problems.append(f"{root}: annotations.jsonl holds no samples (an empty dataset is not a dataset)")
    ids = {}
    for n, rec in records:
        if rec["id"] in ids:
            problems.append(f"sample {rec['id']} (line {n}): duplicate id (first on line {ids[rec['id']]})")
        else:
            ids[rec["id"]] = n
    similar = {rec["id"]: set(rec["similar"]) for _, rec in records}
    readable = set()
    for n, rec in records:
        who = f"sample {rec['id']}"
        size = (rec["width"], rec["height"])
        if check_files:
            if _check_file(root, rec["image"], "image", who, size, problems):
                readable.add(rec["image"])
            _check_file(root, rec["mask"], "mask", who, size, problems)
        box = rec["face_bbox"]
        if len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            problems.append(f"{who}: face_bbox {box} is not [x0, y0, x1, y1]")
        else:
            x0, y0, x1, y1 = box
            if x1 <= x0 or y1 <= y0:
                problems.append(f"{who}: face_bbox {box} is empty")
            elif x0 < 0 or y0 < 0 or x1 > rec["width"] or y1 > rec["height"]:
                problems.append(f"{who}: face_bbox {box} lies outside the {rec['width']}x{rec['height']} image")
        if not rec["similar"]:
            problems.append(f"{who}: no similar ids (every sample needs at least one reference)")
        for other in rec["similar"]:
            if other == rec["id"]:
                problems.append(f"{who}: similar lists the sample itself")
            elif other not in similar:
                problems.append(f"{who}: similar id {other} does not exist")
            elif rec["id"] not in similar[other]:
                problems.append(f"{who}: similar id {other} does not list {rec['id']} back")
    if check_files:
        _near_duplicate_links(root, records, readable, problems)
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="folder holding annotations.jsonl")
    args = ap.parse_args(argv)
    problems = validate(args.root)
    n = len(read_annotations(args.root, []))
    for p in problems:
        print(p)
    print(f"{args.root}: {n} samples, " + (f"{len(problems)} problems" if problems else "clean"), file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
