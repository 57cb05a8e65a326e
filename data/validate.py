"""Check a RetriBooru root (data/README.md): `python -m data.validate ROOT`.

Reports every problem with its sample id (or line number for lines that are not valid JSON): lines
that are not JSON objects and missing or mistyped fields (data.annotations.read_annotations, which
reads the file), duplicate ids, missing / unreadable image or mask files, size mismatches, empty
face boxes or boxes outside the image, `similar` ids that do not exist or point to the sample
itself, asymmetric `similar` lists. Exit status 0 only for a clean dataset.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from .annotations import read_annotations


def _check_file(root: Path, rel: str, what: str, who: str, size: tuple[int, int], problems: list[str]) -> None:
    path = root / rel
    if not path.is_file():
        problems.append(f"{who}: {what} {rel} is missing")
        return
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            actual = im.size
    except Exception as e:  # PIL raises many types for broken files
        problems.append(f"{who}: {what} {rel} is unreadable ({type(e).__name__})")
        return
    if actual != size:
        problems.append(f"{who}: {what} {rel} is {actual[0]}x{actual[1]}, annotation says {size[0]}x{size[1]}")


def validate(root: str | Path, check_files: bool = True) -> list[str]:
    """Every problem found in the RetriBooru root, each naming its sample id or line."""
    root = Path(root)
    problems: list[str] = []
    records = read_annotations(root, problems)
    ids = {}
    for n, rec in records:
        if rec["id"] in ids:
            problems.append(f"sample {rec['id']} (line {n}): duplicate id (first on line {ids[rec['id']]})")
        else:
            ids[rec["id"]] = n
    similar = {rec["id"]: set(rec["similar"]) for _, rec in records}
    for n, rec in records:
        who = f"sample {rec['id']}"
        size = (rec["width"], rec["height"])
        if check_files:
            _check_file(root, rec["image"], "image", who, size, problems)
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
