"""The tiny stack's pre-training (training/pretrain.py, pretrain.py): its data, its CLIP loss, its
files and its command, on budgets of seconds."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training import pretrain
from training.pretrain import (GROUPS, Drawn, contrastive_loss, draw_groups, draw_scenes, fitting_pairs, group_tags,
                               group_codes, is_held_out, prompt_of)

ROOT = Path(__file__).resolve().parents[1]


def test_contrastive_loss_is_clips_with_one_positive_per_row():
    """Oracle: CLIP's loss, the mean of the two cross-entropies with the diagonal as labels."""
    torch.manual_seed(0)
    logits = torch.randn(7, 7) * 3
    expected = (F.cross_entropy(logits, torch.arange(7)) + F.cross_entropy(logits.T, torch.arange(7))) / 2
    torch.testing.assert_close(contrastive_loss(logits, torch.eye(7, dtype=torch.bool)), expected)


def test_contrastive_loss_spreads_the_target_over_fitting_pairs():
    """Two images that an empty prompt fits equally: the text's target is half on each."""
    logits = torch.tensor([[2.0, 0.5], [0.3, 1.0]])
    positive = torch.tensor([[True, True], [False, True]])   # text 1 (empty) fits both images
    per_image = -(F.log_softmax(logits, 1)[0].mean() + F.log_softmax(logits, 1)[1, 1]) / 2
    per_text = -(F.log_softmax(logits, 0)[0, 0] + F.log_softmax(logits, 0)[:, 1].mean()) / 2
    torch.testing.assert_close(contrastive_loss(logits, positive), (per_image + per_text) / 2)


def test_scenes_are_deterministic_and_never_held_out_in_training():
    a, shown = draw_scenes(24, seed=3)
    b, again = draw_scenes(24, seed=3)
    assert torch.equal(a, b) and shown == again and a.shape == (24, 3, 48, 48)
    assert not any(is_held_out(d.hair, d.top, d.bottom) for d in shown)
    _, held = draw_scenes(12, seed=3, held_out=True)
    assert all(is_held_out(d.hair, d.top, d.bottom) for d in held)
    assert all(d.top != d.bottom for d in shown + held)


def test_held_out_share_is_about_a_tenth():
    from data.synthetic import CLOTH_COLORS, HAIR_COLORS
    triples = [(h, t, b) for h in HAIR_COLORS for t in CLOTH_COLORS for b in CLOTH_COLORS if t != b]
    share = np.mean([is_held_out(*x) for x in triples])
    assert 0.07 < share < 0.13


def test_prompts_name_what_the_image_shows():
    d = Drawn("blue", "twintails", "red", "white", "black", "skirt", "green", "arms_up", "facing_left")
    assert prompt_of(d) == ("1girl, solo, full body, twintails, blue hair, red eyes, white shirt, black skirt, "
                            "arms up, facing left, green background")
    assert prompt_of(d, ("background", "top")) == "1girl, solo, full body, white shirt, green background"
    assert prompt_of(d, ()) == ""
    rng = np.random.default_rng(0)
    draws = [draw_groups(rng, empty=0.1, partial=0.3) for _ in range(4000)]
    assert abs(np.mean([g == () for g in draws]) - 0.1) < 0.02
    assert abs(np.mean([g == GROUPS for g in draws]) - (0.6 + 0.3 / 2 ** len(GROUPS))) < 0.03


def fits(d: Drawn, groups: tuple[str, ...], other: Drawn) -> bool:
    """The definition fitting_pairs vectorises: the prompt naming `groups` of scene `d` describes `other`."""
    return all(group_tags(d, g) == group_tags(other, g) for g in groups)


def test_fitting_pairs_equals_fits():
    _, shown = draw_scenes(40, seed=1)
    rng = np.random.default_rng(1)
    groups = [draw_groups(rng, empty=0.2, partial=0.6) for _ in shown]
    named = torch.tensor([[g in gs for g in GROUPS] for gs in groups])
    expected = torch.tensor([[fits(shown[j], groups[j], shown[i]) for j in range(40)] for i in range(40)])
    got = fitting_pairs(group_codes(shown), named)
    assert torch.equal(got, expected) and got.diagonal().all()
    assert got.sum() > 40  # empty and partial prompts fit other images too


