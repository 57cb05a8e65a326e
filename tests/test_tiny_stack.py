"""The shipped tiny stack (tiny-stack/, made by `make base` = pretrain.py): its files are the ones recorded, they
load as SD v1.5 and CLIP files load, and the base draws what its prompts ask for."""
import json

import torch

from training import pretrain
from training.presets import STACK, load_tiny_stack, stack_problems


def record() -> dict:
    return json.loads((STACK / pretrain.STACK_FILE).read_text())


def test_shipped_files_match_their_checksums_and_fit_the_budget():
    assert stack_problems(STACK) == []
    files = pretrain.shipped_files(STACK)
    assert {str(p.relative_to(STACK)) for p in files} == set(record()["sha256"])
    for p in files:
        assert pretrain.sha256(p) == record()["sha256"][str(p.relative_to(STACK))], p
    assert sum(p.stat().st_size for p in files) <= 20 * 2 ** 20


def test_record_says_how_the_stack_was_made():
    r = record()
    assert r["command"].startswith("python pretrain.py") and isinstance(r["seed"], int)
    assert r["clip"]["recipe"]["steps"] > 0 and r["clip"]["minutes"] > 0
    assert r["unet"]["steps_taken"] > 0 and r["unet"]["minutes"] > 0
    assert set(r["unet"]["quality"]["ratio"]) == {"hair", "top", "bottom", "background", "arms"}
    assert r["clip"]["zero_shot"]["background"]["accuracy"] > 0.9   # chance 0.25


def test_stack_loads_as_sd_and_clip():
    from clip import load_clip, load_image_encoder
    sd = load_tiny_stack()
    clip = load_clip(STACK / "clip")
    ids = sd.tokenizer(["1girl, solo, full body, red hair, grey background", ""])
    torch.testing.assert_close(sd.text_encoder(ids), clip.text_model(ids), rtol=0, atol=0)
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(load_image_encoder(STACK / "clip")(pixels), clip.encode_image(pixels), rtol=0, atol=0)


def test_base_draws_the_prompted_background():
    """Eight samples from prompts alone (two per background colour, 10 DDIM steps): the scene
    reader finds the prompted background in nearly all (chance 1 in 4)."""
    from diffusion.sd15 import text_to_image
    from data.synthetic import scene_score
    sd = load_tiny_stack()
    right = 0
    for i, colour in enumerate(["blue", "green", "purple", "grey"] * 2):
        image = text_to_image(sd, f"1girl, solo, full body, arms down, facing right, {colour} background", num=1,
                              steps=10, guidance=4.0, sampler="ddim", seed=i, height=24, width=24)[0]
        right += scene_score.background(image.numpy()) == colour
    assert right >= 7
