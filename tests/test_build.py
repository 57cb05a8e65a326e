"""Tests for the RetriBooru construction pipeline (data/build.py): filters, order-sensitive answer
matching, (character, artist) grouping, annotations format, stats, charts, truth metrics, errors
and the CLI. Every test writes its own tiny dataset (8x8 PNGs) into tmp_path."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import build as B

REPO = Path(__file__).resolve().parents[1]
CLOTH = ["school_uniform", "serafuku", "skirt"]
UNIFORM = ["1girl", "school_uniform", "skirt", "smile"]


def row(id, answer="red and white", char="alice", artist="art1", tags=UNIFORM, *,
        chars=None, artists=None, image=True, mask=True, box=True, identity=None):
    return dict(id=id, answer=answer, chars=[char] if chars is None else chars,
                artists=[artist] if artists is None else artists, tags=list(tags),
                image=image, mask=mask, box=box, identity=identity)


# The shared scenario; the comment says what happens to each row.
ROWS = [
    row(1), row(2), row(3, answer="  Red  AND white "),          # cluster A (normalised match)
    row(4, answer="white and red"),                              # order differs -> no_link
    row(5, artist="art2"),                                       # same answer, other artist -> no_link
    row(6, answer="blue and black", artist="art2", tags=["1girl", "serafuku", "smile"]),  # cluster B
    row(7, answer="blue and black", artist="art2", tags=["1girl", "serafuku", "smile"]),
    row(8, char="bob", tags=["1boy", "school_uniform"]),         # cluster C (other character)
    row(9, char="bob", tags=["1boy", "school_uniform"]),
    row(10, tags=UNIFORM + ["monochrome"]),                      # unwanted_tag
    row(11, chars=["alice", "bob"]),                             # not_single_character
    row(12, tags=["2girls", "school_uniform"]),                  # not_single_character
    row(13, tags=["1girl", "smile"]),                            # no_cloth_tag
    row(14, answer=None),                                        # no_vqa_answer
    row(15, mask=False),                                         # no_mask
    row(16, box=False),                                          # no_face_box
    row(17, artists=[]),                                         # not_single_artist
    row(18, image=False),                                        # no_image
]
KEPT = {1: [2, 3], 2: [1, 3], 3: [1, 2], 6: [7], 7: [6], 8: [9], 9: [8]}


def write_dataset(tmp_path, rows):
    """Write the inputs; return the build() keyword arguments."""
    ds = tmp_path / "ds"
    (ds / "meta").mkdir(parents=True)
    (ds / "images").mkdir()
    masks = tmp_path / "masks"
    masks.mkdir()
    meta, vqa, boxes, truth = [], [], [], []
    for r in rows:
        i = r["id"]
        meta.append({"id": i, "image": f"images/{i}.png", "width": 8, "height": 8,
                     "general_tags": r["tags"], "character_tags": r["chars"],
                     "artist_tags": r["artists"]})
        if r["image"]:
            Image.new("RGB", (8, 8), (i * 10 % 256, 0, 0)).save(ds / "images" / f"{i}.png")
        if r["mask"]:
            Image.new("L", (8, 8), 255).save(masks / f"{i}.png")
        if r["answer"] is not None:
            vqa.append({"id": i, "question": "What are the top two colors of the character's "
                        "clothes?", "answer": r["answer"]})
        if r["box"]:
            boxes.append({"id": i, "face_bbox": [1, 1, 5, 4]})
        if r["identity"] is not None:
            truth.append({"id": i, "identity": r["identity"]})

    def dump(path, objs):
        path.write_text("".join(json.dumps(o) + "\n" for o in objs))
        return path

    kw = dict(metadata=dump(ds / "meta" / "metadata.jsonl", meta),
              vqa=dump(tmp_path / "vqa_answers.jsonl", vqa),
              cloth_tags=tmp_path / "cloth_tags.txt",
              masks=masks, boxes=dump(tmp_path / "face_boxes.jsonl", boxes),
              out=tmp_path / "out")
    kw["cloth_tags"].write_text("\n".join(CLOTH) + "\n")
    if truth:
        kw["truth"] = dump(tmp_path / "identities.jsonl", truth)
    return kw


def read_ann(out):
    return [json.loads(l) for l in (Path(out) / "annotations.jsonl").read_text().splitlines()]


@pytest.fixture
def built(tmp_path):
    kw = write_dataset(tmp_path, ROWS)
    stats = B.build(**kw)
    return kw, stats, read_ann(kw["out"])


def test_filters_drop_and_count(built):
    _, stats, ann = built
    assert stats["input_images"] == 18
    assert stats["dropped"] == {
        "unwanted_tag": 1, "not_single_character": 2, "not_single_artist": 1, "no_cloth_tag": 1,
        "no_image": 1, "no_vqa_answer": 1, "no_mask": 1, "no_face_box": 1, "no_link": 2}
    assert stats["dropped_total"] == 11
    assert stats["passed_filters"] == 9
    assert stats["kept_samples"] == 7 == len(ann)
    assert [a["id"] for a in ann] == sorted(KEPT)   # sorted by id, drops absent


def test_matching_order_grouping_and_similar(built):
    _, stats, ann = built
    sim = {a["id"]: a["similar"] for a in ann}
    assert sim == KEPT                      # 4 (reversed order) and 5 (other artist) are singletons
    assert stats["clusters"] == 3
    assert stats["character_artist_groups"] == 3
    for i, s in sim.items():                # symmetric, excluding self
        assert i not in s
        for j in s:
            assert i in sim[j]


def test_grouping_keeps_artists_apart(tmp_path):
    rows = [row(1), row(2, artist="art2"), row(3), row(4, artist="art2"), row(5, char="bob")]
    kw = write_dataset(tmp_path, rows)
    stats = B.build(**kw)
    sim = {a["id"]: a["similar"] for a in read_ann(kw["out"])}
    assert sim == {1: [3], 3: [1], 2: [4], 4: [2]}
    assert stats["dropped"]["no_link"] == 1


def test_annotation_fields_and_paths(built):
    kw, _, ann = built
    out = Path(kw["out"])
    a = ann[0]
    assert set(a) == {"id", "image", "mask", "width", "height", "character", "artist", "tags",
                      "cloth_tags", "prompt", "face_bbox", "similar"}
    assert a["id"] == 1 and a["character"] == "alice" and a["artist"] == "art1"
    assert a["tags"] == UNIFORM
    assert a["cloth_tags"] == ["school_uniform", "skirt"]
    assert a["prompt"] == "1girl, school uniform, skirt, smile"
    assert a["face_bbox"] == [1, 1, 5, 4] and (a["width"], a["height"]) == (8, 8)
    for a in ann:
        for key, folder in (("image", kw["metadata"].parent.parent / "images"),
                            ("mask", kw["masks"])):
            assert not os.path.isabs(a[key])
            p = out / a[key]
            assert p.resolve() == (folder / f"{a['id']}.png").resolve()
            with Image.open(p) as im:
                assert im.size == (8, 8)
    assert not list(out.glob("*/*.png"))    # nothing copied


def test_stats_and_charts(built):
    kw, stats, _ = built
    out = Path(kw["out"])
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk == stats
    assert stats["references_histogram"] == {"1": 4, "2": 3}
    assert stats["top_characters"] == [["alice", 5], ["bob", 2]]
    assert stats["top_cloth_tags"] == [["school_uniform", 5], ["skirt", 3], ["serafuku", 2]]
    assert "truth" not in stats
    for name in ("stats_references.png", "stats_characters.png", "stats_cloth_tags.png"):
        with Image.open(out / name) as im:
            im.load()
            assert im.format == "PNG" and im.width >= 300 and im.height >= 80
            assert len(np.unique(np.asarray(im.convert("L")))) > 2   # something drawn


def test_custom_drop_tags_and_root(tmp_path):
    rows = [row(1, tags=UNIFORM + ["sketch"]), row(2, tags=UNIFORM + ["sketch"]),
            row(3, tags=UNIFORM + ["monochrome"])]
    kw = write_dataset(tmp_path, rows)
    stats = B.build(**kw, drop_tags=["monochrome"], root=kw["metadata"].parent.parent)
    assert stats["dropped"]["unwanted_tag"] == 1 and stats["kept_samples"] == 2
    kw2 = write_dataset(tmp_path / "other", rows)
    stats = B.build(**kw2, root=tmp_path / "nowhere")        # wrong root -> images missing
    assert stats["dropped"]["unwanted_tag"] == 3 and stats["kept_samples"] == 0
    stats = B.build(**dict(kw2, out=tmp_path / "o3"), drop_tags=[], root=tmp_path / "nowhere")
    assert stats["dropped"]["no_image"] == 3


def test_precision_recall_with_truth(tmp_path):
    rows = [
        row(1, identity="alice-uniform"), row(2, identity="alice-uniform"),
        row(3, identity="alice-casual"),                      # wrong link: same answer, other outfit
        row(4, answer="red, white", identity="alice-uniform"),  # same outfit, answer phrased
        row(5, answer="red, white", identity="alice-uniform"),  # differently -> missed links
        row(6, char="bob", identity="bob-uniform"), row(7, char="bob", identity="bob-uniform"),
        row(8, answer="green and gold", identity="alice-uniform"),  # singleton, not kept
    ]
    kw = write_dataset(tmp_path, rows)
    stats = B.build(**kw)
    # Predicted pairs: {1,2,3} -> 1-2 ok, 1-3 bad, 2-3 bad; {4,5} ok; {6,7} ok -> 3 / 5.
    # True pairs over kept {1..7}: alice-uniform {1,2,4,5} -> 6, bob {6,7} -> 1 => 7; tp 3 -> 3/7.
    t = stats["truth"]
    assert t["predicted_pairs"] == 5 and t["true_positive_pairs"] == 3 and t["true_pairs"] == 7
    assert t["precision"] == pytest.approx(3 / 5)
    assert t["recall"] == pytest.approx(3 / 7)
    assert t["evaluated_samples"] == 7 and t["missing_truth"] == 0
    assert json.loads((Path(kw["out"]) / "stats.json").read_text())["truth"] == t


def test_malformed_json_names_file_and_line(tmp_path):
    kw = write_dataset(tmp_path, [row(1), row(2)])
    lines = kw["vqa"].read_text().splitlines()
    kw["vqa"].write_text(lines[0] + "\n" + '{"id": 2, "answer": "red and white"\n')
    with pytest.raises(B.BuildError, match=r"vqa_answers\.jsonl:2: malformed JSON"):
        B.build(**kw)


def test_missing_field_names_file_and_line(tmp_path):
    kw = write_dataset(tmp_path, [row(1), row(2)])
    lines = kw["metadata"].read_text().splitlines()
    bad = json.loads(lines[1])
    del bad["artist_tags"]
    kw["metadata"].write_text(lines[0] + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(B.BuildError, match=r"metadata\.jsonl:3: missing field\(s\) artist_tags"):
        B.build(**kw)


def run_cli(args):
    return subprocess.run([sys.executable, "-m", "data.build", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def cli_args(kw, **extra):
    args = ["--metadata", kw["metadata"], "--vqa", kw["vqa"], "--cloth-tags", kw["cloth_tags"],
            "--masks", kw["masks"], "--boxes", kw["boxes"], "--out", kw["out"]]
    for k, v in extra.items():
        args += ["--" + k.replace("_", "-"), v]
    return args


def test_cli(tmp_path):
    rows = [row(1, identity="a"), row(2, identity="a"), row(3, identity="b"),
            row(4, tags=UNIFORM + ["sketch"], identity="a")]
    kw = write_dataset(tmp_path, rows)
    r = run_cli(cli_args(kw, truth=kw["truth"], drop_tags="monochrome"))
    assert r.returncode == 0, r.stderr
    assert "precision 0.5000" in r.stdout and "recall 1.0000" in r.stdout
    assert "kept 4 samples" in r.stderr
    ann = read_ann(kw["out"])
    assert [a["similar"] for a in ann] == [[2, 3, 4], [1, 3, 4], [1, 2, 4], [1, 2, 3]]
    stats = json.loads((Path(kw["out"]) / "stats.json").read_text())
    assert stats["truth"]["precision"] == pytest.approx(3 / 6)   # 1-2, 1-4, 2-4 of 6 pairs
    assert stats["truth"]["recall"] == 1.0

    r = run_cli(cli_args(dict(kw, out=tmp_path / "o2")))       # default drop list has sketch
    assert r.returncode == 0 and "dropped      1  unwanted_tag" in r.stderr and r.stdout == ""

    kw["boxes"].write_text("not json\n")
    r = run_cli(cli_args(dict(kw, out=tmp_path / "o3")))
    assert r.returncode == 2
    assert "face_boxes.jsonl:1: malformed JSON" in r.stderr
