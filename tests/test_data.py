"""RetriBooru format: the validator and the training loader on a small hand-made dataset."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

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


# ---- loader -----------------------------------------------------------------------------------

def _colour_of(img):
    """Mean colour of the non-black, non-white pixels of a [-1, 1] image."""
    x = (img + 1) * 127.5
    keep = (x.sum(0) > 30) & (x.sum(0) < 740)
    return x[:, keep].mean(1)


def test_setting_b_never_returns_the_target_and_masks_missing(tmp_path):
    make_dataset(tmp_path)
    ds = RetriBooruDataset(tmp_path, resolution=32, k=4, setting="b", p_drop=0.0)
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
    ds = RetriBooruDataset(tmp_path, resolution=32, k=2, p_drop=0.5, task="compose", seed=3)
    prompts = [ds[i]["prompt"] for i in range(len(ds))]
    assert "" in prompts and any(prompts)
    again = RetriBooruDataset(tmp_path, resolution=32, k=2, p_drop=0.5, task="compose", seed=3)
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
