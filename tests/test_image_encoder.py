"""CLIP image encoder with projection (IP-Adapter's `image_encoder/`, laion ViT-H/14): parity with
transformers' CLIPVisionModelWithProjection on random weights, the full-size layout, and loading."""
import json
from dataclasses import asdict, fields

import pytest
import torch
import transformers
from safetensors.torch import save_file

from clip import CLIPVisionConfig, CLIPVisionModelWithProjection, load_image_encoder
from common.weights import CheckpointError
from helpers import randomize_, rel_err

TOL = 1e-4
FORMAT = {"format": "pt"}

# ViT-H/14 as in IP-Adapter's image_encoder/config.json (laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
H14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
           patch_size=14, projection_dim=1024, layer_norm_eps=1e-5, num_channels=3, hidden_act="gelu")
# ViT-H/14's widths at 2 layers on 70x70 images (5x5 patches of 14: 26 tokens).
H14_SHALLOW = dict(H14, num_hidden_layers=2, image_size=70)
# A small, odd-shaped tower for the loading tests: head dim 12, 5x5 patches of 6.
SMALL = dict(hidden_size=60, intermediate_size=70, num_hidden_layers=2, num_attention_heads=5, image_size=30,
             patch_size=6, projection_dim=20, hidden_act="gelu")


def _hf_vision(d, seed):
    cfg = transformers.CLIPVisionConfig(**d)
    cfg._attn_implementation = "eager"  # the plain matmul-softmax path: independent of our SDPA call
    return randomize_(transformers.CLIPVisionModelWithProjection(cfg).eval(), seed)


def _pixels(n, size, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_small():
    return _hf_vision(SMALL, seed=21)


def _check(model, hf, size=30, n=3):
    pixels = _pixels(n, size)
    with torch.no_grad():
        ours = model(pixels)
        ref = hf(pixel_values=pixels).image_embeds
    assert ours.shape == (n, hf.config.projection_dim)
    assert rel_err(ours, ref) <= TOL


# ---- the model ----------------------------------------------------------------------------------

def test_vit_h14_config_is_transformers_field_for_field():
    ours = CLIPVisionConfig.vit_h14()
    assert asdict(ours) == H14
    hf = transformers.CLIPVisionConfig(**H14)
    for f in fields(CLIPVisionConfig):  # our field names are transformers' names
        assert getattr(hf, f.name) == getattr(ours, f.name), f.name
    assert CLIPVisionConfig.vit_l14().hidden_act == "quick_gelu"


def test_vit_h14_shaped_tower_matches_transformers():
    """ViT-H/14 widths (1280 / 5120, 16 heads of 80, exact GELU) at 2 layers on odd 70x70 images."""
    hf = _hf_vision(H14_SHALLOW, seed=3)
    ours = CLIPVisionModelWithProjection(CLIPVisionConfig.from_hf(H14_SHALLOW)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # same key names, no mapping
    pixels = _pixels(3, 70)
    with torch.no_grad():
        ref = hf(pixel_values=pixels)
        assert rel_err(ours.vision_model(pixels), ref.last_hidden_state) <= TOL
        embeds = ours(pixels)
    assert embeds.shape == (3, 1024)
    assert rel_err(embeds, ref.image_embeds) <= TOL
    # gelu is really used: the same weights under quick_gelu give another answer.
    quick = CLIPVisionModelWithProjection(CLIPVisionConfig.from_hf({**H14_SHALLOW, "hidden_act": "quick_gelu"}))
    quick.load_state_dict(hf.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(quick.eval()(pixels), ref.image_embeds) > 1e-3


def test_full_vit_h14_layout_equals_transformers():
    """The full 32-layer ViT-H/14 (built on the meta device): same keys, shapes and parameter count."""
    with torch.device("meta"):
        ours = CLIPVisionModelWithProjection(CLIPVisionConfig.vit_h14())
        hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**H14))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    assert ours_shapes == hf_shapes
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in hf.parameters())
    d, n, layer = 1280, 16 * 16 + 1, 4 * (1280 * 1280 + 1280) + 2 * 1280 * 5120 + 5120 + 1280 + 4 * 1280
    assert count == d + 3 * 14 * 14 * d + n * d + 2 * 2 * d + 32 * layer + 1024 * d  # 632,076,800
    assert ours_shapes["visual_projection.weight"] == (1024, 1280)
    assert ours_shapes["vision_model.embeddings.position_embedding.weight"] == (257, 1280)


