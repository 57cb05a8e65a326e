"""Loading CLIP weights from synthesized files in each official layout, and clear errors otherwise."""
import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from clip import CLIPTextConfig, CLIPTokenizer, detect_layout, load_clip, load_text_encoder
from common.weights import CheckpointError
from helpers import randomize_, rel_err

TEXT = dict(vocab_size=1000, hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=3,
            max_position_embeddings=29, projection_dim=20, bos_token_id=998, eos_token_id=999)
VISION = dict(hidden_size=60, intermediate_size=70, num_hidden_layers=2, num_attention_heads=5, image_size=30,
              patch_size=6, projection_dim=20)
FORMAT = {"format": "pt"}


def _ids(lengths=(4, 15, 27)):
    ids = torch.full((len(lengths), 29), 999)
    ids[:, 0] = 998
    for row, n in enumerate(lengths):
        ids[row, 1:n + 1] = torch.randint(0, 998, (n,), generator=torch.Generator().manual_seed(row))
    return ids


def _position_ids(n):
    return torch.arange(n, dtype=torch.int64)[None]


@pytest.fixture(scope="module")
def hf_clip():
    cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=20)
    return randomize_(transformers.CLIPModel(cfg).eval(), seed=11)


@pytest.fixture(scope="module")
def hf_text():
    return randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)).eval(), seed=12)


def _text_state(hf_text):
    """The official text-encoder layout: `text_model.*` plus the int64 position_ids buffer."""
    state = {"text_model." + k: v.contiguous() for k, v in hf_text.state_dict().items()}
    state["text_model.embeddings.position_ids"] = _position_ids(29)
    return state


def _check_text(model, hf_text):
    ids = _ids()
    with torch.no_grad():
        assert rel_err(model(ids), hf_text(input_ids=ids).last_hidden_state) <= 1e-4


def test_openai_clip_layout(tmp_path, hf_clip):
    """openai/clip-vit-large-patch14 `model.safetensors` (both towers + position_ids) and config.json."""
    hf_clip.config.to_json_file(tmp_path / "config.json")
    state = {k: v.contiguous() for k, v in hf_clip.state_dict().items()}
    state["text_model.embeddings.position_ids"] = _position_ids(29)
    state["vision_model.embeddings.position_ids"] = _position_ids(26)
    save_file(state, tmp_path / "model.safetensors", metadata=FORMAT)
    assert detect_layout(state) == "hf-clip"

    model = load_clip(tmp_path)  # the folder; configs read from config.json
    ids, pixels = _ids(), torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        assert rel_err(model.encode_text(ids), hf_clip.get_text_features(input_ids=ids).pooler_output) <= 1e-4
        assert rel_err(model.encode_image(pixels), hf_clip.get_image_features(pixel_values=pixels).pooler_output) <= 1e-4
        text = load_text_encoder(tmp_path / "model.safetensors")  # the text tower of the same file
        assert rel_err(text(ids), hf_clip.text_model(input_ids=ids).last_hidden_state) <= 1e-4


def test_diffusers_folder_layout(tmp_path, hf_text):
    """SD's diffusers folder: text_encoder/{config.json, model.safetensors}."""
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    hf_text.config.to_json_file(folder / "config.json")
    save_file(_text_state(hf_text), folder / "model.safetensors", metadata=FORMAT)
    _check_text(load_text_encoder(tmp_path), hf_text)  # the pipeline's root folder


def test_transformers5_unprefixed_save(tmp_path, hf_text):
    """transformers >= 5 `save_pretrained` drops the `text_model.` prefix; such files load too."""
    hf_text.save_pretrained(tmp_path)
    _check_text(load_text_encoder(tmp_path), hf_text)


