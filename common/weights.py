"""Reading safetensors checkpoints and loading them strictly, with errors that say what is wrong.

Only safetensors are read: pickled `.ckpt` / `.bin` / `.pth` files can run arbitrary code on load.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, of an unknown layout or does not fit the model."""


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a .safetensors file")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: only .safetensors files are read (pickled checkpoints such as "
                              f".ckpt / .bin / .pth are refused); convert it to safetensors first")


def resolve_file(path: str | Path, candidates: list[str]) -> Path:
    """`path` itself when it is a file; in a folder, the first of `candidates` that exists."""
    path = Path(path)
    if path.is_dir():
        for name in candidates:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: folder holds none of {', '.join(candidates)}")
    return path


def config_beside(file: Path) -> dict | None:
    """The `config.json` in the same folder as `file` (diffusers / transformers layouts), if any."""
    cfg = Path(file).parent / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None


def read_header(path: str | Path) -> dict[str, dict]:
    """The tensor entries of a safetensors header: {key: {"dtype", "shape", "data_offsets"}}.

    Reads only the header, so it is cheap even for a 4 GB file; checks that the file is long enough
    for every tensor it declares (a truncated download fails here, not halfway through a load).
    """
    path = Path(path)
    _check_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: not a safetensors file or truncated (header claims {n} bytes, "
                                  f"file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: its tensors need {8 + n + end} bytes, the file has {size}")
    return header


def read_tensors(path: str | Path, keys: Iterable[str] | None = None, *,
                 rename: Callable[[str], str] = lambda k: k, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read `keys` (default: all) from a safetensors file into {rename(key): tensor}.

    Floating-point tensors are cast to `dtype` when given; integer tensors are left alone. A tensor
    holding NaN or infinity, or one that overflows `dtype` (fp16 tops out at 65504), raises
    CheckpointError naming the file and the first such key in reading order: one
    `isfinite().all()` per tensor (two when cast), gathered before a single device sync.
    """
    path = Path(path)
    header = read_header(path)
    keys = list(header) if keys is None else list(keys)
    out = {}
    finite, fits = [], []   # (key, 0-d bool tensor): no device sync until every tensor is read
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in keys:
                t = f.get_tensor(key)
                if t.is_floating_point() and t.numel():
                    finite.append((key, torch.isfinite(t).all()))
                    if dtype is not None and t.dtype != dtype:
                        t = t.to(dtype)
                        fits.append((key, torch.isfinite(t).all()))
                out[rename(key)] = t
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise CheckpointError(f"{path}: could not read tensors ({type(e).__name__}: {e})") from None
    bad = _first_false(finite)
    if bad is not None:
        what = "NaN" if bool(torch.isnan(out[rename(bad)]).any()) else "infinite"
        raise CheckpointError(f"{path}: tensor {bad} holds {what} values (a diverged or corrupt checkpoint); "
                              f"refusing to load it")
    bad = _first_false(fits)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad} overflows {str(dtype).replace('torch.', '')} (values beyond its "
                              f"range); load it in fp32 or bf16")
    return out


def _first_false(flags: list[tuple[str, torch.Tensor]]) -> str | None:
    """The key of the first False flag, with one device sync for all of them."""
    if not flags:
        return None
    ok = torch.stack([flag for _, flag in flags]).cpu()
    return None if bool(ok.all()) else flags[int((~ok).nonzero()[0])][0]


# Keys that identify a layout, checked in order; the first whose marker some key matches wins.
_LAYOUT_MARKERS = [
    ("sd-single-file", lambda k: k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))),
    ("controlnet", lambda k: k.startswith("control_model.")),
    ("hf-clip", lambda k: k.startswith("vision_model.")),
    ("hf-clip-text", lambda k: k.startswith("text_model.")),
    ("hf-clip-text-unprefixed", lambda k: k.startswith("embeddings.token_embedding.")),
    ("diffusers-controlnet", lambda k: k.startswith("controlnet_cond_embedding.")),
    ("diffusers-unet", lambda k: k.startswith(("time_embedding.", "down_blocks.", "mid_block."))),
    ("ldm-unet", lambda k: k.startswith(("input_blocks.", "time_embed."))),
    ("diffusers-vae", lambda k: k.startswith(("encoder.down_blocks.", "decoder.up_blocks."))),
    ("ldm-vae", lambda k: k.startswith(("encoder.down.", "decoder.up.", "post_quant_conv."))),
]


def detect_layout(keys) -> str:
    """Name of the checkpoint layout that `keys` belong to ('unknown' if none matches).

    `sd-single-file`: SD v1.5's single file (model.diffusion_model. / first_stage_model. /
    cond_stage_model.); `controlnet`: official ControlNet (control_model.); `hf-clip`,
    `hf-clip-text`, `hf-clip-text-unprefixed`: transformers CLIP files; `diffusers-unet`,
    `diffusers-vae`, `diffusers-controlnet`: diffusers model files; `ldm-unet`, `ldm-vae`: bare LDM
    state dicts.
    """
    keys = list(keys)
    for name, marker in _LAYOUT_MARKERS:
        if any(marker(k) for k in keys):
            return name
    return "unknown"


def _first(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, source: str,
                layout: str) -> None:
    """Copy `state_dict` into `module`, requiring the exact set of keys and shapes.

    On mismatch raises CheckpointError naming the source file, the layout detected in it, and the
    first missing / unexpected / wrongly shaped keys.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]  # in module order, so layers read 0, 1, 2, ...
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} (file {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)})"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys: {_first(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
        if shapes:
            problems.append(f"{len(shapes)} shape mismatches (is the model config the file's?): {_first(shapes, 3)}")
        raise CheckpointError(f"{source}: detected layout {layout!r} does not fit {type(module).__name__}: "
                              + "; ".join(problems))
    # A module built on the meta device (no wasted random init) takes the file's tensors as they are.
    on_meta = any(t.is_meta for t in own.values())
    module.load_state_dict(state_dict, strict=True, assign=on_meta)


