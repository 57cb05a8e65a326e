"""Text-to-image end to end: our pipeline equals diffusers' StableDiffusionPipeline on the same small
random model, and sample.py works as a command (files, metadata, determinism, errors)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.sd15 import text_to_image
from helpers import run_sample, small_sd_pipeline


@pytest.mark.parametrize("sampler", ["pndm", "ddim", "euler", "euler_a", "dpmpp_2m"])
def test_equals_diffusers_pipeline(small_sd, sampler, tmp_path):
    sd, hf_text = small_sd
    assert sd.clip_sample is None  # latents: no x_0 clamp, as diffusers' SD config
    pipe = small_sd_pipeline(sd, hf_text, sampler, tmp_path)
    kw = dict(height=64, width=48)
    ours = text_to_image(sd, "a red fox in the snow", "blurry", num=2, steps=6, guidance=7.0, sampler=sampler,
                         seed=3, **kw)
    ref = pipe("a red fox in the snow", negative_prompt="blurry", num_images_per_prompt=2, num_inference_steps=6,
               guidance_scale=7.0, generator=torch.Generator().manual_seed(3), output_type="np", **kw).images
    ref = np.round(ref * 255).astype(np.int16)
    assert ours.shape == (2, 64, 48, 3)
    assert ref.std() > 5  # the images are not flat
    assert np.abs(ours.numpy().astype(np.int16) - ref).max() <= 1


# ---- sample.py as a command -----------------------------------------------------------------------

@pytest.mark.slow
def test_sample_cli_writes_deterministic_pngs_with_metadata(weights, tmp_path):
    folder, single, config = weights
    common = ["--prompt", "a red fox in the snow", "--steps", 4, "--height", 64, "--width", 48, "--num", 2,
              "--device", "cpu"]
    r1 = run_sample("--weights", folder, *common, "--seed", 5, "--out", tmp_path / "a")
    assert r1.returncode == 0, r1.stderr
    assert "step 5/5" in r1.stderr  # PNDM evaluates its second timestep twice: steps + 1 model calls
    files = sorted((tmp_path / "a").glob("*.png"))
    assert [f.name for f in files] == ["a_red_fox_in_the_snow-s5-0.png", "a_red_fox_in_the_snow-s5-1.png"]
    meta = json.loads(Image.open(files[1]).text["parameters"])
    assert meta == dict(prompt="a red fox in the snow", negative_prompt="", steps=4, guidance=7.0, sampler="pndm",
                        seed=5, index=1, num=2, height=64, width=48, weights="sd-small", precision="fp32",
                        device="cpu")
    assert Image.open(files[0]).size == (48, 64)

    # Same arguments, single-file weights with an explicit config: byte-identical files.
    r2 = run_sample("--weights", single, "--config", config, *common, "--seed", 5, "--out", tmp_path / "b")
    assert r2.returncode == 0, r2.stderr
    for f in files:
        a = np.asarray(Image.open(f))
        b = np.asarray(Image.open(tmp_path / "b" / f.name))
        assert np.array_equal(a, b)
    r3 = run_sample("--weights", folder, *common, "--seed", 5, "--out", tmp_path / "c")
    assert all((tmp_path / "c" / f.name).read_bytes() == f.read_bytes() for f in files)
    r4 = run_sample("--weights", folder, *common, "--seed", 6, "--out", tmp_path / "d")
    assert r3.returncode == r4.returncode == 0
    other = np.asarray(Image.open(tmp_path / "d" / "a_red_fox_in_the_snow-s6-0.png"))
    assert not np.array_equal(other, np.asarray(Image.open(files[0])))


def test_sample_cli_long_prompt_warns(weights, tmp_path):
    folder, _, _ = weights
    r = run_sample("--weights", folder, "--prompt", "word " * 90, "--steps", 1, "--height", 16, "--width", 16,
                   "--out", tmp_path, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "15 tokens dropped" in r.stderr


@pytest.mark.slow
def test_sample_cli_rejects_bad_input_before_building_models(tmp_path):
    # The weights file is junk: had a model been built first, the error would be about the file.
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        (["--weights", tmp_path / "missing.safetensors"], "--weights .*missing.safetensors: no such file"),
        (["--weights", junk, "--sampler", "heun"], "--sampler 'heun' is unknown; choose one of pndm"),
        (["--weights", junk, "--height", 100], "--height 100 must be a positive multiple of 8"),
        (["--weights", junk, "--out", blocker / "sub"], "--out .*a_file/sub: cannot write there"),
        (["--weights", junk, "--precision", "fp16", "--device", "cpu"], "fp16 is not supported on the CPU"),
    ]
    import re
    for extra, message in cases:
        r = run_sample("--prompt", "x", "--out", tmp_path / "o", *extra)
        assert r.returncode == 2, (extra, r.stderr)
        assert re.search(message, r.stderr), (extra, r.stderr)
    r = run_sample("--prompt", "x", "--weights", junk, "--out", tmp_path / "o", "--device", "cpu")
    assert r.returncode == 1 and "junk.safetensors: not a safetensors file" in r.stderr
