"""What every conditioning method shares (docs/design.md sections 3, 3b): SD's U-Net plus the module
the method adds, what trains under each lock, and checkpoint files.

A method enters the U-Net through its seam, `UNet.encode` / `UNet.decode(..., skip_residuals,
middle_residual)`: RetriNet adds cross-attention residuals computed from the references, the
ControlNet adds the outputs of its own copy of the encoder half. Each method is a subclass of
`ReferenceUNet` and owns everything that makes it that method: its forward pass and config
dataclass, how it is built from a command line's choices (`build`, `MethodOptions`), its training
defaults and the options it refuses (`training_defaults`, `option_problems`), how a training batch
becomes its inputs (`training_inputs`) and how it samples (`denoiser`, `guided_predictor`). This
module holds the rest:

* locks (paper Sec. 5.2): "none" trains the added module and SD's decoder; "decoder" (LockD)
  freezes the decoder; "both" (LockB) also freezes the added module's encoder part. SD's encoder
  half is always frozen, unless `train_base` trains the whole U-Net (a base trained from scratch);
* `save` / `load`: the added weights under the method's key prefix (plus SD's decoder when it
  trained, the whole U-Net with `train_base`), with the method, its config, the lock and the base
  U-Net's config in the safetensors metadata (entry "retrinet", for every method);
* `SavedModel`: that metadata, read back with every value type-checked and bounded.

`retrinet.checkpoints` holds `METHODS` and `build_model`, the one place that turns a method's name
into its model; it also tells what any file holds without building a model, and loads it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn
from safetensors.torch import save_file

from common.weights import CheckpointError, FieldError, load_strict, read_metadata, read_tensors, shown
from diffusion.sd15 import ClassifierFreeGuidance
from unet import UNet, UNetConfig

LOCKS = ("none", "decoder", "both")  # paper: default, LockD, LockB
METADATA_KEY = "retrinet"            # the safetensors metadata entry of every checkpoint written here


@dataclass
class MethodOptions:
    """What a training command line decides about a method's model; each method reads its own."""
    lock: str = "none"
    train_base: bool = False              # the whole U-Net trains too (a base trained from scratch)
    heads: int = 8                        # RetriNet: heads of its reference cross-attention
    null_reference: bool = False          # RetriNet: a learned null reference (reference dropout)
    hint_downscale: int = 8               # ControlNet: pixels per latent (the VAE's downscale)
    image_encoder: nn.Module | None = None  # IP-Adapter: the frozen CLIP image encoder


