"""RetriBooru format: the annotations reader, the validator and the training loader on a small
hand-made dataset."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from data.annotations import AnnotationError, load_records, read_annotations
from data.dataset import RetriBooruDataset, TaskBatchSampler, _concept_crop, collate
from data.synthetic import generate
from data.transforms import BRIGHTNESS, CROP_KEEP, augment_pil, draw_augment, fit_and_pad
from data.validate import validate

ROOT = Path(__file__).resolve().parents[1]


def make_dataset(root: Path, identities=3, per_identity=3, w=40, h=56, face=(10, 4, 30, 18)) -> list[dict]:
    """Identity i's images are filled with colour i; the face box (`face`, by default the top third,
    centred) is painted black, so crops can be told apart by their pixels. The last image of identity
    0 is a close-up whose face box spans the whole height."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    colours = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (200, 200, 40)]
    records = []
    for i in range(identities):
        ids = [f"{i:02d}{j}" for j in range(per_identity)]
        for j, sid in enumerate(ids):
            arr = np.zeros((h, w, 3), np.uint8)
            arr[:] = colours[i]
            box = [10, 0, 30, h] if (i == 0 and j == per_identity - 1) else list(face)
            arr[box[1]:box[3], box[0]:box[2]] = 0
            Image.fromarray(arr).save(root / "images" / f"{sid}.png")
            Image.fromarray(np.full((h, w), 255, np.uint8)).save(root / "masks" / f"{sid}.png")
            records.append({"id": sid, "image": f"images/{sid}.png", "mask": f"masks/{sid}.png", "width": w,
                            "height": h, "character": f"char_{i}", "artist": "artist_0", "tags": ["1girl"],
                            "cloth_tags": ["shirt"], "prompt": f"1girl, colour {i}", "face_bbox": box,
                            "similar": [s for s in ids if s != sid]})
    write(root, records)
    return records


