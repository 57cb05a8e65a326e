"""Writing a synthetic RetriBooru dataset (`generate`, `python -m data.synthetic`): the clean images of
every identity, noise images, their annotations and the construction pipeline's raw inputs."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..build import image_hash, is_near_duplicate
from .geometry import CLOTH_COLORS, FIGURE_SCALE
from .identities import (_S_IMAGE, _S_LAYOUT, _S_VQA, Outfit, cloth_vocabulary, draw_scene, identity_tags,
                         make_identities, scene_prompt)
from .render import BACKGROUNDS, SUPERSAMPLE, render

VQA_QUESTION = "What are the top two colors of the character's clothes?"
MONO_TAGS = ("monochrome", "greyscale", "sketch")
NOISE_KINDS = ("mono", "multi", "nocloth")
MAX_REDRAWS = 100  # draws of a clean image after the first, while it near-duplicates one of its identity's
MAX_SIZE = 1024    # image side; drawn at SUPERSAMPLE x that, a larger one would not fit in memory
# What generate writes under its folder, and nothing else: these files, and <id>.png (digits) in IMAGE_DIRS.
DATASET_FILES = ("annotations.jsonl", "raw/metadata.jsonl", "raw/vqa_answers.jsonl", "raw/face_boxes.jsonl",
                 "raw/identities.jsonl", "raw/cloth_tags.txt")
IMAGE_DIRS = ("images", "masks")
_IMAGE_NAME = re.compile(r"\d+\.png")


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
    if size > MAX_SIZE:
        raise ValueError(f"size must be <= {MAX_SIZE} (images are drawn at {SUPERSAMPLE}x their size), got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= vqa_error_rate <= 1.0:
        raise ValueError(f"vqa-error-rate must be in [0, 1], got {vqa_error_rate}")
    if not 0.0 <= noise_fraction <= 1.0:
        raise ValueError(f"noise-fraction must be in [0, 1], got {noise_fraction}")


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, allow_nan=False) + "\n")


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
    is ``scene_prompt``: the scene alone, without the identity's tags. Files already in ``out`` are
    overwritten or left as they are (experiments/recipe.py regenerates an interrupted dataset in
    place); the command refuses a non-empty ``--out`` unless ``--replace`` (``remove_dataset``).
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


def remove_dataset(out: Path) -> list[str]:
    """Remove what ``generate`` writes under ``out`` and nothing else: ``DATASET_FILES`` and the
    ``<digits>.png`` files of ``IMAGE_DIRS``, then those folders and ``raw/`` where that leaves them
    empty. A folder that is a symbolic link is not entered. Returns the names of the entries left in
    ``out``, sorted: what holds files that are not the generator's."""
    out = Path(out)
    for rel in DATASET_FILES:
        path = out / rel
        if path.is_symlink() or path.is_file():
            path.unlink()
    for name in IMAGE_DIRS:
        folder = out / name
        if folder.is_symlink() or not folder.is_dir():
            continue
        for path in folder.iterdir():
            if _IMAGE_NAME.fullmatch(path.name) and (path.is_symlink() or path.is_file()):
                path.unlink()
    for name in (*IMAGE_DIRS, "raw"):
        folder = out / name
        if not folder.is_symlink() and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return sorted(p.name for p in out.iterdir())


def _out_problem(out: Path, replace: bool) -> str | None:
    """Why the command must not write to ``out``: a file (or under one), or a folder that holds
    anything while ``replace`` is off."""
    path = Path(os.path.abspath(out))
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    if not path.is_dir():
        where = "is not a folder" if path == Path(os.path.abspath(out)) else f"lies under {path}, not a folder"
        return f"--out {out} {where}; expected a new or empty folder"
    if path == Path(os.path.abspath(out)) and not replace:
        entries = sorted(p.name for p in path.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            return (f"--out {out} is not empty ({len(entries)} entries: {shown}); expected a new or empty folder, "
                    f"or pass --replace to replace the synthetic dataset in it (its annotations.jsonl, images/, "
                    f"masks/ and raw/; other files are kept)")
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.synthetic",
                                description="Procedural synthetic RetriBooru dataset (docs/design.md section 4).")
    p.add_argument("--out", type=Path, required=True, help="output dataset root: a new or empty folder")
    p.add_argument("--replace", action="store_true",
                   help="--out may hold a synthetic dataset: remove its annotations.jsonl, images/, masks/ and raw/ "
                        "first (other files are kept)")
    p.add_argument("--identities", type=int, required=True)
    p.add_argument("--images-per-identity", type=int, required=True)
    p.add_argument("--size", type=int, default=128, help=f"image side in pixels, 32 to {MAX_SIZE} (default 128)")
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
    problem = _out_problem(args.out, args.replace)
    if problem:
        print(f"{p.prog}: error: {problem}", file=sys.stderr)
        return 2
    if args.replace and args.out.is_dir():
        kept = remove_dataset(args.out)
        if kept:
            print(f"synthetic: --replace removed the earlier dataset's files from {args.out}; kept everything else "
                  f"({len(kept)} entries: {', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''})", file=sys.stderr)
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
