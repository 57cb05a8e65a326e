"""What every conditioning method shares (docs/design.md sections 3, 3b): SD's U-Net plus the module
the method adds, what trains under each lock, and checkpoint files.

A method enters the U-Net through its seam, `UNet.encode` / `UNet.decode(..., skip_residuals,
middle_residual)`: RetriNet adds cross-attention residuals computed from the references, the
ControlNet adds the outputs of its own copy of the encoder half. Each method is a subclass of
`ReferenceUNet` with its own forward pass and a small config dataclass; this module holds the rest:

* locks (paper Sec. 5.2): "none" trains the added module and SD's decoder; "decoder" (LockD)
  freezes the decoder; "both" (LockB) also freezes the added module's encoder part. SD's encoder
  half is always frozen, unless `train_base` trains the whole U-Net (a base trained from scratch);
* `save` / `load`: the added weights under the method's key prefix (plus SD's decoder when it
  trained, the whole U-Net with `train_base`), with the method, its config, the lock and the base
  U-Net's config in the safetensors metadata (entry "retrinet", for every method);
* `SavedModel`: that metadata, read back.

`retrinet.checkpoints` tells what any file holds without building a model, and loads it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from common.weights import CheckpointError, load_strict, read_header, read_tensors
from unet import UNet, UNetConfig

LOCKS = ("none", "decoder", "both")  # paper: default, LockD, LockB
METADATA_KEY = "retrinet"            # the safetensors metadata entry of every checkpoint written here


class ReferenceUNet(nn.Module):
    """SD's U-Net (`self.unet`) with a conditioning method's module (`self.added`). Subclasses set
    `method`, `prefix` (the key prefix of the added weights in files), `config_class`, build the
    added module, and implement `forward`, `lockb_frozen` and `denoiser` (sampling with references)."""

    method: str = ""   # the name files and command lines use
    title: str = ""    # the name messages use
    prefix: str = ""
    config_class: type = object

    def __init__(self, unet: UNet, config):
        super().__init__()
        self.unet, self.config = unet, config
        self.lock, self.train_base = "none", False  # set by the subclass's set_lock

    @property
    def added(self) -> nn.Module:
        """Everything the method adds to SD."""
        raise NotImplementedError

    def lockb_frozen(self) -> list[nn.Module]:
        """The parts of the added module that LockB freezes."""
        raise NotImplementedError

    def _like_unet(self, module: nn.Module) -> nn.Module:
        """`module` on the U-Net's device in its dtype; moved only when it is not there already (so
        no tensor is replaced needlessly: fake tensors, as bench/memory.py builds models, cannot be)."""
        p = next(self.unet.parameters())
        if any(t.device != p.device or t.dtype != p.dtype for t in module.parameters()):
            module.to(p.device, p.dtype)
        return module

    def _init_encoder_from_unet(self, encoder: nn.Module) -> None:
        """The added encoder starts as a copy of SD's encoder half (ControlNet's `tool_add_control`)."""
        own = encoder.state_dict()
        encoder.load_state_dict({k: v for k, v in self.unet.state_dict().items() if k in own}, strict=False)

    # -- what trains ------------------------------------------------------------------------------
    def set_lock(self, lock: str, train_base: bool = False) -> None:
        """Choose what trains (paper Sec. 5.2): "none" = the added module and SD's decoder; "decoder"
        (LockD) freezes the decoder; "both" (LockB) also freezes the added module's encoder part. SD's
        encoder half is frozen, unless `train_base`: then the whole U-Net trains as well (a base
        trained from scratch, as in the tiny preset; `lock` must be "none")."""
        if lock not in LOCKS:
            raise ValueError(f"lock must be one of {LOCKS}, got {lock!r}")
        if train_base and lock != "none":
            raise ValueError(f"train_base trains the whole U-Net; it contradicts lock {lock!r}")
        self.lock, self.train_base = lock, train_base
        self.unet.requires_grad_(train_base)
        self.added.requires_grad_(True)
        if lock == "none":
            for part in self.decoder_parts():
                part.requires_grad_(True)
        if lock == "both":
            for part in self.lockb_frozen():
                part.requires_grad_(False)

    def decoder_parts(self) -> list[nn.Module]:
        """SD's decoder half: output_blocks and out."""
        return [self.unet.output_blocks, self.unet.out]

    def frozen_parts(self) -> list[nn.Module]:
        """Every module that does not train under the current lock (cast to half precision under amp)."""
        if self.train_base:
            return []
        sd_encoder = [self.unet.time_embed, self.unet.input_blocks, self.unet.middle_block]
        return sd_encoder + (self.decoder_parts() if self.lock != "none" else []) + (
            self.lockb_frozen() if self.lock == "both" else [])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- checkpoints ------------------------------------------------------------------------------
    def _trained_unet_keys(self) -> list[str]:
        """The U-Net keys a checkpoint carries: all with train_base, the decoder's with lock "none"."""
        if self.lock != "none":
            return []
        return [k for k in self.unet.state_dict() if self.train_base or k.startswith(("output_blocks.", "out."))]

    def save(self, path: str | Path) -> None:
        """The added weights (under `prefix`) and the trained U-Net weights (under "unet.") as
        safetensors, with method, config, lock and base U-Net config in the metadata."""
        state = {f"{self.prefix}{k}": v for k, v in self.added.state_dict().items()}
        unet_state = self.unet.state_dict()
        state.update({f"unet.{k}": unet_state[k] for k in self._trained_unet_keys()})
        info = {"method": self.method, "config": dataclasses.asdict(self.config), "lock": self.lock,
                "train_base": self.train_base, "unet_config": self.unet.config.__dict__}
        meta = {"format": "pt", METADATA_KEY: json.dumps(info, default=list)}
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, unet: UNet) -> "ReferenceUNet":
        """This method's model around `unet` from a file written by `save`; the file's base config
        must be `unet`'s."""
        saved = SavedModel.read(path)
        if saved.method != cls.method:
            raise CheckpointError(f"{path}: holds a {saved.method} checkpoint, not a {cls.method} one")
        diff = base_config_mismatch(saved.unet_config, unet.config)
        if diff:
            raise CheckpointError(f"{path}: {cls.title} made for another base U-Net; differing config fields "
                                  f"(file, model): {diff}")
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = set(saved.config) - fields
        if unknown:
            raise CheckpointError(f"{path}: unknown {cls.method} config fields {sorted(unknown)}")
        model = cls(unet, **saved.config, lock=saved.lock, train_base=saved.train_base)
        model.load_weights(path)
        return model

    def load_weights(self, path: str | Path) -> None:
        """Load a file written by `save` (for this very model: same method, config and lock) in place."""
        p = next(self.unet.parameters())
        state = read_tensors(path, device=p.device, dtype=p.dtype)
        added = {k[len(self.prefix):]: v for k, v in state.items() if k.startswith(self.prefix)}
        load_strict(self.added, added, source=str(path), layout=f"retrinet ({self.method})")
        trained = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
        if trained:
            own = self.unet.state_dict()
            expected = self._trained_unet_keys()
            if trained.keys() != set(expected) or any(trained[k].shape != own[k].shape for k in expected):
                raise CheckpointError(f"{path}: the trained U-Net weights do not fit the U-Net")
            self.unet.load_state_dict(trained, strict=False)


