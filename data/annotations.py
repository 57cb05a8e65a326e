"""The one reader of a RetriBooru root's annotations.jsonl (data/README.md; docs/design.md section 4).

`read_annotations(root)` yields (line number, record) for each well-formed record: the line is valid
JSON, a JSON object, and carries every `REQUIRED` field with its type (a bool is not an int). Blank
lines are skipped. Two modes:

* `problems=None` (the loader, the scorer): the first bad line raises `AnnotationError`, one line
  naming the file and line, e.g. ``ROOT/annotations.jsonl:12: sample x1: missing or mistyped fields:
  image (expected str); check the root with python -m data.validate ROOT``;
* `problems=[]` (the validator): each problem is appended in the validator's words
  (``line 11: not valid JSON (...)``, ``line 11: expected a JSON object``, ``sample x1 (line 12):
  missing or mistyped fields: image (expected str)``) and the line is skipped.

Content checks that need the whole file (duplicate ids, `similar` links, files on disk, face boxes)
are data.validate's. common.jsonl.read_objects is not used: it stops at the first bad line, and the
validator reports them all.
"""
from __future__ import annotations

import json
from pathlib import Path

REQUIRED = {"id": str, "image": str, "mask": str, "width": int, "height": int, "character": str, "artist": str,
            "tags": list, "cloth_tags": list, "prompt": str, "face_bbox": list, "similar": list}


class AnnotationError(ValueError):
    """A RetriBooru root whose annotations.jsonl is missing, unreadable or malformed; the message
    names the file and line."""


def _parse(line: str) -> tuple[dict | None, str | None, str]:
    """(record, None, "") for a well-formed line, else (None, the sample's id when the line is an
    object, what is wrong)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return None, None, f"not valid JSON ({e.msg})"
    if not isinstance(rec, dict):
        return None, None, "expected a JSON object"
    bad = [f"{k} (expected {t.__name__})" for k, t in REQUIRED.items()
           if not isinstance(rec.get(k), t) or isinstance(rec.get(k), bool)]
    if bad:
        return None, str(rec.get("id", "?")), f"missing or mistyped fields: {', '.join(bad)}"
    return rec, None, ""


def read_annotations(root, problems: list[str] | None = None) -> list[tuple[int, dict]]:
    """(line number, record) for each well-formed record of ROOT/annotations.jsonl, in file order.

    problems None: the first problem raises AnnotationError; a list: problems are appended to it
    and bad lines skipped (a missing or unreadable file gives no records and one problem)."""
    path = Path(root) / "annotations.jsonl"
    hint = f"check the root with python -m data.validate {root}"
    if not path.is_file():
        message = f"{path}: no such file (a RetriBooru root holds annotations.jsonl)"
        if problems is None:
            raise AnnotationError(message)
        problems.append(message)
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        message = f"{path}: cannot read it ({e})"
        if problems is None:
            raise AnnotationError(message) from None
        problems.append(message)
        return []
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rec, sample, what = _parse(line)
        if rec is not None:
            records.append((n, rec))
        elif problems is None:
            who = "" if sample is None else f"sample {sample}: "
            raise AnnotationError(f"{path}:{n}: {who}{what}; {hint}")
        else:
            problems.append(f"line {n}: {what}" if sample is None else f"sample {sample} (line {n}): {what}")
    return records


def load_records(root) -> list[dict]:
    """The records of ROOT/annotations.jsonl in file order; any problem raises AnnotationError."""
    return [rec for _, rec in read_annotations(root)]