def rename_by_prefix(state: dict[str, torch.Tensor], table: dict[str, str],
                     inner: Callable[[str, str, torch.Tensor], tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Rename keys by the first prefix of `table` they start with (diffusers block -> LDM block);
    `inner(prefix, rest, value)` renames what follows the prefix (and may reshape the value). Keys no
    prefix matches are kept as they are, so that a strict load names them as unexpected."""
    out = {}
    for key, value in state.items():
        prefix = next((p for p in table if key.startswith(p)), None)
        if prefix is None:
            out[key] = value
            continue
        rest, value = inner(prefix, key[len(prefix):], value)
        out[table[prefix] + rest] = value
    return out


@dataclass(frozen=True)
class SDPart:
    """How one Stable Diffusion model (U-Net or VAE) is stored: its name in messages, its diffusers
    subfolder, its prefix in the single file, its diffusers and bare-LDM layout names, and how to
    build it, read a diffusers config.json and rename diffusers keys to LDM ones."""
    name: str
    subfolder: str
    sd_prefix: str
    diffusers_layout: str
    ldm_layout: str
    build: Callable
    default_config: Callable
    config_from_diffusers: Callable
    diffusers_to_ldm: Callable


def load_sd_part(part: SDPart, path: str | Path, cfg=None, *, device="cpu", dtype=torch.float32):
    """Load `part` strictly from SD's single file, a diffusers folder (or its part's file) or a bare
    LDM-named file. Config: `cfg`, else the diffusers `config.json` beside the file, else the default."""
    file = resolve_file(path, [f"{part.subfolder}/diffusion_pytorch_model.safetensors",
                               "diffusion_pytorch_model.safetensors"])
    keys = list(read_header(file))
    layout = detect_layout(keys)
    if cfg is None:
        found = config_beside(file) if layout == part.diffusers_layout else None
        cfg = part.config_from_diffusers(found) if found else part.default_config()
    if layout == "sd-single-file":
        own = [k for k in keys if k.startswith(part.sd_prefix)]
        if not own:
            raise CheckpointError(f"{file}: detected layout 'sd-single-file' holds no {part.name} (no keys under "
                                  f"'{part.sd_prefix}')")
        state = read_tensors(file, own, rename=lambda k: k[len(part.sd_prefix):], device=device, dtype=dtype)
    elif layout == part.diffusers_layout:
        state = part.diffusers_to_ldm(read_tensors(file, device=device, dtype=dtype), cfg)
    elif layout == part.ldm_layout:
        state = read_tensors(file, device=device, dtype=dtype)
    else:
        raise CheckpointError(f"{file}: detected layout {layout!r} holds no {part.name} (expected SD's single file, a "
                              f"diffusers {part.subfolder}/ file or LDM {part.name} keys; first keys: "
                              f"{', '.join(keys[:3])})")
    with torch.device("meta"):
        model = part.build(cfg)
    load_strict(model, state, source=str(file), layout=layout)
    return model.to(device=device, dtype=dtype).eval()
