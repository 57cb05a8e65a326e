"""Loading CLIP weights from the official safetensors layouts, strictly.

Layouts understood (detected from the key names, never from the file name):

* `sd-single-file`: SD v1.5's `v1-5-pruned-emaonly.safetensors`; the text encoder sits under
  `cond_stage_model.transformer.text_model.` beside the UNet and VAE, which are not read here;
* `hf-clip-text`: SD's diffusers `text_encoder/model.safetensors` (`text_model.*` only);
* `hf-clip`: openai/clip-vit-large-patch14's `model.safetensors` (`text_model.*`, `vision_model.*`,
  `text_projection.weight`, `visual_projection.weight`, `logit_scale`);
* `hf-clip-text-unprefixed`: a CLIPTextModel saved by transformers >= 5, which drops `text_model.`.

The image encoder (`load_image_encoder`) reads `hf-clip` files: IP-Adapter's `image_encoder/model.safetensors`
(a CLIPVisionModelWithProjection: `vision_model.*`, `visual_projection.weight`) or a full CLIP model's file,
whose text side (`text_model.*`, `text_projection.weight`, `logit_scale`) it leaves unread.

`*.position_ids` buffers are ignored (merged models sometimes hold corrupt ones; positions are
always 0..L-1). Anything else that does not fit fails with the file, the layout and the first
missing / unexpected / mis-shaped keys.
"""
from __future__ import annotations

from pathlib import Path

import torch

from common.weights import (CheckpointError, FieldError, config_beside, detect_layout, load_strict, read_header,
                            read_tensors, resolve_file, shown)
from .model import CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

SD_TEXT_PREFIX = "cond_stage_model.transformer."

def _not_position_ids(key: str) -> bool:
    return not key.endswith("embeddings.position_ids")


def _text_keys(file: Path, keys: list[str], layout: str) -> tuple[list[str], callable]:
    """The file's text-encoder keys and how to rename them to CLIPTextModel keys."""
    if layout == "sd-single-file" and any(k.startswith(SD_TEXT_PREFIX + "text_model.") for k in keys):
        return [k for k in keys if k.startswith(SD_TEXT_PREFIX)], lambda k: k[len(SD_TEXT_PREFIX):]
    if layout in ("hf-clip", "hf-clip-text"):
        return [k for k in keys if k.startswith("text_model.")], lambda k: k
    if layout == "hf-clip-text-unprefixed":
        return keys, lambda k: "text_model." + k
    raise CheckpointError(f"{file}: detected layout {layout!r} holds no CLIP text encoder (expected keys under "
                          f"'text_model.' or '{SD_TEXT_PREFIX}text_model.'; first keys: {', '.join(keys[:3])})")


