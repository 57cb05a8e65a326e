"""Choice lists and checks that several command lines offer, each defined once (sample.py,
eval.protocol, python -m eval, train.py): precisions, concepts, devices, torch.compile backends,
finite numbers, a writable --out, and old option names kept as aliases."""
from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
from pathlib import Path

# --precision: name -> torch dtype name (strings, so that `--help` needs no torch import).
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# The concept text each reference carries (paper Sec. 5.2): a whole figure, a face crop, or the clothes.
CONCEPTS = ("figure", "face", "clothes")


# --device: "auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:N".
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when CUDA is available, else "cpu"; anything else unchanged."""
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_problems(device: str, precision: str) -> list[str]:
    """Problems with a resolved --device (cpu, cuda, cuda:N; anything else is refused by name) and
    --precision."""
    if not DEVICE_PATTERN.fullmatch(device):
        return [f"--device {device!r} is unknown; expected cpu, cuda, cuda:N or auto"]
    problems = cuda_problems(device)
    if precision == "fp16" and device == "cpu":
        problems.append("--precision fp16 is not supported on the CPU; use fp32 or bf16")
    return problems


def cuda_problems(device: str) -> list[str]:
    """Whether a resolved cuda / cuda:N device exists on this machine (nothing to say for the CPU)."""
    if not device.startswith("cuda"):
        return []
    import torch
    if not torch.cuda.is_available():
        return [f"--device {device}: CUDA is not available here"]
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        return [f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"]
    return []


# --compile [BACKEND]: torch.compile's default backend when the flag comes without a value.
COMPILE_DEFAULT = "inductor"
COMPILE_HELP = ("torch.compile the denoiser, whole-graph (fullgraph=True); BACKEND defaults to inductor (a GPU, or a "
                "C++ compiler on the CPU); aot_eager checks the graph capture without generating code")


def compile_problems(backend: str | None) -> list[str]:
    """--compile BACKEND must be a backend torch.compile knows (nothing to say when not given)."""
    if backend is None:
        return []
    import torch._dynamo
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        return [f"--compile {backend}: not a torch.compile backend; expected one of {', '.join(sorted(known))}"]
    return []


def default_precision(device: str) -> str:
    """fp16 on CUDA, fp32 elsewhere."""
    return "fp16" if device.startswith("cuda") else "fp32"


def torch_dtype(precision: str):
    """The torch dtype of a --precision name."""
    import torch
    return getattr(torch, PRECISIONS[precision])


def finite_problems(options: dict[str, float | None]) -> list[str]:
    """One problem per float option ({"--guidance": value}; None = not given) that is NaN or
    infinite: argparse's float() takes "nan" and "inf", which would silently turn guidance off or
    give black images."""
    return [f"{name} {value}: expected a finite number" for name, value in options.items()
            if value is not None and not math.isfinite(value)]


def out_problems(out: str | Path, option: str = "--out") -> list[str]:
    """Problems with an output folder, found before any work: it is created if missing and a file
    is created and removed in it (a read-only or missing parent, a file in the way)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        return [f"{option} {out}: cannot write there ({e.strerror or e})"]
    return []


class Renamed(argparse.Action):
    """An option's old name, kept working: it stores into the new option's destination and says on
    stderr, once per use, which name to use instead (`ap.add_argument("--mode", dest="method",
    action=Renamed, new="--method", help=argparse.SUPPRESS)`)."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: note: {option_string} is renamed {self.new}; the old name will go", file=sys.stderr)
        setattr(namespace, self.dest, values)
