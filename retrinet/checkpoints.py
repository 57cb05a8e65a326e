"""What a conditioning checkpoint holds, told without building a model, and loading it.

Our files (written by `ReferenceUNet.save`) carry their method, config, lock and base U-Net config
in the safetensors metadata; an official ControlNet file (`control_model.*` keys, or the same keys
without prefix) carries none, and is recognised by its `input_hint_block`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from common.weights import CheckpointError, read_header
from unet import UNet, UNetConfig
from .base import METADATA_KEY, ReferenceUNet, SavedModel, base_config_mismatch
from .controlnet import ControlNetConfig, ControlNetUNet
from .model import RetriUNet

METHODS: dict[str, type[ReferenceUNet]] = {"retrinet": RetriUNet, "controlnet": ControlNetUNet}


@dataclass
class CheckpointInfo:
    """A conditioning checkpoint as read from its header and metadata."""
    path: Path
    method: str                       # a key of METHODS
    layout: str                       # "ours" (written by ReferenceUNet.save) | "official"
    config: object                    # the method's config dataclass
    lock: str = "none"
    train_base: bool = False
    unet_config: dict | None = None   # the base U-Net's config (ours); None in official files
    shapes: dict | None = None        # official files: {key without prefix: shape}

    def base_mismatch(self, cfg: UNetConfig) -> dict:
        """How the file's base differs from `cfg`: {config field: (file's, cfg's)} for our files,
        {key: (file's shape, expected shape)} for official ones (checked against a model built on the
        meta device, which allocates nothing); empty when the file fits."""
        if self.unet_config is not None:
            return base_config_mismatch(self.unet_config, cfg)
        with torch.device("meta"):
            model = METHODS[self.method](UNet(cfg), **dataclasses.asdict(self.config))
        own = {k: list(v.shape) for k, v in model.added.state_dict().items()}
        return {k: (self.shapes.get(k), own.get(k)) for k in sorted(set(own) | set(self.shapes))
                if self.shapes.get(k) != own.get(k)}


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Method, layout, config, lock and base of a RetriNet / ControlNet file; CheckpointError (one
    line, naming the file) when it is neither."""
    path = Path(path)
    header = read_header(path)
    with safe_open(str(path), framework="pt") as f:
        ours = METADATA_KEY in (f.metadata() or {})
    if ours or any(k.startswith(("retrinet.", "unet.")) for k in header):
        saved = SavedModel.read(path)
        if saved.method not in METHODS:
            raise CheckpointError(f"{path}: unknown method {saved.method!r}; expected one of {', '.join(METHODS)}")
        try:
            config = METHODS[saved.method].config_class(**saved.config)
        except TypeError as e:
            raise CheckpointError(f"{path}: bad {saved.method} config in its metadata ({e})") from None
        return CheckpointInfo(path, saved.method, "ours", config, saved.lock, saved.train_base, saved.unet_config)
    prefix = "control_model." if any(k.startswith("control_model.") for k in header) else ""
    if not any(k.startswith(prefix + "input_hint_block.") for k in header):
        raise CheckpointError(f"{path}: neither a checkpoint written by train.py (no '{METADATA_KEY}' metadata) nor "
                              f"an official ControlNet file (no input_hint_block keys)")
    shapes = {k[len(prefix):]: v["shape"] for k, v in header.items() if k.startswith(prefix)}
    return CheckpointInfo(path, "controlnet", "official", ControlNetConfig(), shapes=shapes)


def load_reference_model(path: str | Path, unet: UNet) -> ReferenceUNet:
    """The conditioning model a file holds (RetriNet or ControlNet, ours or official) around `unet`."""
    return METHODS[inspect_checkpoint(path).method].load(path, unet)