# ---- loading ------------------------------------------------------------------------------------

def _official_state(hf, n_positions, dtype=None):
    """The official `image_encoder/model.safetensors`: `vision_model.*`, `visual_projection.weight`
    and (older transformers) the int64 position_ids buffer."""
    state = {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in hf.state_dict().items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(n_positions, dtype=torch.int64)[None]
    return state


def _write(path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=FORMAT)
    return path


def test_official_image_encoder_folder(tmp_path, hf_small):
    folder = tmp_path / "image_encoder"
    folder.mkdir()
    hf_small.config.to_json_file(folder / "config.json")  # a CLIPVisionConfig: fields at the top level
    _write(folder / "model.safetensors", _official_state(hf_small, 26))
    model = load_image_encoder(folder)
    assert isinstance(model, CLIPVisionModelWithProjection) and not model.training
    assert model.config == CLIPVisionConfig.from_hf(SMALL)
    _check(model, hf_small)
    _check(load_image_encoder(tmp_path), hf_small)  # the folder above: image_encoder/model.safetensors
    _check(load_image_encoder(folder / "model.safetensors"), hf_small)  # the file; config.json beside it


def test_float16_file(tmp_path, hf_small):
    """The official file is float16: loaded as float32 it equals transformers on the rounded weights."""
    hf_small.config.to_json_file(tmp_path / "config.json")
    _write(tmp_path / "model.safetensors", _official_state(hf_small, 26, torch.float16))
    rounded = _hf_vision(SMALL, seed=0)
    rounded.load_state_dict({k: v.half().float() for k, v in hf_small.state_dict().items()})
    model = load_image_encoder(tmp_path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _check(model, rounded)
    half = load_image_encoder(tmp_path, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    with torch.no_grad():
        pixels = _pixels(2, 30)
        assert rel_err(half(pixels).float(), rounded(pixel_values=pixels).image_embeds) <= 1e-2


def test_transformers5_save_pretrained(tmp_path, hf_small):
    hf_small.save_pretrained(tmp_path)
    _check(load_image_encoder(tmp_path), hf_small)


def test_single_file_with_cfg(tmp_path, hf_small):
    file = _write(tmp_path / "ip_image_encoder.safetensors", _official_state(hf_small, 26))
    _check(load_image_encoder(file, CLIPVisionConfig.from_hf(SMALL)), hf_small)
    with pytest.raises(CheckpointError, match=r"ip_image_encoder.safetensors: no config.json beside it and no cfg "
                                              r"given; pass cfg, e.g. CLIPVisionConfig.vit_h14\(\)"):
        load_image_encoder(file)


def test_full_clip_model_folder(tmp_path):
    """openai/clip-vit-large-patch14's folder: a CLIPConfig (vision fields under vision_config, the
    shared projection_dim at the top) and both towers' keys; the text side is left unread."""
    text = dict(vocab_size=1000, hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=3,
                max_position_embeddings=29, projection_dim=20)
    vision = {k: v for k, v in SMALL.items() if k != "projection_dim"}
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=20)
    cfg._attn_implementation = "eager"
    hf = randomize_(transformers.CLIPModel(cfg).eval(), seed=22)
    cfg.to_json_file(tmp_path / "config.json")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(29)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange(26)[None]
    _write(tmp_path / "model.safetensors", state)
    assert any(k.startswith("text_model.") for k in state) and "logit_scale" in state

    model = load_image_encoder(tmp_path)
    assert model.config.projection_dim == 20 and model.config.hidden_act == "gelu"
    assert not any(k.startswith("text") or k == "logit_scale" for k in model.state_dict())
    pixels = _pixels(3, 30)
    with torch.no_grad():
        assert rel_err(model(pixels), hf.get_image_features(pixel_values=pixels).pooler_output) <= TOL


# ---- malformed inputs ---------------------------------------------------------------------------

def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope: no such file or folder"):
        load_image_encoder(tmp_path / "nope")
    with pytest.raises(CheckpointError,
                       match=r"folder holds none of model.safetensors, image_encoder/model.safetensors"):
        load_image_encoder(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    with pytest.raises(CheckpointError, match=r"only .safetensors files are read"):
        load_image_encoder(tmp_path / "pytorch_model.bin")


def test_missing_and_unexpected_keys(tmp_path, hf_small):
    cfg = CLIPVisionConfig.from_hf(SMALL)
    state = _official_state(hf_small, 26)
    # A CLIPVisionModel (no projection) saved with the vision_model. prefix.
    no_projection = {k: v for k, v in state.items() if k != "visual_projection.weight"}
    with pytest.raises(CheckpointError, match=r"no_proj.safetensors: detected layout 'hf-clip' does not fit "
                                              r"CLIPVisionModelWithProjection: "
                                              r"1 missing keys: visual_projection.weight"):
        load_image_encoder(_write(tmp_path / "no_proj.safetensors", no_projection), cfg)
    extra = dict(state, **{"vision_model.encoder.layers.2.mlp.fc1.weight": torch.zeros(70, 60)})
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: vision_model.encoder.layers.2.mlp.fc1.weight"):
        load_image_encoder(_write(tmp_path / "extra.safetensors", extra), cfg)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(is the model config the file's\?\): "
                                              r"vision_model.embeddings.class_embedding "
                                              r"\(file \(60,\), model \(1280,\)\)"):
        load_image_encoder(tmp_path / "extra.safetensors", CLIPVisionConfig.vit_h14())


def test_files_that_hold_no_image_encoder(tmp_path):
    # transformers 5 saves a bare CLIPVisionModel without the vision_model. prefix (and no projection).
    bare = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL))
    bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(CheckpointError, match=r"detected layout 'unknown' holds no CLIP image encoder "
                                              r"\(expected 'hf-clip': keys vision_model.\* and "
                                              r"visual_projection.weight"):
        load_image_encoder(tmp_path / "bare")
    text_only = {"text_model.embeddings.token_embedding.weight": torch.zeros(10, 4)}
    with pytest.raises(CheckpointError, match=r"detected layout 'hf-clip-text' holds no CLIP image encoder"):
        load_image_encoder(_write(tmp_path / "text.safetensors", text_only), CLIPVisionConfig.from_hf(SMALL))


@pytest.mark.parametrize("config, message", [
    ("{not json", r"config.json: not valid JSON"),
    ("[1, 2]", r"config.json: expected a transformers CLIPVisionConfig or CLIPConfig, got a JSON list"),
    (json.dumps({"model_type": "clip_text_model", "vocab_size": 1000}),
     r"config.json: model_type 'clip_text_model', expected a transformers CLIPVisionConfig or CLIPConfig"),
    (json.dumps({"model_type": "clip", "vision_config": 3}), r"config.json: 'vision_config' is a int"),
    (json.dumps({**SMALL, "hidden_act": "gelu_new"}), r"config.json: hidden_act 'gelu_new', expected 'gelu' or"),
    (json.dumps({**SMALL, "num_attention_heads": 7}), r"config.json: hidden_size 60 is not divisible by "
                                                      r"num_attention_heads 7"),
    (json.dumps({**SMALL, "patch_size": "6"}), r"config.json: expected positive integers, got patch_size='6'"),
    (json.dumps({**SMALL, "image_size": [30, 40]}),
     r"config.json: expected positive integers, got image_size=\[30, 40\]"),
    (json.dumps({**SMALL, "layer_norm_eps": -1}), r"config.json: layer_norm_eps -1, expected a positive number"),
    (json.dumps({**SMALL, "hidden_size": 80, "num_attention_heads": 4}),  # valid, but not the file's
     r"model.safetensors: detected layout 'hf-clip' does not fit CLIPVisionModelWithProjection: .*shape mismatches"),
])
def test_bad_config_json(tmp_path, hf_small, config, message):
    _write(tmp_path / "model.safetensors", _official_state(hf_small, 26))
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=message):
        load_image_encoder(tmp_path)
    _check(load_image_encoder(tmp_path, CLIPVisionConfig.from_hf(SMALL)), hf_small)  # cfg wins over config.json


def test_square_sizes_as_pairs(tmp_path, hf_small):
    """transformers allows image_size / patch_size as [h, w]; square pairs are read."""
    _write(tmp_path / "model.safetensors", _official_state(hf_small, 26))
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "image_size": [30, 30], "patch_size": [6, 6]}))
    _check(load_image_encoder(tmp_path), hf_small)
