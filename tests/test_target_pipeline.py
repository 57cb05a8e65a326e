"""The target's pipeline: the same in settings a and b (they differ only in the references), its view
kept true to the prompt (data.transforms.keep_prompt_true), and Eq. 3's face mask (the face box's
figure pixels)."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data.annotations import load_records
from data.build import COLOUR_WORDS
from data.dataset import RetriBooruDataset
from data.synthetic import CLOTH_COLORS, EYE_COLORS, HAIR_COLORS, SCENE_BACKGROUNDS, generate
from data.transforms import AugmentParams, augment_pil, box_mask, draw_augment, fit_and_pad, keep_prompt_true

SIZE = 48


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes") / "syn"
    generate(root, identities=4, images_per_identity=3, size=SIZE, seed=2, noise_fraction=0.0, hats=False, scene=True)
    return root


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The default prompts: identity tags (colours) and "full body" or, for close-ups, "portrait"."""
    root = tmp_path_factory.mktemp("plain") / "syn"
    generate(root, identities=6, images_per_identity=3, size=SIZE, seed=1, noise_fraction=0.0)
    return root


def _untouched(root, rec, size):
    with Image.open(root / rec["image"]) as im:
        return fit_and_pad(im.convert("RGB"), size)


@pytest.mark.parametrize("data", ["scenes", "plain"])
def test_settings_a_and_b_share_the_target(data, request):
    """Same seed, epoch and index: the same image, valid and face masks and prompt in both settings;
    on the default prompts some targets really are views (flipped or cropped)."""
    root = request.getfixturevalue(data)
    kw = dict(resolution=40, k=2, prompt_drop=0.5, seed=3)
    records, transformed, prompts = load_records(root), 0, set()
    for task in ("recon", "compose"):
        a, b = (RetriBooruDataset(root, setting=s, task=task, **kw) for s in "ab")
        for epoch in (0, 1):
            a.set_epoch(epoch)
            b.set_epoch(epoch)
            for i in range(len(a)):
                sa, sb = a[i], b[i]
                for key in ("image", "valid", "face"):
                    assert torch.equal(sa[key], sb[key]), (data, task, epoch, i, key)
                assert sa["prompt"] == sb["prompt"]
                prompts.add(sa["prompt"] == "")
                transformed += not torch.equal(sa["image"], _untouched(root, records[i], 40)[0])
    assert prompts == {True, False}                      # the drop happens, equally in both
    if data == "plain":
        assert transformed > 0
    else:
        assert transformed == 0


def test_scene_targets_are_their_images(scenes):
    """Scene prompts ("full body, arms up, facing left, blue background") forbid flip, crop and
    brightness: every target is its image fitted and padded, in both settings."""
    records = load_records(scenes)
    for setting in "ab":
        ds = RetriBooruDataset(scenes, resolution=40, k=2, setting=setting, seed=7)
        for epoch in (0, 1):
            ds.set_epoch(epoch)
            for i, rec in enumerate(records):
                s = ds[i]
                pixels, valid = _untouched(scenes, rec, 40)
                assert torch.equal(s["image"], pixels) and torch.equal(s["valid"], valid), (setting, epoch, i)


def test_keep_prompt_true_rules():
    drawn = AugmentParams(flip=True, top=3, left=5, height=30, width=28, brightness=1.15)
    whole = dict(top=0, left=0, height=48, width=40)
    assert keep_prompt_true(drawn, "1girl, solo, smile, arms up", 40, 48) == drawn
    assert keep_prompt_true(drawn, "1girl, facing left", 40, 48) == drawn._replace(flip=False)
    assert keep_prompt_true(drawn, "looking_to_the_Right, smile", 40, 48) == drawn._replace(flip=False)
    assert keep_prompt_true(drawn, "1girl, blue background", 40, 48) == drawn._replace(brightness=1.0)
    assert keep_prompt_true(drawn, "long hair, blonde hair", 40, 48) == drawn._replace(brightness=1.0)
    assert keep_prompt_true(drawn, "1girl, full body", 40, 48) == drawn._replace(**whole)
    assert keep_prompt_true(drawn, "full_body, facing_right, grey_background", 40, 48) == AugmentParams(
        False, 0, 0, 48, 40, 1.0)
    # words inside other words name nothing: "copyright", "bodyguard", "full body armor" is no "full body"
    assert keep_prompt_true(drawn, "copyright, bodyguard, full body armor, redhead", 40, 48) == drawn


def test_every_synthetic_colour_name_is_a_colour_word():
    names = set(HAIR_COLORS) | set(EYE_COLORS) | set(CLOTH_COLORS) | set(SCENE_BACKGROUNDS)
    assert names <= COLOUR_WORDS
    assert {"red", "orange", "yellow", "green", "blue", "aqua", "purple", "pink", "brown", "black", "white",
            "grey", "gray", "silver", "blonde"} <= COLOUR_WORDS