class ReferenceUNet(nn.Module):
    """SD's U-Net (`self.unet`) with a conditioning method's module (`self.added`). Subclasses set
    the class attributes below, build the added module, and implement `build`, `forward`,
    `lockb_frozen`, `training_inputs` and `denoiser` (sampling with references)."""

    method: str = ""   # the name files and command lines use (--method)
    title: str = ""    # the name messages use
    prefix: str = ""   # the key prefix of the added weights in files
    config_class: type = object
    references: int | None = None      # reference images it takes (None: any number, each with a concept)
    needs_image_encoder: bool = False  # its references go through a frozen CLIP image encoder
    image_scale: bool = False          # sampling weighs its image attention by a scale (ip_scale)
    reference_at_target_size: bool = False  # its reference is drawn at the target's size (a hint)
    training_defaults: dict = {}       # train.py's defaults where its command line gives none (before the preset's)
    locks: tuple = LOCKS               # the locks that apply

    @classmethod
    def build(cls, unet: UNet, options: MethodOptions) -> "ReferenceUNet":
        """This method's model around `unet`, as `options` choose (retrinet.build_model)."""
        raise NotImplementedError

    @classmethod
    def checkpoint_file(cls) -> str:
        """The file name of this method's weights in a training checkpoint folder."""
        return f"{cls.method}.safetensors"

    @classmethod
    def option_problems(cls, args) -> list[str]:
        """train.py options (`args`, its namespace) that do not apply to this method. The base class
        checks what a single-reference baseline refuses; RetriNet takes them all."""
        method = f"--method {cls.method}"
        problems = []
        if args.task != "recon":
            problems.append(f"{method} takes one whole-figure reference: only --task recon applies, got {args.task}")
        if args.refs != cls.references:
            problems.append(f"{method} takes one reference: --refs {cls.references}, got {args.refs}")
        if args.ref_drop > 0:
            problems.append(f"--ref-drop replaces RetriNet's references by its learned null reference; {method} has none")
        if "heads" in args.explicit:
            problems.append(f"--heads sets RetriNet's reference attention; {method} has none")
        return problems

    @classmethod
    def official_key_map(cls, cfg: UNetConfig) -> dict[str, str]:
        """{key in an official file: key in `added`} where they differ for a base U-Net of config
        `cfg` (IP-Adapter numbers its layers); empty when the official keys are ours."""
        return {}

    def training_inputs(self, sd, text, batch: dict, gens: list, u, ref_drop: float) -> dict:
        """The keyword arguments of `forward` besides (x, timesteps) for one training micro-batch:
        `sd` the frozen SD parts, `text` the prompt encoder (training.objective.Conditioning), `gens`
        each sample's generator, `u` each sample's uniform dropout draw (B,) on the device."""
        raise NotImplementedError

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

    def guided_predictor(self, denoiser, guidance: float):
        """The guided prediction `(x, t, negative, context) -> output` that sampling runs at each step
        with `denoiser` (this model's `denoiser`): classifier-free guidance over the text alone, the
        references in both branches (as training drops only the text). IP-Adapter overrides it."""
        return ClassifierFreeGuidance(denoiser, guidance)

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

    ENTRIES = ("method", "config", "lock", "train_base", "unet_config")

    @classmethod
    def read(cls, path: str | Path) -> "SavedModel":
        """From a file's metadata, every value type-checked and bounded before anything is built from
        it: the method's config by its `checked` (which knows the base U-Net: RetriNet's heads must
        split its widths), the base U-Net's by `UNetConfig.checked`, the lock among the method's.
        CheckpointError otherwise, one line naming the file, the key, the value and what was expected."""
        from .checkpoints import METHODS  # which imports this module
        meta = file_metadata(path)
        if METADATA_KEY not in meta:
            raise CheckpointError(f"{path}: not a RetriNet checkpoint (no '{METADATA_KEY}' metadata)")
        try:
            raw = json.loads(meta[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: its '{METADATA_KEY}' metadata is not valid JSON ({e.msg} at character "
                                  f"{e.pos}); expected the JSON object train.py writes") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: its '{METADATA_KEY}' metadata is {shown(raw)}; expected a JSON object "
                                  f"with {', '.join(cls.ENTRIES)}")
        missing = [k for k in cls.ENTRIES if k not in raw]
        if missing:
            raise CheckpointError(f"{path}: its '{METADATA_KEY}' metadata lacks {', '.join(missing)}")
        bad = f"{path}: bad '{METADATA_KEY}' metadata:"
        unknown = [k for k in raw if k not in cls.ENTRIES]
        if unknown:
            raise CheckpointError(f"{bad} '{unknown[0]}' is {shown(raw[unknown[0]])}; expected only the entries "
                                  f"{', '.join(cls.ENTRIES)}")
        method, lock, train_base = raw["method"], raw["lock"], raw["train_base"]
        if not isinstance(method, str) or method not in METHODS:
            raise CheckpointError(f"{path}: unknown method {shown(method)} in its '{METADATA_KEY}' metadata; expected "
                                  f"one of {', '.join(METHODS)}")
        model = METHODS[method]
        if not isinstance(lock, str) or lock not in model.locks:
            raise CheckpointError(f"{bad} 'lock' is {shown(lock)}; expected one of "
                                  f"{', '.join(map(repr, model.locks))} ({model.title}'s locks)")
        if not isinstance(train_base, bool):
            raise CheckpointError(f"{bad} 'train_base' is {shown(train_base)}; expected true or false")
        if train_base and lock != "none":
            raise CheckpointError(f"{bad} 'train_base' is True; expected false with lock {lock!r} (train_base trains "
                                  f"the whole U-Net, which a lock freezes in part)")
        try:
            unet_config = UNetConfig.checked(raw["unet_config"], "unet_config.")
        except FieldError as e:
            raise CheckpointError(f"{path}: bad base U-Net config in its metadata: {e}") from None
        try:
            config = model.config_class.checked(raw["config"], "config.", unet=UNetConfig(**unet_config))
        except FieldError as e:
            raise CheckpointError(f"{path}: bad {method} config in its metadata: {e}") from None
        return cls(method, config, lock, train_base, unet_config)


def file_metadata(path: str | Path) -> dict:
    """A safetensors file's metadata ({} when it has none), after `read_header`'s checks (existence,
    suffix, every tensor entry, truncation). Files written by `ReferenceUNet.save` hold METADATA_KEY;
    official ones do not."""
    return read_metadata(path)


def base_config_mismatch(saved: dict, cfg: UNetConfig) -> dict:
    """{field: (file's value, cfg's value)} where a checkpoint's base U-Net config differs from
    `cfg` (a field the file lacks: None); empty when they agree."""
    expected = json.loads(json.dumps(cfg.__dict__, default=list))
    return {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
