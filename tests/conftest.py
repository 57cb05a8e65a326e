"""The fixtures several test modules share; plain helpers and constants are in helpers.py. Each has
module scope: a module that asks for one builds it once."""
import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from clip.tokenizer import write_vocab_files
from data.synthetic import generate
from diffusion.sd15 import StableDiffusion
from helpers import TEXT, UNET, VAE, randomize_, small_sd_pipeline
from retrinet import RetriUNet
from unet import UNet
from vae import AutoencoderKL


# ---- train.py: a small synthetic dataset and small random SD weights for --preset sd15

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data") / "syn"
    generate(root, identities=8, images_per_identity=3, size=32, seed=0, noise_fraction=0.0)
    return root  # 24 samples: 6 steps of 4 per epoch


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-weights")
    state = {}
    for prefix, module, seed in [("model.diffusion_model.", UNet(UNET), 1), ("first_stage_model.", AutoencoderKL(VAE), 2),
                                 ("cond_stage_model.transformer.", CLIPTextModel(CLIPTextConfig.from_hf(TEXT)), 3)]:
        randomize_(module, seed=seed)
        state.update({prefix + k: v.contiguous() for k, v in module.state_dict().items()})
    save_file(state, root / "small.safetensors")
    (root / "small.json").write_text(json.dumps({"unet": UNET.__dict__, "vae": VAE.__dict__, "text_encoder": TEXT}))
    return root / "small.safetensors", root / "small.json"


# ---- the small SD in memory and on disk (sample.py, bench.verify, eval's protocol runner)

@pytest.fixture(scope="module")
def small_sd():
    torch.manual_seed(0)
    unet = randomize_(UNet(UNET).eval(), seed=31)
    vae = randomize_(AutoencoderKL(VAE).eval(), seed=32)
    hf_text = randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)).eval(), seed=33)
    text = CLIPTextModel(CLIPTextConfig.from_hf(TEXT)).eval()
    text.load_state_dict({"text_model." + k: v for k, v in hf_text.state_dict().items()})
    # Random weights give wild latents; tame the VAE decoder's output so images are not all clipped.
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.05)
    return StableDiffusion(unet, vae, text, CLIPTokenizer.default()), hf_text


@pytest.fixture(scope="module")
def weights(small_sd, tmp_path_factory):
    """The small model written as a diffusers folder (configs included) and as a single file."""
    sd, hf_text = small_sd
    root = tmp_path_factory.mktemp("weights")
    folder = root / "sd-small"
    pipe = small_sd_pipeline(sd, hf_text, "pndm", root)
    pipe.unet.save_pretrained(folder / "unet")
    pipe.vae.save_pretrained(folder / "vae")
    (folder / "text_encoder").mkdir()
    hf_text.config.to_json_file(folder / "text_encoder" / "config.json")
    save_file({"text_model." + k: v.contiguous() for k, v in hf_text.state_dict().items()},
              folder / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    write_vocab_files(folder / "tokenizer")

    single = {}
    for prefix, module in [("model.diffusion_model.", sd.unet), ("first_stage_model.", sd.vae),
                           ("cond_stage_model.transformer.", sd.text_encoder)]:
        single.update({prefix + k: v.contiguous() for k, v in module.state_dict().items()})
    single["model_ema.decay"] = torch.tensor(0.9999)
    save_file(single, root / "small.safetensors", metadata={"format": "pt"})
    config = root / "small.json"
    config.write_text(json.dumps({"unet": {**UNET.__dict__}, "vae": {**VAE.__dict__}, "text_encoder": TEXT}))
    return folder, root / "small.safetensors", config


@pytest.fixture(scope="module")
def retrinet_ckpt(small_sd, tmp_path_factory):
    """A RetriNet over the small SD's U-Net, its own layers random, saved as sample.py loads it."""
    sd, _ = small_sd
    model = RetriUNet(UNet(UNET).eval(), lock="decoder")
    model.unet.load_state_dict(sd.unet.state_dict())
    randomize_(model.retrinet.zero_convs, seed=7)
    randomize_(model.retrinet.cross_attn, seed=8)
    path = tmp_path_factory.mktemp("retri") / "retrinet.safetensors"
    model.save(path)
    return path