# -- the metadata of our files ----------------------------------------------------------------------

@dataclass
class SavedModel:
    """The metadata `ReferenceUNet.save` writes: method, its config fields, lock, base U-Net config."""
    method: str
    config: dict
    lock: str
    train_base: bool
    unet_config: dict

    @classmethod
    def read(cls, path: str | Path) -> "SavedModel":
        """From a file's metadata (clear errors otherwise). Older files name the method "mode" and
        keep RetriNet's config fields (heads, null_reference) at the top level."""
        meta = file_metadata(path)
        if METADATA_KEY not in meta:
            raise CheckpointError(f"{path}: not a RetriNet checkpoint (no '{METADATA_KEY}' metadata)")
        raw = json.loads(meta[METADATA_KEY])
        method = raw.get("method") or raw.get("mode", "retrinet")
        config = raw.get("config")
        if config is None:  # older files
            config = {"heads": raw.get("heads") or 8, "null_reference": raw.get("null_reference", False)} \
                if method == "retrinet" else {}
        if method == "retrinet":  # a RetriNet file that does not name its norm was trained with GroupNorm
            config = {"norm": "group", **config}
        return cls(method, config, raw["lock"], raw.get("train_base", False), raw["unet_config"])


def file_metadata(path: str | Path) -> dict:
    """A safetensors file's metadata ({} when it has none), after `read_header`'s checks (existence,
    suffix, truncation). Files written by `ReferenceUNet.save` hold METADATA_KEY; official ones do not."""
    read_header(path)
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def base_config_mismatch(saved: dict, cfg: UNetConfig) -> dict:
    """{field: (file's value, cfg's value)} where a checkpoint's base U-Net config differs from
    `cfg`; empty when they agree. Fields newer than the file take their defaults."""
    expected = json.loads(json.dumps(cfg.__dict__, default=list))
    defaults = json.loads(json.dumps(UNetConfig().__dict__, default=list))
    saved = {k: saved.get(k, defaults[k]) for k in expected}
    return {k: (saved[k], v) for k, v in expected.items() if saved[k] != v}
