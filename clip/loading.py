"""Loading CLIP weights from the official safetensors layouts, strictly.

Layouts understood (detected from the key names, never from the file name):

* `sd-single-file`: SD v1.5's `v1-5-pruned-emaonly.safetensors`; the text encoder sits under
  `cond_stage_model.transformer.text_model.` beside the UNet and VAE, which are not read here;
* `hf-clip-text`: SD's diffusers `text_encoder/model.safetensors` (`text_model.*` only);
* `hf-clip`: openai/clip-vit-large-patch14's `model.safetensors` (`text_model.*`, `vision_model.*`,
  `text_projection.weight`, `visual_projection.weight`, `logit_scale`);
* `hf-clip-text-unprefixed`: a CLIPTextModel saved by transformers >= 5, which drops `text_model.`.

`*.position_ids` buffers are ignored (merged models sometimes hold corrupt ones; positions are
always 0..L-1). Anything else that does not fit fails with the file, the layout and the first
missing / unexpected / mis-shaped keys.
"""
from __future__ import annotations

from pathlib import Path

import torch

from common.weights import (CheckpointError, config_beside, detect_layout, load_strict, read_header, read_tensors,
                            resolve_file)
from .model import CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig

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
        found = (found or {}).get("text_config", found)
        cfg = CLIPTextConfig.from_hf(found) if found else CLIPTextConfig.vit_l14()
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
        projection = {"projection_dim": found.get("projection_dim", 512)}  # CLIPConfig's own default
        text_cfg = text_cfg or CLIPTextConfig.from_hf({**found.get("text_config", {}), **projection})
        vision_cfg = vision_cfg or CLIPVisionConfig.from_hf({**found.get("vision_config", {}), **projection})
    text_cfg = text_cfg or CLIPTextConfig.vit_l14()
    vision_cfg = vision_cfg or CLIPVisionConfig.vit_l14()
    with torch.device("meta"):
        model = CLIPModel(text_cfg, vision_cfg)
    state = read_tensors(file, keys, device=device, dtype=dtype)
    load_strict(model, state, source=str(file), layout=layout)
    return model.to(device=device, dtype=dtype).eval()