def test_saved_clip_loads_as_clip_and_as_image_encoder(tmp_path):
    from clip import CLIPModel, load_clip, load_image_encoder
    from safetensors import safe_open
    torch.manual_seed(0)
    clip = CLIPModel(*pretrain.tiny_clip_configs())
    with torch.no_grad():
        for p in clip.parameters():
            p.normal_(0, 0.2)
    pretrain.round_half_keys(clip)
    file = pretrain.save_clip(clip, tmp_path / "clip")
    with safe_open(str(file), "pt") as f:
        assert f.get_tensor("text_model.embeddings.token_embedding.weight").dtype == torch.float16
        assert f.get_tensor("visual_projection.weight").dtype == torch.float32
    loaded = load_clip(file)
    ids = torch.randint(0, 49408, (3, 77))
    pixels = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded(ids, pixels), clip(ids, pixels), rtol=0, atol=0)
    encoder = load_image_encoder(tmp_path / "clip")
    torch.testing.assert_close(encoder(pixels), clip.encode_image(pixels), rtol=0, atol=0)


@pytest.mark.slow
def test_command_writes_the_stack(tmp_path):
    """The whole command on a budget of seconds: both stages, the files that ship, their checksums,
    the record; a second run reuses the CLIP and keeps its record."""
    out = tmp_path / "stack"
    args = [sys.executable, "pretrain.py", "--out", str(out), "--clip-steps", "2", "--unet-steps", "2",
            "--clip-pool", "256", "--unet-pool", "64", "--score-samples", "2", "--zero-shot-samples", "8"]
    run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    record = json.loads((out / "stack.json").read_text())
    assert record["unet"]["steps_taken"] == 2 and record["clip"]["recipe"]["steps"] == 2
    assert set(record["clip"]["zero_shot"]) >= {"hair", "background", "prompt_to_image", "image_to_prompt"}
    assert set(record["unet"]["quality"]["ratio"]) == {"hair", "top", "bottom", "background", "arms"}
    for rel, digest in record["sha256"].items():
        assert pretrain.sha256(out / rel) == digest
    from diffusion.sd15 import load_configs, load_sd15
    sd = load_sd15(out / "base.safetensors", configs=load_configs(out / "base-config.json"))
    from clip import load_clip
    clip = load_clip(out / "clip")
    ids = sd.tokenizer(["1girl, blue background"])
    torch.testing.assert_close(sd.text_encoder(ids), clip.text_model(ids), rtol=0, atol=0)
    again = subprocess.run(args[:4] + ["--clip-steps", "5", "--unet-steps", "1", "--unet-pool", "64",
                                       "--score-samples", "1", "--zero-shot-samples", "4"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "reusing" in again.stderr, again.stderr
    assert json.loads((out / "stack.json").read_text())["clip"]["recipe"]["steps"] == 2
    rescored = subprocess.run(args[:4] + ["--score-only", "--guidance", "2", "--score-samples", "1"], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
    assert rescored.returncode == 0, rescored.stderr
    record = json.loads((out / "stack.json").read_text())
    assert record["unet"]["quality"]["guidance"] == 2 and "--score-only" in record["scored_by"]
    assert record["unet"]["steps_taken"] == 1   # nothing trained


@pytest.mark.parametrize("flag, value", [("--clip-steps", "0"), ("--unet-pool", "3"), ("--guidance", "nan"),
                                         ("--unet-minutes", "-1"), ("--score-samples", "0"), ("--unet-lr", "inf"),
                                         ("--clip-lr", "0"), ("--score-only", None)])
def test_bad_arguments_are_one_line(tmp_path, flag, value):
    run = subprocess.run([sys.executable, "pretrain.py", "--out", str(tmp_path / "s"), flag]
                         + ([value] if value else []),
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and flag in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "s").exists()


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    run = subprocess.run([sys.executable, "pretrain.py", "--out", str(tmp_path / "f")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "not a folder" in run.stderr
