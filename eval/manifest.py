"""The two JSON-lines inputs of the evaluation: the generation manifest and the VQA answers.

Manifest, one generated image per line (paths relative to the manifest's folder, or absolute):

    {"image": "R9k/images/c01/p0-s0-0.png", "refs": ["refs/c01/a.png"], "prompt": "1girl, beach",
     "seed": 0, "sample": 0, "model": "R9k", "character": "c01"}

VQA answers, one (image, question) per line (paths relative to the answers file's folder):

    {"image": "R9k/images/c01/p0-s0-0.png", "question": "...", "answer": "..."}

Other fields are allowed and ignored. Errors name the file and line and say what was expected.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.jsonl import read_objects


class ManifestError(ValueError):
    """A manifest or answers file that cannot be read as specified."""


@dataclass
class Generation:
    image: Path                 # absolute
    refs: list[Path]            # absolute, at least one
    prompt: str
    seed: int
    sample: int
    model: str
    character: str
    extra: dict = field(default_factory=dict)   # the line's other fields, kept as they are
    where: str = ""             # "file:line"


def resolve(base: Path, p: str) -> Path:
    """`p` relative to folder `base` (or absolute), normalised without following links."""
    return Path(os.path.abspath(Path(base) / p))


def _check(obj: dict, spec: dict, where: str) -> None:
    missing = [k for k in spec if k not in obj]
    if missing:
        raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}; a line needs "
                            + ", ".join(f"{k} ({d})" for k, (_, d) in spec.items()))
    for key, (ok, description) in spec.items():
        if not ok(obj[key]):
            raise ManifestError(f"{where}: field {key!r} must be {description}, got {json.dumps(obj[key])[:80]}")


def _is_str(v):
    return isinstance(v, str) and v != ""


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


MANIFEST_FIELDS = {
    "image": (_is_str, "a non-empty path string"),
    "refs": (lambda v: isinstance(v, list) and len(v) > 0 and all(_is_str(p) for p in v),
             "a non-empty list of path strings"),
    "prompt": (lambda v: isinstance(v, str), "a string"),
    "seed": (_is_int, "an integer >= 0"),
    "sample": (_is_int, "an integer >= 0"),
    "model": (_is_str, "a non-empty string"),
    "character": (_is_str, "a non-empty string"),
}
VQA_FIELDS = {
    "image": (_is_str, "a non-empty path string"),
    "question": (_is_str, "a non-empty string"),
    "answer": (lambda v: isinstance(v, str), "a string"),
}


def read_manifest(path: str | Path) -> list[Generation]:
    """All generations of a manifest, paths made absolute. Raises ManifestError on the first bad line
    (and on an image listed twice)."""
    path = Path(path)
    out, seen = [], {}
    for n, obj in read_objects(path, ManifestError):
        where = f"{path}:{n}"
        _check(obj, MANIFEST_FIELDS, where)
        image = resolve(path.parent, obj["image"])
        if image in seen:
            raise ManifestError(f"{where}: image {obj['image']} is already listed at {seen[image]}")
        seen[image] = where
        extra = {k: v for k, v in obj.items() if k not in MANIFEST_FIELDS}
        out.append(Generation(image, [resolve(path.parent, p) for p in obj["refs"]], obj["prompt"], obj["seed"],
                              obj["sample"], obj["model"], obj["character"], extra, where))
    return out


def read_manifests(paths) -> list[Generation]:
    """Several manifests as one (an image listed in two of them is an error)."""
    out, seen = [], {}
    for path in paths:
        for g in read_manifest(path):
            if g.image in seen:
                raise ManifestError(f"{g.where}: image {g.image} is already listed at {seen[g.image]}")
            seen[g.image] = g.where
            out.append(g)
    return out


def read_vqa(path: str | Path, answers: dict | None = None) -> dict[Path, dict[str, str]]:
    """{absolute image path: {question: answer}}, added to `answers` when given. The same question
    asked twice of one image must have the same answer."""
    path = Path(path)
    answers = {} if answers is None else answers
    for n, obj in read_objects(path, ManifestError):
        where = f"{path}:{n}"
        _check(obj, VQA_FIELDS, where)
        per_image = answers.setdefault(resolve(path.parent, obj["image"]), {})
        old = per_image.get(obj["question"])
        if old is not None and old != obj["answer"]:
            raise ManifestError(f"{where}: a second, different answer to {obj['question']!r} for {obj['image']}")
        per_image[obj["question"]] = obj["answer"]
    return answers


def manifest_line(g: Generation, folder: Path) -> str:
    """The JSON line of `g`, with paths relative to `folder` (where the manifest is written)."""
    rel = lambda p: os.path.relpath(p, folder)  # noqa: E731
    obj = {"image": rel(g.image), "refs": [rel(p) for p in g.refs], "prompt": g.prompt, "seed": g.seed,
           "sample": g.sample, "model": g.model, "character": g.character, **g.extra}
    return json.dumps(obj, ensure_ascii=False)


def write_manifest(path: str | Path, generations: list[Generation]) -> None:
    """Write a manifest atomically (common.images.write_atomically: a reader never sees half a file,
    a failed write leaves the previous manifest as it was and raises WriteError, an OSError naming
    `path`)."""
    from common.images import write_atomically
    path = Path(path)
    text = "".join(manifest_line(g, path.parent) + "\n" for g in generations)
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