def _sd_extras():
    """Everything of the SD v1.5 single file that is not the text encoder (tiny stand-in tensors):
    UNet and VAE keys, the 12 DDPM schedule buffers and the 2 EMA scalars."""
    extras = {f"model.diffusion_model.{k}": torch.zeros(2) for k in
              ["input_blocks.0.0.weight", "output_blocks.11.0.skip_connection.weight", "out.2.bias"]}
    extras.update({f"first_stage_model.{k}": torch.zeros(2) for k in
                   ["encoder.conv_in.weight", "decoder.up.3.block.0.conv1.weight", "quant_conv.bias"]})
    for name in ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                 "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                 "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"]:
        extras[name] = torch.rand(1000)
    extras["model_ema.decay"] = torch.tensor(0.9999)
    extras["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return extras


def test_sd_single_file_full_size(tmp_path):
    """SD v1.5's single file with the full ViT-L/14 text encoder under cond_stage_model.transformer.;
    no config given, so the default (ViT-L/14) must fit the file exactly."""
    cfg = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                      num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu")
    hf = randomize_(transformers.CLIPTextModel(cfg).eval(), seed=13)
    state = {"cond_stage_model.transformer.text_model." + k: v.contiguous() for k, v in hf.state_dict().items()}
    # Corrupt position_ids (float, non-integer), as some merged models have: must be ignored.
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.rand(1, 77) * 76
    state.update(_sd_extras())
    file = tmp_path / "v1-5-pruned-emaonly.safetensors"
    save_file(state, file, metadata=FORMAT)
    del state
    model = load_text_encoder(file)
    ids = CLIPTokenizer.default()(["a photograph of an astronaut riding a horse", "masterpiece, 1girl, smile"])
    with torch.no_grad():
        assert rel_err(model(ids), hf(input_ids=ids).last_hidden_state) <= 1e-4


def test_half_precision_load(tmp_path, hf_text):
    file = tmp_path / "model.safetensors"
    save_file(_text_state(hf_text), file, metadata=FORMAT)
    model = load_text_encoder(file, CLIPTextConfig.from_hf(TEXT), dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    ids = _ids()
    with torch.no_grad():
        assert rel_err(model(ids).float(), hf_text(input_ids=ids).last_hidden_state) <= 1e-2


# ---- malformed inputs -------------------------------------------------------------------------

def _write(path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=FORMAT)
    return path


def test_missing_and_non_safetensors_files(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: no such file"):
        load_text_encoder(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="folder holds none of text_encoder/model.safetensors"):
        load_text_encoder(tmp_path)
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02pickle")
    with pytest.raises(CheckpointError, match="only .safetensors files are read"):
        load_text_encoder(tmp_path / "model.ckpt")
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointError, match="junk.safetensors: not a safetensors file"):
        load_text_encoder(tmp_path / "junk.safetensors")


def test_truncated_file(tmp_path, hf_text):
    file = _write(tmp_path / "model.safetensors", _text_state(hf_text))
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        load_text_encoder(file, CLIPTextConfig.from_hf(TEXT))


def test_wrong_or_partial_keys(tmp_path, hf_text):
    cfg = CLIPTextConfig.from_hf(TEXT)
    state = _text_state(hf_text)
    partial = {k: v for k, v in state.items() if k != "text_model.final_layer_norm.weight"}
    file = _write(tmp_path / "partial.safetensors", partial)
    with pytest.raises(CheckpointError, match=r"partial.safetensors: detected layout 'hf-clip-text'.*"
                                              r"1 missing keys: text_model.final_layer_norm.weight"):
        load_text_encoder(file, cfg)
    extra = dict(state, **{"text_model.encoder.layers.2.mlp.fc1.weight": torch.zeros(100, 48)})
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: text_model.encoder.layers.2.mlp.fc1.weight"):
        load_text_encoder(_write(tmp_path / "extra.safetensors", extra), cfg)
    # The right keys at the wrong size: a ViT-L/14 config against the small file.
    with pytest.raises(CheckpointError, match=r"shape mismatches \(is the model config the file's\?\): "
                                              r"text_model.embeddings.token_embedding.weight "
                                              r"\(file \(1000, 48\), model \(49408, 768\)\)"):
        load_text_encoder(_write(tmp_path / "small.safetensors", state))


def test_unet_passed_as_clip(tmp_path):
    diffusers_unet = {"conv_in.weight": torch.zeros(4, 4, 3, 3), "time_embedding.linear_1.weight": torch.zeros(8, 4),
                      "down_blocks.0.attentions.0.proj_in.weight": torch.zeros(4, 4, 1, 1)}
    file = _write(tmp_path / "diffusion_pytorch_model.safetensors", diffusers_unet)
    with pytest.raises(CheckpointError, match=r"detected layout 'diffusers-unet' holds no CLIP text encoder"):
        load_text_encoder(file)
    sd_unet_only = {f"model.diffusion_model.{k}": torch.zeros(2) for k in ["input_blocks.0.0.weight", "out.2.bias"]}
    with pytest.raises(CheckpointError, match=r"detected layout 'sd-single-file' holds no CLIP text encoder"):
        load_text_encoder(_write(tmp_path / "unet_only.safetensors", sd_unet_only))
    with pytest.raises(CheckpointError, match=r"detected layout 'diffusers-unet', expected a full CLIP model"):
        load_clip(file)


def test_text_only_file_is_not_a_clip_model(tmp_path, hf_text):
    file = _write(tmp_path / "model.safetensors", _text_state(hf_text))
    with pytest.raises(CheckpointError, match=r"detected layout 'hf-clip-text', expected a full CLIP model"):
        load_clip(file)


def test_bad_config_json(tmp_path, hf_text):
    _write(tmp_path / "model.safetensors", _text_state(hf_text))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_text_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_text.config.to_dict()))
    _check_text(load_text_encoder(tmp_path), hf_text)
