"""Choice lists that several command lines offer, each defined once."""
from __future__ import annotations

# --precision: name -> torch dtype name (strings, so that `--help` needs no torch import).
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# The concept text each reference carries (paper Sec. 5.2): a whole figure, a face crop, or the clothes.
CONCEPTS = ("figure", "face", "clothes")


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when CUDA is available, else "cpu"; anything else unchanged."""
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_problems(device: str, precision: str) -> list[str]:
    """Problems with a resolved --device and --precision for sampling."""
    import torch
    problems = []
    if device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {device}: CUDA is not available here")
    if precision == "fp16" and device == "cpu":
        problems.append("--precision fp16 is not supported on the CPU; use fp32 or bf16")
    return problems


def default_precision(device: str) -> str:
    """fp16 on CUDA, fp32 elsewhere."""
    return "fp16" if device.startswith("cuda") else "fp32"


def torch_dtype(precision: str):
    """The torch dtype of a --precision name."""
    import torch
    return getattr(torch, PRECISIONS[precision])
