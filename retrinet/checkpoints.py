"""What a conditioning checkpoint holds, told without building a model, and loading it.

Our files (written by `ReferenceUNet.save`) carry their method, config, lock and base U-Net config
in the safetensors metadata; an official ControlNet file (`control_model.*` keys, or the same keys
without prefix) carries none, and is recognised by its `input_hint_block`; an official IP-Adapter
file (`ip-adapter_sd15.safetensors`) by its top-level `image_proj.` and `ip_adapter.<number>.` keys.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from common.weights import CheckpointError, read_header
from unet import UNet, UNetConfig
from .base import METADATA_KEY, MethodOptions, ReferenceUNet, SavedModel, base_config_mismatch, file_metadata
from .controlnet import ControlNetConfig, ControlNetUNet
from .ip_adapter import IPAdapterUNet, is_official_file, official_config
from .model import RetriUNet

METHODS: dict[str, type[ReferenceUNet]] = {"retrinet": RetriUNet, "controlnet": ControlNetUNet,
                                           "ip-adapter": IPAdapterUNet}


def build_model(method: str, unet: UNet, options: MethodOptions) -> ReferenceUNet:
    """The model of `method` (a key of METHODS) around `unet`, as `options` choose: the one place a
    method's name becomes its model (train.py, bench/ and the tests build through it)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return METHODS[method].build(unet, options)


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
    shapes: dict | None = None        # official files: {our key in the added module: shape} (IP-Adapter
                                      # layers: under official numbers until base_mismatch knows the base)

    def base_mismatch(self, cfg: UNetConfig) -> dict:
        """How the file's base differs from `cfg`: {config field: (file's, cfg's)} for our files,
        {key: (file's shape, expected shape)} for official ones (checked against a model built on the
        meta device, which allocates nothing); empty when the file fits."""
        if self.unet_config is not None:
            return base_config_mismatch(self.unet_config, cfg)
        with torch.device("meta"):
            model = METHODS[self.method](UNet(cfg), **dataclasses.asdict(self.config))
        own = {k: list(v.shape) for k, v in model.added.state_dict().items()}
        table = METHODS[self.method].official_key_map(cfg)  # official names -> ours, for this base
        theirs = {table.get(k, k): v for k, v in self.shapes.items()}
        return {k: (theirs.get(k), own.get(k)) for k in sorted(set(own) | set(theirs))
                if theirs.get(k) != own.get(k)}


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Method, layout, config, lock and base of a RetriNet / ControlNet / IP-Adapter file;
    CheckpointError (one line, naming the file) when it is none of them, or when a value its header
    or metadata holds is of the wrong type or out of bounds (`read_header`, `SavedModel.read`)."""
    path = Path(path)
    header = read_header(path)
    if METADATA_KEY in file_metadata(path) or any(k.startswith(("retrinet.", "unet.", "ip_adapter.image_proj.", "ip_adapter.layers."))
                   for k in header):
        saved = SavedModel.read(path)  # every value checked: the config builds
        config = METHODS[saved.method].config_class(**saved.config)
        return CheckpointInfo(path, saved.method, "ours", config, saved.lock, saved.train_base, saved.unet_config)
    if is_official_file(header):
        # The layer numbers map to our layers only for a given base (official_numbers): base_mismatch
        # renames them; image_proj's keys are ours already.
        shapes = {k: v["shape"] for k, v in header.items()}
        return CheckpointInfo(path, "ip-adapter", "official", official_config(header, path), lock="decoder",
                              shapes=shapes)
    prefix = "control_model." if any(k.startswith("control_model.") for k in header) else ""
    if not any(k.startswith(prefix + "input_hint_block.") for k in header):
        raise CheckpointError(f"{path}: neither a checkpoint written by train.py (no '{METADATA_KEY}' metadata) nor "
                              f"an official ControlNet file (no input_hint_block keys) or IP-Adapter file (no "
                              f"image_proj. and ip_adapter.<number>. keys)")
    shapes = {k[len(prefix):]: v["shape"] for k, v in header.items() if k.startswith(prefix)}
    return CheckpointInfo(path, "controlnet", "official", ControlNetConfig(), shapes=shapes)


def load_reference_model(path: str | Path, unet: UNet, image_encoder: torch.nn.Module | None = None) -> ReferenceUNet:
    """The conditioning model a file holds (RetriNet, ControlNet or IP-Adapter, ours or official)
    around `unet`. `image_encoder` goes to an IP-Adapter (which encodes its references with it); the
    other methods take no image encoder and ignore it."""
    cls = METHODS[inspect_checkpoint(path).method]
    return cls.load(path, unet, image_encoder=image_encoder) if cls.needs_image_encoder else cls.load(path, unet)