def write(root, records):
    (root / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


# ---- validator --------------------------------------------------------------------------------

def test_clean_dataset_validates(tmp_path):
    """A synthetic dataset is clean. The hand-made one is not: its images of one identity are one
    picture, so its `similar` links join near-duplicates (the leak data.build keeps out)."""
    generate(tmp_path / "syn", identities=4, images_per_identity=3, size=48, seed=0, noise_fraction=0.0)
    assert validate(tmp_path / "syn") == []
    r = subprocess.run([sys.executable, "-m", "data.validate", str(tmp_path / "syn")], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "12 samples, clean" in r.stderr
    make_dataset(tmp_path / "hand")
    problems = validate(tmp_path / "hand")
    assert problems and all("similar links near-duplicate images" in p for p in problems)
    assert validate(tmp_path / "hand", check_files=False) == []


def test_every_problem_is_reported(tmp_path):
    recs = make_dataset(tmp_path)
    recs[0]["face_bbox"] = [5, 5, 5, 9]                     # empty
    recs[1]["face_bbox"] = [30, 40, 50, 60]                 # outside the 40x56 image
    recs[2]["similar"] = ["002", "999"]                     # itself and a missing id
    recs[5]["similar"] = ["010"]                            # asymmetric: 012 no longer lists 011
    recs[4]["image"] = "images/missing.png"
    (tmp_path / "masks" / "020.png").write_bytes(b"broken")
    Image.new("L", (10, 10)).save(tmp_path / "masks" / "021.png")  # wrong size
    recs.append(dict(recs[8]))                              # duplicate id 022
    write(tmp_path, recs)
    with open(tmp_path / "annotations.jsonl", "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"id": "x1"}) + "\n")
    problems = "\n".join(validate(tmp_path))
    expected = ["sample 000: face_bbox [5, 5, 5, 9] is empty",
                "sample 001: face_bbox [30, 40, 50, 60] lies outside the 40x56 image",
                "sample 002: similar lists the sample itself", "sample 002: similar id 999 does not exist",
                "sample 011: similar id 012 does not list 011 back",
                "sample 011: image images/missing.png is missing",
                "sample 020: mask masks/020.png is unreadable",
                "sample 021: mask masks/021.png is 10x10, annotation says 40x56",
                "sample 022 (line 10): duplicate id (first on line 9)",
                "line 11: not valid JSON", "sample x1 (line 12): missing or mistyped fields"]
    for e in expected:
        assert e in problems, e
    r = subprocess.run([sys.executable, "-m", "data.validate", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "sample 011: image images/missing.png is missing" in r.stdout


# ---- reader -----------------------------------------------------------------------------------

def test_reader_collects_every_problem_in_the_validators_words(tmp_path):
    recs = make_dataset(tmp_path, identities=1, per_identity=2)
    bad_type = dict(recs[1], id="b1", width=True, similar="000")      # a bool is not an int
    lines = [json.dumps(recs[0]), "", "{not json", "[1, 2]", json.dumps({"id": "x1", "image": 3}),
             json.dumps(bad_type), json.dumps(recs[1])]
    (tmp_path / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    problems = []
    records = read_annotations(tmp_path, problems)
    assert [(n, r["id"]) for n, r in records] == [(1, "000"), (7, "001")]   # blank line 2 counts
    missing = ", ".join(f"{k} (expected {t})" for k, t in [
        ("image", "str"), ("mask", "str"), ("width", "int"), ("height", "int"), ("character", "str"),
        ("artist", "str"), ("tags", "list"), ("cloth_tags", "list"), ("prompt", "str"), ("face_bbox", "list"),
        ("similar", "list")])
    assert problems == [
        "line 3: not valid JSON (Expecting property name enclosed in double quotes)",
        "line 4: expected a JSON object",
        f"sample x1 (line 5): missing or mistyped fields: {missing}",
        "sample b1 (line 6): missing or mistyped fields: width (expected int), similar (expected list)"]
    with pytest.raises(AnnotationError) as e:   # raising mode: the first problem, one line
        read_annotations(tmp_path)
    path = tmp_path / "annotations.jsonl"
    assert str(e.value) == (f"{path}:3: not valid JSON (Expecting property name enclosed in double quotes); "
                            f"check the root with python -m data.validate {tmp_path}")


@pytest.mark.parametrize("change, where, what", [
    ("not json", "line 2", "not valid JSON (Expecting property name enclosed in double quotes)"),
    ("not an object", "line 2", "expected a JSON object"),
    ("missing field", "sample 001", "missing or mistyped fields: similar (expected list)"),
    ("bool for int", "sample 001", "missing or mistyped fields: height (expected int)"),
])
def test_loader_raises_on_a_bad_line_naming_file_line_and_field(tmp_path, change, where, what):
    """A record with a missing field used to load and be skipped at __getitem__; now construction
    fails on its line, with the problem the validator reports for it."""
    recs = make_dataset(tmp_path, identities=1, per_identity=3)
    lines = [json.dumps(r) for r in recs]
    if change == "not json":
        lines[1] = "{not json"
    elif change == "not an object":
        lines[1] = '"just a string"'
    elif change == "missing field":
        lines[1] = json.dumps({k: v for k, v in recs[1].items() if k != "similar"})
    else:
        lines[1] = json.dumps(dict(recs[1], height=False))
    (tmp_path / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    path = tmp_path / "annotations.jsonl"
    who = "" if where == "line 2" else f"{where}: "
    expected = f"{path}:2: {who}{what}; check the root with python -m data.validate {tmp_path}"
    for load in (RetriBooruDataset, load_records, read_annotations):
        with pytest.raises(AnnotationError) as e:
            load(tmp_path)
        assert str(e.value) == expected and "\n" not in str(e.value)
        assert isinstance(e.value, ValueError)
    in_validator = f"{where}: {what}" if where == "line 2" else f"{where} (line 2): {what}"
    assert in_validator in validate(tmp_path)


def test_missing_annotations_file(tmp_path):
    message = f"{tmp_path / 'annotations.jsonl'}: no such file (a RetriBooru root holds annotations.jsonl)"
    with pytest.raises(AnnotationError) as e:
        RetriBooruDataset(tmp_path)
    assert str(e.value) == message
    problems = []
    assert read_annotations(tmp_path, problems) == [] and problems == [message]
    assert validate(tmp_path) == [message]
    r = subprocess.run([sys.executable, "-m", "data.validate", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == message + "\n" and "0 samples, 1 problems" in r.stderr


def test_valid_records_are_read_unchanged_in_file_order(tmp_path):
    recs = make_dataset(tmp_path)
    with open(tmp_path / "annotations.jsonl", "a") as f:
        f.write("\n   \n")                                   # trailing blank lines are skipped
    assert load_records(tmp_path) == recs
    assert [n for n, _ in read_annotations(tmp_path, [])] == list(range(1, 10))
    ds = RetriBooruDataset(tmp_path, resolution=32)
    assert ds.records == recs and len(ds) == 9 and ds.prompt_drop == 0.5
    with pytest.raises(ValueError, match="prompt_drop"):
        RetriBooruDataset(tmp_path, prompt_drop=1.5)


# ---- loader -----------------------------------------------------------------------------------

def _colour_of(img):
    """Mean colour of the non-black, non-white pixels of a [-1, 1] image."""
    x = (img + 1) * 127.5
    keep = (x.sum(0) > 30) & (x.sum(0) < 740)
    return x[:, keep].mean(1)


def test_setting_b_never_returns_the_target_and_masks_missing(tmp_path):
    make_dataset(tmp_path)
    ds = RetriBooruDataset(tmp_path, resolution=32, k=4, setting="b", prompt_drop=0.0)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            assert s["ref_mask"].tolist() == [True, True, False, False]  # only 2 similar exist
            hue = lambda x: _colour_of(x) / _colour_of(x).max()  # noqa: E731  (the target's brightness aside)
            for j in range(2):
                assert torch.allclose(hue(s["refs"][j]), hue(s["image"]), atol=0.05)  # same identity
            assert s["id"] not in s["ref_ids"]                                   # never the target itself
            assert set(s["ref_ids"][:2]) <= set(ds.by_id[s["id"]]["similar"]) and s["ref_ids"][2:] == ["", ""]
    repeat = RetriBooruDataset(tmp_path, resolution=32, k=4, ref_repeat=True)
    assert repeat[0]["ref_mask"].all()


def _black(img, below=30):
    """Pixels of a [-1, 1] image whose channels sum below `below` (out of 765)."""
    return ((img + 1) * 127.5).sum(0) < below


def _bbox(mask):
    """[first row, first column, last row, last column] of a boolean (H, W) mask."""
    at = mask.nonzero()
    return torch.stack([at[:, 0].min(), at[:, 1].min(), at[:, 0].max(), at[:, 1].max()])


def test_setting_a_target_and_references_are_independent_views(tmp_path):
    """Sec. 3.1: "-a ... applies two different transforms [to] the same image as target and
    reference". The target is a view too, and its face mask follows its flip and crop."""
    make_dataset(tmp_path, face=(4, 6, 16, 20))  # a face box on the left: a flip moves it right
    ds = RetriBooruDataset(tmp_path, resolution=64, k=3, setting="a", prompt_drop=0.0)
    sides = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(3, 9):                                   # identities 1 and 2: no close-up
            s = ds[i]
            assert s["ref_mask"].all() and s["ref_ids"] == [s["id"]] * 3 and s["concepts"] == ["figure"] * 3
            img, inside = s["image"], s["face"][0].bool()
            assert torch.equal(s["valid"][0].bool(), ~(img == 1).all(0))  # the view's real pixels
            assert (_bbox(inside) - _bbox(_black(img))).abs().max() <= 1  # upscaled: edges blur a pixel
            cols = inside.nonzero()[:, 1].float().mean() - s["valid"][0].nonzero()[:, 1].float().mean()
            sides.add("left" if cols < 0 else "right")
            views = [img, *s["refs"]]                                  # all at 64 px
            for a in range(4):
                for b in range(a + 1, 4):
                    assert not torch.equal(views[a], views[b])      # independent transforms
            hue = lambda x: _colour_of(x) / _colour_of(x).max()  # noqa: E731  (brightness aside)
            for r in s["refs"]:
                assert torch.allclose(hue(r), hue(img), atol=0.05)    # the same picture
    assert sides == {"left", "right"}                               # targets are flipped, or not
    with Image.open(tmp_path / "images" / "010.png") as im:
        untouched = fit_and_pad(im.convert("RGB"), 64)[0]
    assert not torch.equal(ds[3]["image"], untouched)                # the target is transformed


def test_augment_moves_image_mask_and_box_together():
    """One call transforms the image, its segmentation mask and its face box: in every view the box
    is exactly where the (black) face went, the mask too, and a box that fits the crop stays whole."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        w, h = (int(v) for v in rng.integers(12, 60, 2))
        bw, bh = int(rng.integers(1, w + 1)), int(rng.integers(1, h + 1))
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        arr = rng.integers(60, 256, (h, w, 3)).astype(np.uint8)
        arr[y0:y0 + bh, x0:x0 + bw] = 0
        mask = np.zeros((h, w), np.uint8)
        mask[y0:y0 + bh, x0:x0 + bw] = 255
        params = draw_augment(rng, w, h, (x0, y0, x0 + bw, y0 + bh))
        assert round(w * CROP_KEEP[0]) <= params.width <= w and round(h * CROP_KEEP[0]) <= params.height <= h
        assert BRIGHTNESS[0] <= params.brightness <= BRIGHTNESS[1]
        view, box, view_mask = augment_pil(params, Image.fromarray(arr), (x0, y0, x0 + bw, y0 + bh),
                                           Image.fromarray(mask))
        assert view.size == view_mask.size == (params.width, params.height)
        black = (np.asarray(view).sum(2) == 0).nonzero()
        assert box == [black[1].min(), black[0].min(), black[1].max() + 1, black[0].max() + 1]
        marked = np.asarray(view_mask).nonzero()
        assert box == [marked[1].min(), marked[0].min(), marked[1].max() + 1, marked[0].max() + 1]
        if bw <= params.width:
            assert box[2] - box[0] == bw                                 # kept whole
        if bh <= params.height:
            assert box[3] - box[1] == bh
    a, b = (draw_augment(np.random.default_rng([1, 2, 3]), 40, 56, (10, 4, 30, 18)) for _ in range(2))
    assert a == b                                                        # only the given generator


@pytest.fixture(scope="module")
def synthetic_black_faces(tmp_path_factory):
    """A synthetic dataset (close-ups included) whose face boxes are painted black."""
    root = tmp_path_factory.mktemp("synthetic") / "syn"
    generate(root, identities=8, images_per_identity=3, size=64, seed=4)
    for r in load_records(root):
        with Image.open(root / r["image"]) as im:
            arr = np.array(im.convert("RGB"))
        x0, y0, x1, y1 = r["face_bbox"]
        arr[y0:y1, x0:x1] = 0
        Image.fromarray(arr).save(root / r["image"])
    return root


@pytest.mark.parametrize("background", ["keep", "white"])
def test_setting_a_compose_crops_the_transformed_face(synthetic_black_faces, background):
    """Under compose + setting a, each reference is cropped at its own view's face box: a "face"
    crop is the (black) face alone, a "clothes" crop has none of it; the target's face mask covers
    its face; no sample of the epoch is skipped."""
    ds = RetriBooruDataset(synthetic_black_faces, resolution=48, k=2, setting="a", task="compose",
                           ref_resolution=32, ref_background=background)
    seen = set()
    for epoch in range(2):
        ds.set_epoch(epoch)
        batches = list(DataLoader(ds, batch_size=8, collate_fn=collate))
        assert sum(b["skipped"] for b in batches) == 0 and sum(b["size"] for b in batches) == len(ds)
        for batch in batches:
            for i in range(batch["size"]):
                assert (_bbox(batch["face"][i, 0].bool()) - _bbox(_black(batch["image"][i]))).abs().max() <= 1
                for j, concept in enumerate(batch["concepts"][i]):
                    seen.add(concept)
                    ref = batch["refs"][i, j]
                    if concept == "face":   # the black box, fitted and padded with white
                        assert (ref == -1).all(0).float().mean() > 0.3
                        if background == "keep":
                            assert ((ref == -1) | (ref == 1)).all()
                        else:               # box corners off the figure whitened: greys, no colour
                            assert ((ref[0] == ref[1]) & (ref[1] == ref[2])).all()
                    elif concept == "clothes":
                        assert not _black(ref, 15).any()
    assert seen == {"face", "clothes", "figure"}


def test_setting_b_is_unchanged(tmp_path):
    """Setting b's references are those of the loader before setting a's fix: fingerprints of prompts,
    concepts, references and tensors recorded from that code (compose on identities 1 and 2, whose
    references are never close-ups, as the fallback changed for those). The target is a view now (in
    both settings), its face mask the box's figure pixels: with prompts that forbid every change of
    the target ("full body, facing left, red background") image and valid are the old ones too; the
    face sums (the figure of identity 1 is the left half) and the transformed targets are recorded
    from the new code."""
    recs = make_dataset(tmp_path)
    for r in recs:
        if r["id"].startswith("01"):
            m = np.zeros((56, 40), np.uint8)
            m[:, :20] = 255
            Image.fromarray(m).save(tmp_path / r["mask"])
    original = {r["id"]: r["prompt"] for r in recs}
    cases = [
        ("recon", dict(k=2), range(9), "b6d9a3f8c30c4875", 14133.9991),
        ("recon", dict(k=3, ref_resolution=24, ref_background="white"), range(9), "6c23d5ec0af40869", 166902.1676),
        ("recon", dict(k=4, ref_repeat=True), range(9), "3b4028a958e3582b", 30044.0002),
        ("compose", dict(k=2), range(3, 9), "9b6e9dfff208573b", -100162.0004),
        ("compose", dict(k=3, ref_repeat=True, ref_background="white"), range(3, 9), "07469f796bc51f77", -8488.3936),
    ]
    targets = {  # (image, valid, face) sums: the record's prompts (views), and prompts forbidding every change
        ("recon", False): [4796.2587, 49002.0757, 7721.0996], ("compose", False): [7191.3114, 42230.749, 5259.2351],
        ("recon", True): [5716.7709, 49588.5657, 6302.8327], ("compose", True): [7070.1437, 42976.757, 4301.7849]}
    for forbid in (False, True):
        if forbid:
            write(tmp_path, [{**r, "prompt": r["prompt"] + ", full body, facing left, red background"} for r in recs])
        for task, kw, indices, digest, refs_sum in cases:
            ds = RetriBooruDataset(tmp_path, resolution=32, setting="b", task=task, seed=5, **kw)
            text, got = [], torch.zeros(4, dtype=torch.float64)
            for epoch in (0, 1):
                ds.set_epoch(epoch)
                for i in indices:
                    s = ds[i]
                    prompt = s["prompt"] and original[s["id"]]   # the same drops, whatever the prompt
                    text.append([s["id"], prompt, s["concepts"], s["ref_ids"], s["ref_mask"].tolist()])
                    for n, key in enumerate(("image", "valid", "face", "refs")):
                        x = s[key].double().flatten()
                        weight = (torch.arange(x.numel(), dtype=torch.float64) % 251 + 1) / 251 * (i + 1) * (epoch + 1)
                        got[n] += (x * weight).sum()
            sums = torch.tensor(targets[task, forbid] + [refs_sum], dtype=torch.float64)
            assert hashlib.sha256(json.dumps(text).encode()).hexdigest()[:16] == digest, (task, kw, forbid)
            assert torch.allclose(got, sums, rtol=0, atol=1e-3), (task, kw, forbid)


class _Draw:
    """A stand-in generator whose random() returns the given values in turn."""

    def __init__(self, *values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


FACE, CLOTHES = 0.1, 0.9  # draws below / above one half


@pytest.mark.parametrize("box, kind", [
    ((10, 2, 30, 40), "close-up"),          # 38 of 56 rows: the face box is most of the image's height
    ((6, 0, 34, 56), "close-up"),           # the whole height
    ((12, 44, 28, 56), "upside-down"),      # face at the bottom edge: nothing below it
    ((12, 40, 28, 52), "upside-down"),      # 4 rows below a 12-row face: less below it than the face
    ((10, 4, 30, 18), "ordinary"),
    ((10, 0, 30, 28), "ordinary"),          # exactly half the height, as much below: not a majority
])
def test_compose_fallback_replaces_only_clothes_draws(box, kind):
    """Sec. 5 / Supp. A.4: a clothes draw becomes the whole image ("figure") when the face box takes
    the majority of the image's height or leaves less below it than its own height; a face draw stays
    the face crop."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 40, 3)).astype(np.uint8))
    crop, concept = _concept_crop(image, box, _Draw(FACE))
    assert concept == "face" and crop.tobytes() == image.crop(box).tobytes()
    crop, concept = _concept_crop(image, box, _Draw(CLOTHES))
    if kind == "ordinary":
        assert concept == "clothes" and crop.tobytes() == image.crop((0, box[3], 40, 56)).tobytes()
    else:
        assert concept == "figure" and crop is image


def test_compose_fallback_in_the_loader(tmp_path):
    """Through the loader (setting b): references that are close-ups or upside-down figures come as
    "face" or "figure", never as a strip captioned "clothes"; an ordinary figure as "face" or
    "clothes", the region below its face box."""
    boxes = {"ordinary": [10, 4, 30, 18], "close-up": [4, 3, 36, 38], "upside-down": [12, 42, 28, 56]}
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    records, images = [], {}
    for sid, box in boxes.items():
        arr = np.zeros((56, 40, 3), np.uint8)
        arr[:] = (40, 200, 40)
        arr[box[1]:box[3], box[0]:box[2]] = 0
        images[sid] = Image.fromarray(arr)
        images[sid].save(tmp_path / "images" / f"{sid}.png")
        Image.fromarray(np.full((56, 40), 255, np.uint8)).save(tmp_path / "masks" / f"{sid}.png")
        records.append({"id": sid, "image": f"images/{sid}.png", "mask": f"masks/{sid}.png", "width": 40,
                        "height": 56, "character": "c", "artist": "a", "tags": ["1girl"], "cloth_tags": ["shirt"],
                        "prompt": "1girl", "face_bbox": box, "similar": [s for s in boxes if s != sid]})
    write(tmp_path, records)
    ds = RetriBooruDataset(tmp_path, resolution=32, k=2, task="compose", strict=True)
    seen = {sid: set() for sid in boxes}
    for epoch in range(12):
        ds.set_epoch(epoch)
        for i in range(3):
            s = ds[i]
            for j, (sid, concept) in enumerate(zip(s["ref_ids"], s["concepts"])):
                seen[sid].add(concept)
                expected = {"face": images[sid].crop(boxes[sid]), "figure": images[sid],
                            "clothes": images[sid].crop((0, boxes[sid][3], 40, 56))}[concept]
                assert torch.equal(s["refs"][j], fit_and_pad(expected, 32)[0])
    assert seen == {"ordinary": {"face", "clothes"}, "close-up": {"face", "figure"},
                    "upside-down": {"face", "figure"}}


def test_compose_crops_follow_the_face_box(tmp_path):
    make_dataset(tmp_path)
    ds = RetriBooruDataset(tmp_path, resolution=32, k=2, task="compose")
    seen = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            for j, concept in enumerate(s["concepts"]):
                seen.add(concept)
                x = (s["refs"][j] + 1) * 127.5
                black = (x.sum(0) < 30).float().mean()
                if concept == "face":        # the face box is painted black; the rest is padding
                    assert (x.sum(0) < 30)[~(x > 250).all(0)].float().mean() > 0.9
                elif concept == "clothes":
                    assert black < 0.05      # below the face box: no black
    assert seen == {"face", "clothes", "figure"}  # figure: clothes draws of the close-up (box of full height)


def test_masks_line_up_with_the_padded_image(tmp_path):
    make_dataset(tmp_path)
    s = RetriBooruDataset(tmp_path, resolution=64, k=1)[0]
    img = (s["image"] + 1) * 127.5
    padding = (img > 250).all(0)
    assert torch.equal(s["valid"][0].bool(), ~padding)          # 40x56 -> 46x64 centred: white sides
    face_pixels = (img.sum(0) < 30)
    inside = s["face"][0].bool()
    # bicubic resizing softens the box edges, hence not 1 and 0 exactly
    assert face_pixels[inside].float().mean() > 0.8 and face_pixels[~inside].float().mean() < 0.02


def test_white_reference_backgrounds_follow_the_masks(tmp_path):
    """ref_background "white": where a reference's mask is 0 its pixels are white, elsewhere they are
    the whole picture's (same draw); targets keep their backgrounds. Crops happen after whitening."""
    records = make_dataset(tmp_path)
    for r in records:  # the figure is the left half of each 40x56 image
        m = np.zeros((56, 40), np.uint8)
        m[:, :20] = 255
        Image.fromarray(m).save(tmp_path / r["mask"])
    for task, setting in [("recon", "b"), ("compose", "b"), ("recon", "a")]:
        kw = dict(resolution=56, k=2, task=task, setting=setting, seed=1)
        keep, white = RetriBooruDataset(tmp_path, **kw), RetriBooruDataset(tmp_path, ref_background="white", **kw)
        for i in (0, 4, 8):
            a, b = keep[i], white[i]
            assert torch.equal(a["image"], b["image"]) and a["ref_ids"] == b["ref_ids"]
            for j in range(2):
                if task == "recon" and setting == "b":  # 40x56 -> padded by 8 columns each side
                    assert (b["refs"][j][:, :, 28:48] == 1).all()
                    assert torch.equal(b["refs"][j][:, :, 8:28], a["refs"][j][:, :, 8:28])
                ra, rb = a["refs"][j], b["refs"][j]
                if setting == "b":
                    assert (rb == 1).all(0).sum() > (ra == 1).all(0).sum()
                if task == "recon" and setting == "b":
                    assert ((rb == 1) | (rb == ra)).all()
                elif setting == "a":  # the same view, whitened through its transformed mask: white stays white
                    white_a, white_b = (ra == 1).all(0), (rb == 1).all(0)
                    assert (white_a & ~white_b).sum() == 0 and white_b.sum() > white_a.sum() + 200
                    assert ((rb - ra).abs().amax(0) < 1e-6)[~white_b].float().mean() > 0.9
    with pytest.raises(ValueError, match="ref_background"):
        RetriBooruDataset(tmp_path, ref_background="black")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / records[1]["mask"])
    with pytest.raises(ValueError, match=r"masks/001.png: mask is 10x10, its image 40x56"):
        RetriBooruDataset(tmp_path, resolution=56, ref_background="white", strict=True)[0]


def test_prompt_drop_and_determinism(tmp_path):
    make_dataset(tmp_path)
    ds = RetriBooruDataset(tmp_path, resolution=32, k=2, prompt_drop=0.5, task="compose", seed=3)
    prompts = [ds[i]["prompt"] for i in range(len(ds))]
    assert "" in prompts and any(prompts)
    again = RetriBooruDataset(tmp_path, resolution=32, k=2, prompt_drop=0.5, task="compose", seed=3)
    a, b = ds[5], again[5]
    assert a["concepts"] == b["concepts"] and torch.equal(a["refs"], b["refs"]) and a["prompt"] == b["prompt"]


@pytest.mark.parametrize("setting", ["b", "a"])
def test_independent_of_worker_count(tmp_path, setting):
    make_dataset(tmp_path)
    ds = RetriBooruDataset(tmp_path, resolution=32, k=2, setting=setting, task="compose", seed=1)

    def run(workers):
        loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=workers, collate_fn=collate)
        return [(b["id"], b["concepts"], b["refs"], b["face"]) for b in loader]
    zero, two = run(0), run(2)
    assert [z[:2] for z in zero] == [t[:2] for t in two]
    assert all(torch.equal(z[2], t[2]) and torch.equal(z[3], t[3]) for z, t in zip(zero, two))


def test_distributed_partition_and_multi_task_batches(tmp_path):
    make_dataset(tmp_path)
    ds = RetriBooruDataset(tmp_path, resolution=32, k=2, task="multi")
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0, drop_last=True)
        batches = TaskBatchSampler(sampler, batch_size=2, seed=0)
        batches.set_epoch(1)
        for batch in DataLoader(ds, batch_sampler=batches, collate_fn=collate):
            assert len(set(batch["task"])) == 1  # one task per batch
            seen += batch["id"]
    assert len(seen) == len(set(seen)) == 8  # 9 samples, drop_last: 4 per rank, no overlap


def test_bad_samples_are_skipped_or_raise(tmp_path, caplog):
    recs = make_dataset(tmp_path)
    recs[1]["face_bbox"] = [0, 0, 100, 100]
    write(tmp_path, recs)
    (tmp_path / "images" / "012.png").write_bytes(b"broken")
    ds = RetriBooruDataset(tmp_path, resolution=32, k=1, ref_repeat=True)
    batches = list(DataLoader(ds, batch_size=3, collate_fn=collate))
    assert sum(b["skipped"] for b in batches) >= 2 and sum(b["size"] for b in batches) <= 7
    with pytest.raises(ValueError, match="sample 001: face_bbox"):
        RetriBooruDataset(tmp_path, resolution=32, k=1, strict=True)[1]
