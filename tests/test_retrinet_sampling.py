"""Sampling with references: an untrained RetriNet samples exactly what SD samples; sample.py --refs
end to end; reference errors caught before any model is built."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from data.transforms import fit_and_pad
from diffusion.sd15 import text_to_image
from helpers import UNET, randomize_, run_sample
from retrinet import ControlNetUNet, RetriUNet, generate
from unet import UNet, UNetConfig


def _ref_images(tmp_path, n=2):
    paths = []
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 64), (64, 48), (50, 50)][:n]):
        p = tmp_path / f"ref{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_fit_and_pad():
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    x, valid = fit_and_pad(im, 16)
    assert x.shape == (3, 16, 16) and x.min() == -1 and x.max() == 1
    assert torch.equal(valid[0], (x[0] == -1).float())
    assert (x[:, 4:12] == -1).all() and (x[:, :4] == 1).all() and (x[:, 12:] == 1).all()  # centred, white pad


def test_untrained_retrinet_samples_exactly_like_sd(small_sd, tmp_path):
    sd, _ = small_sd
    model = RetriUNet(sd.unet).eval()
    refs = [Image.open(p).convert("RGB") for p in _ref_images(tmp_path)]
    kw = dict(num=2, steps=3, guidance=7.0, sampler="ddim", seed=4, height=64, width=48)
    with_refs = dict(model=model, references=refs, concepts=["face", "clothes"], ref_size=32)
    assert torch.equal(generate(sd, "a fox", **with_refs, **kw)[0], text_to_image(sd, "a fox", **kw))
    randomize_(model.retrinet.zero_convs, seed=5)
    randomize_(model.retrinet.cross_attn, seed=6)
    assert not torch.equal(generate(sd, "a fox", **with_refs, **kw)[0], text_to_image(sd, "a fox", **kw))


@pytest.mark.slow
def test_sample_cli_with_references(weights, retrinet_ckpt, tmp_path):
    folder, _, _ = weights
    refs = _ref_images(tmp_path)
    args = ["--weights", folder, "--retrinet", retrinet_ckpt, "--refs", *refs, "--concepts", "face", "clothes",
            "--ref-size", 32, "--prompt", "a fox", "--steps", 3, "--height", 64, "--width", 48, "--device", "cpu"]
    r1 = run_sample(*args, "--out", tmp_path / "a")
    assert r1.returncode == 0, r1.stderr
    out = tmp_path / "a" / "a_fox-s0-0.png"
    meta = json.loads(Image.open(out).text["parameters"])
    assert meta["retrinet"] == "retrinet.safetensors" and meta["mode"] == "retrinet"
    assert meta["refs"] == ["ref0.png", "ref1.png"] and meta["concepts"] == ["face", "clothes"]
    r2 = run_sample(*args, "--out", tmp_path / "b")
    assert r2.returncode == 0 and (tmp_path / "b" / out.name).read_bytes() == out.read_bytes()
    plain = run_sample("--weights", folder, "--prompt", "a fox", "--steps", 3, "--height", 64, "--width", 48,
                       "--device", "cpu", "--out", tmp_path / "c")
    assert plain.returncode == 0
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "c" / out.name)))


@pytest.mark.slow
def test_reference_errors_before_building_models(weights, retrinet_ckpt, tmp_path):
    folder, _, _ = weights
    refs = _ref_images(tmp_path)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    other = RetriUNet(UNet(UNetConfig(model_channels=32, attention_resolutions=(1,), num_res_blocks=1,
                                      channel_mult=(1, 2), num_heads=2, context_dim=32)))
    other.save(tmp_path / "other.safetensors")
    base = ["--weights", folder, "--prompt", "x", "--out", tmp_path / "o", "--device", "cpu"]
    cases = [
        (["--retrinet", retrinet_ckpt, "--refs", tmp_path / "missing.png"], "reference .*missing.png: cannot read"),
        (["--retrinet", retrinet_ckpt, "--refs", junk], "reference .*junk.png: cannot read it as an image"),
        (["--retrinet", retrinet_ckpt, "--refs", refs[0], "--concepts", "face", "clothes"],
         "--concepts: 2 concepts for 1 references"),
        (["--retrinet", tmp_path / "other.safetensors", "--refs", *refs],
         "made for another base U-Net \\(differs in attention_resolutions"),
        (["--refs", *refs], "--retrinet and --refs go together"),
        (["--retrinet", retrinet_ckpt, "--refs", *refs, "--method", "controlnet"],
         "--method controlnet: .*holds a retrinet checkpoint"),
        (["--retrinet", retrinet_ckpt, "--refs", *refs, "--mode", "controlnet"],  # the old name still works
         "--mode is renamed --method.*\n.*--method controlnet: .*holds a retrinet checkpoint"),
    ]
    import re
    for extra, message in cases:
        r = run_sample(*base, *extra)
        assert r.returncode == 2, (extra, r.stderr)
        assert re.search(message, r.stderr), (extra, r.stderr)
        assert "loaded" not in r.stderr  # no model was built


@pytest.mark.slow
def test_sample_cli_controlnet_baseline(weights, small_sd, tmp_path):
    """An official-layout ControlNet file (control_model.*, no metadata) as the baseline."""
    from safetensors.torch import save_file
    sd, _ = small_sd
    model = ControlNetUNet(UNet(UNET))
    randomize_(model.control, seed=9)
    save_file({"control_model." + k: v.contiguous() for k, v in model.control.state_dict().items()},
              tmp_path / "control_sd15_small.safetensors")
    folder, _, _ = weights
    refs = _ref_images(tmp_path)
    base = ["--weights", folder, "--retrinet", tmp_path / "control_sd15_small.safetensors", "--prompt", "a fox",
            "--steps", 2, "--height", 64, "--width", 48, "--device", "cpu", "--out", tmp_path / "o"]
    r = run_sample(*base, "--refs", refs[0])
    assert r.returncode == 0, r.stderr
    assert json.loads(Image.open(tmp_path / "o" / "a_fox-s0-0.png").text["parameters"])["mode"] == "controlnet"
    r = run_sample(*base, "--refs", *refs)
    assert r.returncode == 2 and "the ControlNet baseline takes one reference image, got 2" in r.stderr


def test_reference_guidance(small_sd, tmp_path):
    """ref_guidance 1 reduces to the ordinary guidance (text dropped, references kept); other
    values change the images."""
    sd, _ = small_sd
    model = RetriUNet(sd.unet, null_reference=True).eval()
    randomize_(model.retrinet.zero_convs, seed=10)
    randomize_(model.retrinet.cross_attn, seed=11)
    refs = [Image.open(p).convert("RGB") for p in _ref_images(tmp_path)]
    kw = dict(num=2, steps=3, guidance=5.0, sampler="ddim", seed=4, height=64, width=48, model=model, references=refs,
              concepts=["face", "clothes"], ref_size=32)
    two_way = generate(sd, "a fox", **kw)[0].int()
    assert (generate(sd, "a fox", ref_guidance=1.0, **kw)[0].int() - two_way).abs().max() <= 1
    assert (generate(sd, "a fox", ref_guidance=3.0, **kw)[0].int() - two_way).abs().max() > 1


def test_ref_guidance_needs_a_null_reference(weights, retrinet_ckpt, tmp_path):
    folder, _, _ = weights
    r = run_sample("--weights", folder, "--prompt", "x", "--out", tmp_path, "--device", "cpu", "--retrinet",
                   retrinet_ckpt, "--refs", *_ref_images(tmp_path), "--ref-guidance", "3")
    assert r.returncode == 2 and "has no null reference (it was not trained with reference dropout)" in r.stderr


def test_generate_records_its_parameters_and_refuses_what_makes_no_sense(small_sd, tmp_path):
    """`generate` returns one parameter record per image (the PNG's), expands one concept to every
    reference, and refuses references without a model, a model without references and reference
    guidance without a null reference; `png_parameters` keeps sample.py's key order."""
    from retrinet import png_parameters
    sd, _ = small_sd
    model = RetriUNet(sd.unet, null_reference=True).eval()
    refs = [Image.open(p).convert("RGB") for p in _ref_images(tmp_path, 3)]
    kw = dict(num=3, steps=2, guidance=4.0, sampler="euler", seed=9, height=32, width=40)
    images, params = generate(sd, "a fox", model=model, references=refs, concepts=["face"], ref_guidance=2.0,
                              ref_size=24, negative_prompt="blurry", **kw)
    assert images.shape == (3, 32, 40, 3) and images.dtype == torch.uint8
    assert params == [dict(prompt="a fox", negative_prompt="blurry", steps=2, guidance=4.0, sampler="euler", seed=9,
                           index=i, num=3, height=32, width=40, mode="retrinet", concepts=["face"] * 3, ref_size=24,
                           ref_guidance=2.0) for i in range(3)]
    record = png_parameters(params[1], weights="/w/sd.safetensors", precision="fp32", device="cpu",
                            checkpoint="/c/r.safetensors", reference_files=["/r/a.png", "/r/b.png", "/r/c.png"])
    assert list(record) == ["prompt", "negative_prompt", "steps", "guidance", "sampler", "seed", "index", "num",
                            "height", "width", "weights", "precision", "device", "retrinet", "mode", "refs",
                            "concepts", "ref_size", "ref_guidance"]
    assert (record["weights"], record["retrinet"], record["refs"]) == ("sd.safetensors", "r.safetensors",
                                                                       ["a.png", "b.png", "c.png"])
    plain_images, plain = generate(sd, "a fox", **kw)
    assert "mode" not in plain[0] and torch.equal(plain_images, text_to_image(sd, "a fox", **kw))
    assert list(png_parameters(plain[0], weights="w", precision="fp32", device="cpu"))[-1] == "device"
    for bad, message in [(dict(references=refs), "references and ref_guidance need a conditioning model"),
                         (dict(model=model), "needs at least one reference image"),
                         (dict(model=model, references=refs, concepts=["face", "clothes"]),
                          "one concept for all 3 references or one per reference, got 2"),
                         (dict(model=model, references=refs, concepts=["hat"]), "unknown concepts \\['hat'\\]"),
                         (dict(model=RetriUNet(sd.unet), references=refs, ref_guidance=2.0),
                          "ref_guidance needs a RetriNet with a null reference")]:
        with pytest.raises(ValueError, match=message):
            generate(sd, "a fox", **bad, **kw)
