"""Loading the U-Net from synthesized files in SD's single-file and diffusers layouts."""
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
from safetensors.torch import save_file

from bench.oracles import diffusers_unet, unet_yaml
from common.weights import CheckpointError
from helpers import SMALL_UNET, randomize_, rel_err
from unet import UNet, UNetConfig, config_from_diffusers, diffusers_to_ldm, load_unet
from unet.loading import SD_UNET_PREFIX

FORMAT = {"format": "pt"}


@pytest.fixture(scope="module")
def small():
    return randomize_(UNet(SMALL_UNET).eval(), seed=21)


def _inputs():
    g = torch.Generator().manual_seed(22)
    return torch.randn(2, 4, 24, 40, generator=g), torch.tensor([5, 905]), torch.randn(2, 6, 48, generator=g)


def _same(model, ref):
    x, t, ctx = _inputs()
    with torch.no_grad():
        assert rel_err(model(x, t, ctx), ref(x, t, ctx)) <= 1e-6


def _save(path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=FORMAT)
    return path


def test_mapping_inverts_diffusers_converter(small):
    """diffusers_to_ldm undoes diffusers' convert_ldm_unet_checkpoint exactly, tensor for tensor."""
    ckpt = {SD_UNET_PREFIX + k: v for k, v in small.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(ckpt, create_unet_diffusers_config_from_ldm(unet_yaml(SMALL_UNET), ckpt))
    back = diffusers_to_ldm(converted, SMALL_UNET)
    own = small.state_dict()
    assert back.keys() == own.keys()
    assert all(torch.equal(back[k], own[k]) for k in own)


def test_sd_single_file(tmp_path, small):
    state = {SD_UNET_PREFIX + k: v for k, v in small.state_dict().items()}
    # What else the official file holds: VAE, text encoder, schedule buffers, EMA scalars, and (in the
    # non-emaonly file) flattened EMA copies of the U-Net weights, which must all be ignored.
    state.update({"first_stage_model.encoder.conv_in.weight": torch.zeros(3),
                  "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(3),
                  "betas": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999),
                  "model_ema.num_updates": torch.tensor(7, dtype=torch.int32),
                  "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(32, 4, 3, 3)})
    file = _save(tmp_path / "v1-5-pruned.safetensors", state)
    _same(load_unet(file, SMALL_UNET), small)


def test_diffusers_folder_with_its_config(tmp_path, small):
    """`save_pretrained` writes the real diffusers layout: unet/config.json + the safetensors file.
    The config is read from config.json."""
    diffusers_unet(small, SMALL_UNET).save_pretrained(tmp_path / "unet")
    assert config_from_diffusers_roundtrip(tmp_path / "unet" / "config.json") == SMALL_UNET
    _same(load_unet(tmp_path), small)  # the pipeline folder
    _same(load_unet(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"), small)


def config_from_diffusers_roundtrip(path):
    import json
    return config_from_diffusers(json.loads(path.read_text()))


def test_sd15_config_from_diffusers_config():
    # The values of SD v1.5's unet/config.json (shared/reference/sd15_formats.md, section 2.2).
    d = {"act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
         "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
         "in_channels": 4, "layers_per_block": 2, "out_channels": 4, "use_linear_projection": False,
         "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    assert config_from_diffusers(d) == UNetConfig.sd15()
    assert config_from_diffusers({**d, "norm_num_groups": 16}).norm_groups == 16


def test_half_precision(tmp_path, small):
    file = _save(tmp_path / "unet.safetensors", {SD_UNET_PREFIX + k: v for k, v in small.state_dict().items()})
    model = load_unet(file, SMALL_UNET, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    x, t, ctx = _inputs()
    with torch.no_grad():
        assert rel_err(model(x.bfloat16(), t, ctx.bfloat16()).float(), small(x, t, ctx)) <= 5e-2


def test_malformed_files(tmp_path, small):
    state = {SD_UNET_PREFIX + k: v for k, v in small.state_dict().items()}
    with pytest.raises(CheckpointError, match="no such file"):
        load_unet(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="folder holds none of unet/diffusion_pytorch_model.safetensors"):
        load_unet(tmp_path)
    partial = _save(tmp_path / "partial.safetensors",
                    {k: v for k, v in state.items() if not k.endswith("middle_block.1.proj_out.bias")})
    with pytest.raises(CheckpointError, match=r"partial.safetensors: detected layout 'sd-single-file'.*"
                                              r"1 missing keys: middle_block.1.proj_out.bias"):
        load_unet(partial, SMALL_UNET)
    full = _save(tmp_path / "small.safetensors", state)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(is the model config the file's\?\): "
                                              r"time_embed.0.weight \(file \(128, 32\), model \(1280, 320\)\)"):
        load_unet(full)  # no config: SD v1.5's does not fit the small file
    data = full.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match="cut.safetensors: truncated"):
        load_unet(tmp_path / "cut.safetensors", SMALL_UNET)
    text = _save(tmp_path / "model.safetensors", {"text_model.embeddings.token_embedding.weight": torch.zeros(4, 2)})
    with pytest.raises(CheckpointError, match=r"detected layout 'hf-clip-text' holds no U-Net"):
        load_unet(text)
    text_only = _save(tmp_path / "te.safetensors", {"cond_stage_model.transformer.text_model.x": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"'sd-single-file' holds no U-Net"):
        load_unet(text_only)