def test_the_drawn_sequence_does_not_depend_on_the_prompt(scenes, tmp_path):
    """The target's parameters are all drawn before the rules apply, and the prompt drop reads the
    main generator only: a prompt without the rules' tags changes the target, not the references."""
    root = tmp_path / "copy"
    shutil.copytree(scenes, root)
    recs = load_records(root)
    (root / "annotations.jsonl").write_text("".join(json.dumps({**r, "prompt": "1girl, solo"}) + "\n" for r in recs))
    for setting in "ab":
        kw = dict(resolution=40, k=2, setting=setting, seed=4)
        old, new = RetriBooruDataset(scenes, **kw), RetriBooruDataset(root, **kw)
        changed = 0
        for i in range(len(recs)):
            so, sn = old[i], new[i]
            assert torch.equal(so["refs"], sn["refs"]) and so["ref_ids"] == sn["ref_ids"]
            assert (so["prompt"] == "") == (sn["prompt"] == "")
            changed += not torch.equal(so["image"], sn["image"])
        assert changed > len(recs) // 2


def test_face_mask_is_the_box_figure(scenes, plain):
    """Eq. 3's face: inside the face box and inside the figure (its segmentation mask), never empty
    on the synthetic data, and smaller than the box where the box holds background."""
    for root in (scenes, plain):
        records = load_records(root)
        for resolution in (SIZE, 64):        # as the image, and resized
            ds = RetriBooruDataset(root, resolution=resolution, k=1, seed=0)
            smaller = 0
            for i, rec in enumerate(records):
                face = ds[i]["face"]
                # scene targets are their images; plain ones of the same seed too where nothing was drawn
                if not torch.equal(ds[i]["image"], _untouched(root, rec, resolution)[0]):
                    continue
                box = box_mask(rec["face_bbox"], SIZE, SIZE, resolution)
                with Image.open(root / rec["mask"]) as m:
                    figure = fit_and_pad(m.convert("RGB"), resolution)[0][0] > -1  # any figure pixel
                assert face.sum() > 0, (root, i)
                assert ((face == 0) | (face == 1)).all()
                assert (face <= box).all() and not face[0][~figure].any(), (root, i)
                smaller += bool(face.sum() < box.sum())
            assert smaller > 0, (root, resolution)


def test_target_view_comes_from_its_own_generator(plain):
    """The target is the view drawn from default_rng([seed, epoch, index, 1]) and kept true to the
    record's prompt; its face mask lies inside that view's face box and figure."""
    records = load_records(plain)
    ds = RetriBooruDataset(plain, resolution=SIZE, k=1, seed=6)
    flipped = 0
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i, rec in enumerate(records):
            s = ds[i]
            with Image.open(plain / rec["image"]) as im, Image.open(plain / rec["mask"]) as m:
                image, mask = im.convert("RGB"), m.convert("L")
            params = keep_prompt_true(draw_augment(np.random.default_rng([6, epoch, i, 1]), SIZE, SIZE,
                                                   rec["face_bbox"]), rec["prompt"], SIZE, SIZE)
            flipped += params.flip
            view, box, view_mask = augment_pil(params, image, rec["face_bbox"], mask)
            assert torch.equal(s["image"], fit_and_pad(view, SIZE)[0]), (epoch, i)
            figure = fit_and_pad(view_mask.convert("RGB"), SIZE)[0][0] > -1
            face = s["face"]
            assert face.sum() > 0 and (face <= box_mask(box, view.width, view.height, SIZE)).all()
            assert not face[0][~figure].any()
    assert flipped > 0


def test_bad_mask_skips_the_sample(scenes, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(scenes, root)
    recs = load_records(root)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / recs[0]["mask"])
    (root / recs[1]["mask"]).write_bytes(b"broken")
    ds = RetriBooruDataset(root, resolution=32, k=1)
    assert ds[0] is None and ds[1] is None and ds[2] is not None
    with pytest.raises(ValueError, match="mask is 10x10"):
        RetriBooruDataset(root, resolution=32, k=1, strict=True)[0]
    with pytest.raises(ValueError, match="cannot read it"):
        RetriBooruDataset(root, resolution=32, k=1, strict=True)[1]


@pytest.mark.parametrize("data", ["scenes", "plain"])
def test_setting_a_references_are_other_views(data, request):
    """Sec. 3.1: "two different transforms [of] the same image": -a's references differ from each
    other and from the target."""
    root = request.getfixturevalue(data)
    ds = RetriBooruDataset(root, resolution=40, k=2, setting="a", seed=5)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            assert s["ref_ids"] == [s["id"]] * 2
            r0, r1 = s["refs"]
            assert not torch.equal(r0, r1)
            assert not torch.equal(r0, s["image"]) and not torch.equal(r1, s["image"])
