"""Training checkpoints: out/checkpoints/step-NNNNNN/ holding the model file (`ReferenceUNet.save`)
and state.pt (step, optimizer, scaler, data position, RNG states, arguments), written atomically."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from retrinet import ReferenceUNet


def checkpoint_dirs(out: Path) -> list[Path]:
    """Finished checkpoints under out/checkpoints, oldest first."""
    root = out / "checkpoints"
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def write_checkpoint(out: Path, step: int, model: ReferenceUNet, state: dict, keep: int) -> Path:
    """out/checkpoints/step-NNNNNN/{retrinet.safetensors, state.pt}, written under a temporary name
    and renamed, so a crash never leaves a partial checkpoint; only the last `keep` are kept."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save(tmp / "retrinet.safetensors")
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():  # on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def read_state(path: Path) -> dict:
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