def load_text_encoder(path: str | Path, cfg: CLIPTextConfig | None = None, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> CLIPTextModel:
    """SD v1.5's text encoder from any of the layouts above.

    `path` is a .safetensors file, a diffusers model folder (reads `text_encoder/model.safetensors`)
    or a folder holding `model.safetensors`. The config is `cfg`, else `config.json` beside the file,
    else ViT-L/14's.
    """
    file = resolve_file(path, ["text_encoder/model.safetensors", "model.safetensors"])
    keys = [k for k in read_header(file) if _not_position_ids(k)]
    layout = detect_layout(keys)
    keys, rename = _text_keys(file, keys, layout)
    if cfg is None:
        found = config_beside(file) if layout != "sd-single-file" else None
        nested = isinstance(found, dict) and "text_config" in found
        found = found["text_config"] if nested else found
        cfg = (_from_file(CLIPTextConfig, found, file.parent / "config.json", "text_config." if nested else "")
               if found else CLIPTextConfig.vit_l14())
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    state = read_tensors(file, keys, rename=rename, device=device, dtype=dtype)
    load_strict(model, state, source=str(file), layout=layout)
    return model.to(device=device, dtype=dtype).eval()


def load_clip(path: str | Path, text_cfg: CLIPTextConfig | None = None, vision_cfg: CLIPVisionConfig | None = None,
              *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> CLIPModel:
    """Both CLIP towers and projections from openai/clip-vit-large-patch14's `model.safetensors`
    layout (a file, or its folder). Configs: the arguments, else `config.json` beside the file, else
    ViT-L/14's."""
    file = resolve_file(path, ["model.safetensors"])
    keys = [k for k in read_header(file) if _not_position_ids(k)]
    layout = detect_layout(keys)
    if layout != "hf-clip":
        raise CheckpointError(f"{file}: detected layout {layout!r}, expected a full CLIP model ('hf-clip': keys "
                              f"text_model.*, vision_model.*, text_projection.weight, visual_projection.weight, "
                              f"logit_scale)")
    found = config_beside(file)
    if found is not None and (text_cfg is None or vision_cfg is None):
        source = file.parent / "config.json"
        text, vision = (_part(found, name, source) for name in ("text_config", "vision_config"))
        projection = {"projection_dim": found.get("projection_dim", 512)}  # CLIPConfig's own default
        text_cfg = text_cfg or _from_file(CLIPTextConfig, {**text, **projection}, source, "text_config.")
        vision_cfg = vision_cfg or _from_file(CLIPVisionConfig, {**vision, **projection}, source, "vision_config.")
    text_cfg = text_cfg or CLIPTextConfig.vit_l14()
    vision_cfg = vision_cfg or CLIPVisionConfig.vit_l14()
    with torch.device("meta"):
        model = CLIPModel(text_cfg, vision_cfg)
    state = read_tensors(file, keys, device=device, dtype=dtype)
    load_strict(model, state, source=str(file), layout=layout)
    return model.to(device=device, dtype=dtype).eval()


def _checked(cls, values, source: str | Path, key: str = "") -> dict:
    """`cls.checked(values, key)` with errors naming the file `source`."""
    try:
        return cls.checked(values, key)
    except FieldError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _from_file(cls, values, source: str | Path, key: str = ""):
    """`cls` (CLIPTextConfig or CLIPVisionConfig) from a transformers config dict read from
    `source`, its values checked first (`_checked`)."""
    return cls.from_hf(_checked(cls, values, source, key))


def _part(found, name: str, source: str | Path) -> dict:
    """Entry `name` (text_config, vision_config) of a CLIPConfig dict; {} when it has none."""
    if not isinstance(found, dict):
        raise CheckpointError(f"{source}: holds {shown(found)}; expected a JSON object (a transformers CLIPConfig)")
    part = found.get(name, {})
    if not isinstance(part, dict):
        raise CheckpointError(f"{source}: '{name}' is {shown(part)}; expected a JSON object (a CLIPConfig's {name})")
    return part


def _is_text_side(key: str) -> bool:
    """Keys of a full CLIPModel file that the image encoder does not hold."""
    return key.startswith("text_model.") or key in ("text_projection.weight", "logit_scale")


_VISION_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size", "projection_dim", "num_channels")


def _square(value):
    """transformers allows image_size / patch_size as [h, w]; this model is square."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        return value[0]
    return value


def _vision_config_from_json(found, source: str | Path = "config.json") -> CLIPVisionConfig:
    """The image tower's config from a transformers config.json dict: a CLIPVisionConfig (fields at
    the top level, model_type 'clip_vision_model') or a CLIPConfig (fields under 'vision_config', the
    shared projection_dim at the top level, model_type 'clip'). Values are checked; `source` names
    the file in errors."""
    expected = "expected a transformers CLIPVisionConfig or CLIPConfig"
    if not isinstance(found, dict):
        raise CheckpointError(f"{source}: {expected}, got a JSON {type(found).__name__}")
    model_type = found.get("model_type")
    if "vision_config" in found or model_type == "clip":
        vision = found.get("vision_config", {})
        if not isinstance(vision, dict):
            raise CheckpointError(f"{source}: 'vision_config' is a {type(vision).__name__}, {expected}")
        d = {**vision, "projection_dim": found.get("projection_dim", 512)}  # CLIPConfig's own default
    elif model_type in (None, "clip_vision_model"):
        d = found
    else:
        raise CheckpointError(f"{source}: model_type {model_type!r}, {expected} (model_type 'clip_vision_model' "
                              f"or 'clip')")
    d = {**d, **{k: _square(d[k]) for k in ("image_size", "patch_size") if k in d}}
    cfg = CLIPVisionConfig.from_hf(d)
    bad = [f"{k}={getattr(cfg, k)!r}" for k in _VISION_SIZES
           if type(getattr(cfg, k)) is not int or getattr(cfg, k) <= 0]
    if bad:
        raise CheckpointError(f"{source}: expected positive integers, got {', '.join(bad)}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise CheckpointError(f"{source}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                              f"{cfg.num_attention_heads}")
    if cfg.patch_size > cfg.image_size:
        raise CheckpointError(f"{source}: patch_size {cfg.patch_size} is larger than image_size {cfg.image_size}")
    if cfg.hidden_act not in ("gelu", "quick_gelu"):
        raise CheckpointError(f"{source}: hidden_act {cfg.hidden_act!r}, expected 'gelu' or 'quick_gelu'")
    if isinstance(cfg.layer_norm_eps, bool) or not isinstance(cfg.layer_norm_eps, (int, float)) \
            or not cfg.layer_norm_eps > 0:
        raise CheckpointError(f"{source}: layer_norm_eps {cfg.layer_norm_eps!r}, expected a positive number")
    # Then the bounds every CLIP config read from a file has (a layer count of 10^7 would build for hours).
    nested = "vision_config" in found or model_type == "clip"
    _checked(CLIPVisionConfig, vars(cfg), source, "vision_config." if nested else "")
    return cfg


def load_image_encoder(path: str | Path, cfg: CLIPVisionConfig | None = None, *,
                       device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> CLIPVisionModelWithProjection:
    """A CLIP image encoder with its projection (IP-Adapter's `image_encoder/`), strictly.

    `path` is a folder holding `model.safetensors` (or `image_encoder/model.safetensors`) and
    `config.json`, or a .safetensors file. The file is IP-Adapter's image encoder (`vision_model.*`
    and `visual_projection.weight`) or a full CLIPModel (openai/clip-vit-large-patch14), whose text
    keys are ignored. The config is `cfg`, else the `config.json` beside the file (a transformers
    CLIPVisionConfig or CLIPConfig); there is no default, as both ViT-H/14 and ViT-L/14 are common.
    """
    if not Path(path).exists():
        raise CheckpointError(f"{path}: no such file or folder")
    file = resolve_file(path, ["model.safetensors", "image_encoder/model.safetensors"])
    keys = [k for k in read_header(file) if _not_position_ids(k)]
    layout = detect_layout(keys)
    if layout != "hf-clip":
        raise CheckpointError(f"{file}: detected layout {layout!r} holds no CLIP image encoder (expected 'hf-clip': "
                              f"keys vision_model.* and visual_projection.weight; first keys: {', '.join(keys[:3])})")
    keys = [k for k in keys if not _is_text_side(k)]
    if cfg is None:
        found = config_beside(file)
        if found is None:
            raise CheckpointError(f"{file}: no config.json beside it and no cfg given; pass cfg, e.g. "
                                  f"CLIPVisionConfig.vit_h14() for IP-Adapter's image encoder")
        cfg = _vision_config_from_json(found, file.parent / "config.json")
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(cfg)
    state = read_tensors(file, keys, device=device, dtype=dtype)
    load_strict(model, state, source=str(file), layout=layout)
    return model.to(device=device, dtype=dtype).eval()
