"""Reading safetensors checkpoints and loading them strictly, with errors that say what is wrong.

Only safetensors are read: pickled `.ckpt` / `.bin` / `.pth` files can run arbitrary code on load.
Values read from files (checkpoint metadata, config JSON) are type-checked and bounded by
`check_values` / `check_fields` before anything is built from them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path
from dataclasses import dataclass
from types import UnionType
from typing import Callable, Iterable, Union, get_args, get_origin, get_type_hints

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

    Reads only the header, so it is cheap even for a 4 GB file. Every entry is checked as the
    safetensors library checks it before reading any tensor (a known dtype, a shape of non-negative
    integers, data offsets that span exactly the bytes of that shape and dtype, tensors following each
    other without gap or overlap) and the file must end with the last of them (a truncated download
    fails here, not halfway through a load). Errors are one line naming the file and the tensor.
    """
    return _read_header(Path(path))[0]


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file ({} when it has none), after `read_header`'s checks."""
    return _read_header(Path(path))[1]


# Bits per element of each safetensors dtype (the library's Dtype::bitsize).
SAFETENSORS_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
                          "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
                          "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def _read_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
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
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header: '__metadata__' is {shown(metadata)}; expected "
                              f"an object of strings")
    spans = sorted((_entry_span(path, key, entry), key) for key, entry in header.items())
    end = 0
    for (begin, stop), key in spans:
        if begin != end:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {key!r} starts at byte {begin} of the "
                                  f"data, expected {end} (tensors follow each other without gaps or overlaps)")
        end = stop
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: its tensors need {8 + n + end} bytes, the file has {size}")
    if 8 + n + end < size:  # the library refuses it too ("file not fully covered")
        raise CheckpointError(f"{path}: corrupt safetensors file: {size - 8 - n - end} bytes after its last tensor; "
                              f"expected the file to end with it")
    return header, metadata


