"""The rows bench scripts append with --report FILE: one Markdown table for every measurement,
`| script | measurement | ours | reference | ratio / error |` (bench/gpu.sh writes its header)."""
from __future__ import annotations

from pathlib import Path

COLUMNS = ("script", "measurement", "ours", "reference", "ratio / error")


def cell(value) -> str:
    """A value as one table cell: on one line, with `|` escaped so it cannot split the row."""
    return " ".join(str(value).split()).replace("|", r"\|")


def append_row(path, script: str, measurement: str, ours="", reference="", ratio="") -> str:
    """Append one row to the Markdown file `path` and return it."""
    line = "| " + " | ".join(cell(v) for v in (script, measurement, ours, reference, ratio)) + " |\n"
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(line)
    return line


def reporter(path, script: str):
    """`row(measurement, ours, reference, ratio)` appending to `path` for `script`; a no-op without a path."""
    if not path:
        return lambda *args, **kwargs: None
    return lambda *args, **kwargs: append_row(path, script, *args, **kwargs)


def add_options(ap, cuda_only: bool = False) -> None:
    """The options bench/gpu.sh passes: --report FILE, and --cuda-only for scripts with a CPU part."""
    if cuda_only:
        ap.add_argument("--cuda-only", action="store_true", help="skip the CPU measurements (with --device cuda)")
    ap.add_argument("--report", metavar="FILE", default=None, help="append the results as Markdown table rows")


def parse(ap, argv=None):
    """ap.parse_args, refusing --cuda-only without --device cuda."""
    args = ap.parse_args(argv)
    if getattr(args, "cuda_only", False) and not args.device.startswith("cuda"):
        ap.error("--cuda-only needs --device cuda")
    return args
