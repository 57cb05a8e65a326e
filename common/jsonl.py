"""JSON-lines files read with errors that name the file and line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


def read_objects(path, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) for each non-blank line of `path`; an unreadable file, malformed
    JSON or a line that is not an object raises `error` naming `path:line`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read it ({e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{n}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise error(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj
