"""RetriBooru format: the annotations reader, the validator and the training loader on a small
hand-made dataset."""
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
from data.dataset import RetriBooruDataset, TaskBatchSampler, collate
from data.validate import validate

ROOT = Path(__file__).resolve().parents[1]


def make_dataset(root: Path, identities=3, per_identity=3, w=40, h=56) -> list[dict]:
    """Identity i's images are filled with colour i; the face box (top third) is painted black, so
    crops can be told apart by their pixels. The last image of identity 0 is a close-up whose face
    box reaches the bottom edge."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    colours = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (200, 200, 40)]
    records = []
    for i in range(identities):
        ids = [f"{i:02d}{j}" for j in range(per_identity)]
        for j, sid in enumerate(ids):
            arr = np.zeros((h, w, 3), np.uint8)
            arr[:] = colours[i]
            box = [10, 0, 30, h] if (i == 0 and j == per_identity - 1) else [10, 4, 30, 18]
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
    make_dataset(tmp_path)
    assert validate(tmp_path) == []
    r = subprocess.run([sys.executable, "-m", "data.validate", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "9 samples, clean" in r.stderr


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
            target = _colour_of(s["image"])
            for j in range(2):
                assert torch.allclose(_colour_of(s["refs"][j]), target, atol=8)  # same identity
            assert s["id"] not in s["ref_ids"]                                   # never the target itself
            assert set(s["ref_ids"][:2]) <= set(ds.by_id[s["id"]]["similar"]) and s["ref_ids"][2:] == ["", ""]
    repeat = RetriBooruDataset(tmp_path, resolution=32, k=4, ref_repeat=True)
    assert repeat[0]["ref_mask"].all()


def test_setting_a_returns_augmented_targets(tmp_path):
    make_dataset(tmp_path)
    ds = RetriBooruDataset(tmp_path, resolution=32, k=3, setting="a")
    s = ds[4]
    assert s["ref_mask"].all()
    for j in range(3):
        assert torch.allclose(_colour_of(s["refs"][j]), _colour_of(s["image"]), atol=40)
    assert not torch.equal(s["refs"][0], s["refs"][1])  # independent augmentations


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
                if concept == "face":
                    assert black > 0.5       # the face box is painted black
                elif concept == "clothes":
                    assert black < 0.05      # below the face box: no black
    assert seen == {"face", "clothes", "figure"}  # figure: the close-up whose box reaches the bottom


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
                elif setting == "a":  # the same augmentation after whitening: white turns grey with the brightness
                    grey = lambda r: ((r[0] == r[1]) & (r[1] == r[2])).sum()  # noqa: E731
                    assert grey(rb) > grey(ra) + 200
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


def test_independent_of_worker_count(tmp_path):
    make_dataset(tmp_path)
    ds = RetriBooruDataset(tmp_path, resolution=32, k=2, task="compose", seed=1)

    def run(workers):
        loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=workers, collate_fn=collate)
        return [(b["id"], b["concepts"], b["refs"]) for b in loader]
    zero, two = run(0), run(2)
    assert [z[:2] for z in zero] == [t[:2] for t in two]
    assert all(torch.equal(z[2], t[2]) for z, t in zip(zero, two))


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