def _entry_span(path: Path, key: str, entry) -> tuple[int, int]:
    """The data offsets of header entry `key`, after checking its dtype and shape against them."""
    def bad(what: str):
        return CheckpointError(f"{path}: corrupt safetensors header: tensor {key!r} {what}")
    if not isinstance(entry, dict) or {"dtype", "shape", "data_offsets"} - set(entry):
        raise bad(f"is {shown(entry)}; expected an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
        raise bad(f"has dtype {shown(dtype)}; expected one of {', '.join(SAFETENSORS_DTYPE_BITS)}")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise bad(f"has shape {shown(shape)}; expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise bad(f"has data_offsets {shown(offsets)}; expected [begin, end], non-negative integers, begin <= end")
    bits = SAFETENSORS_DTYPE_BITS[dtype]
    for d in shape:
        bits *= d
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        size = bits // 8 if bits % 8 == 0 else bits / 8
        raise bad(f"of shape {shown(shape)} in {dtype} takes {size} bytes, but its data_offsets {offsets} span "
                  f"{offsets[1] - offsets[0]}")
    return offsets[0], offsets[1]


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
        try:
            cfg = part.config_from_diffusers(found) if found else part.default_config()
        except FieldError as e:
            raise CheckpointError(f"{file.parent / 'config.json'}: {e}") from None
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


# -- values read from files: checkpoint metadata, config JSON -----------------------------------------
# A file is downloaded, so its values are checked before anything is built from them: types as the
# config dataclass declares them, counts and sizes within bounds (a layer count of 10^7 would build
# for hours, a head count of 0 divides by zero).

class FieldError(ValueError):
    """A value read from a file that is of the wrong type (`kind` "TypeError") or out of bounds
    ("ValueError"): names its dotted `key`, the value and what was expected. Callers add the file."""

    def __init__(self, key: str, value, expected: str, kind: str = "ValueError"):
        self.key, self.value, self.expected, self.kind = key, value, expected, kind
        super().__init__(f"'{key}' is {shown(value)}; expected {expected}")


def shown(value, limit: int = 80) -> str:
    """`value` as messages show it: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_values(values, types: dict, *, key: str = "", limits: dict | None = None, choices: dict | None = None,
                 lengths: dict | None = None, unknown: bool = False) -> dict:
    """`values` (a JSON object read from a file) checked against `types` {name: int, float, bool, str,
    tuple (a list of integers), tuple[str, ...], or a union of those and None}. Numbers (bools are
    none; floats finite) lie within `limits` {name: (low, high)}, either end None when open, and so
    does each entry of a list; values are among `choices` {name: tuple} where given; lists have
    `lengths` {name: (low, high)} entries (default 0 to 16). Names not in `types` are refused, or
    left out with `unknown=True` (a transformers config holds many we do not read). Returns the
    checked entries; FieldError for the first that fails, its key prefixed by `key`."""
    limits, choices, lengths = limits or {}, choices or {}, lengths or {}
    if not isinstance(values, dict):
        raise FieldError(key.rstrip(".") or "(top level)", values, "a JSON object", "TypeError")
    out = {}
    for name, value in values.items():
        if name not in types:
            if unknown:
                continue
            raise FieldError(key + name, value, f"only the fields {', '.join(types)}", "TypeError")
        t = types[name]
        options = get_args(t) if get_origin(t) in (Union, UnionType) else (t,)
        bounds = (limits.get(name), choices.get(name), lengths.get(name, (0, 16)))
        expected = " or ".join(_described(option, *bounds) for option in options)
        typed = [option for option in options if _is(value, option)]
        if not typed:
            raise FieldError(key + name, value, expected, "TypeError")
        if not any(_within(value, option, *bounds) for option in typed):
            raise FieldError(key + name, value, expected)
        out[name] = value
    return out


def check_fields(cls, values, *, key: str = "", **bounds) -> dict:
    """`check_values` with the types of the dataclass `cls`'s fields (its annotations)."""
    hints = get_type_hints(cls)
    return check_values(values, {f.name: hints[f.name] for f in dataclasses.fields(cls)}, key=key, **bounds)


def _is(value, t) -> bool:
    """Whether `value` (from JSON) has type `t`: bools are not numbers, ints are floats, lists are tuples."""
    if t is type(None):
        return value is None
    if t is bool:
        return isinstance(value, bool)
    if t in (int, float):
        return isinstance(value, int if t is int else (int, float)) and not isinstance(value, bool)
    if t is str:
        return isinstance(value, str)
    if t is tuple or get_origin(t) is tuple:
        entry = (get_args(t) or (int,))[0]
        return isinstance(value, (list, tuple)) and all(_is(v, entry) for v in value)
    raise TypeError(f"check_values does not know the type {t!r}")


def _within(value, t, limit, choices, length) -> bool:
    if t is tuple or get_origin(t) is tuple:
        entry = (get_args(t) or (int,))[0]
        return length[0] <= len(value) <= length[1] and all(_within(v, entry, limit, choices, None) for v in value)
    if choices is not None and value not in choices:
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if limit is not None and t in (int, float):
        low, high = limit
        return (low is None or value >= low) and (high is None or value <= high)
    return True


def _described(t, limit, choices, length) -> str:
    """What a value of type `t` within the bounds is, in words."""
    if t is type(None):
        return "null"
    if t is bool:
        return "true or false"
    among = f" among {', '.join(repr(c) for c in choices)}" if choices is not None else ""
    if t is tuple or get_origin(t) is tuple:
        entry = (get_args(t) or (int,))[0]
        low, high = length
        noun = {int: "integers", float: "finite numbers", str: "strings"}[entry]
        return f"a list of {f'{low} to {high}' if low else f'up to {high}'} {noun}" + (among or _range(limit))
    if choices is not None:
        return "one of " + ", ".join(repr(c) for c in choices)
    return {int: "an integer", float: "a finite number", str: "a string"}[t] + _range(limit)


def _range(limit) -> str:
    if limit is None:
        return ""
    low, high = limit
    return (f" from {low} to {high}" if low is not None and high is not None else
            f" >= {low}" if low is not None else f" <= {high}")
