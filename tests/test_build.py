"""Tests for the RetriBooru construction pipeline (data/build.py): filters, order-sensitive answer
matching, (character, artist) grouping, annotations format, stats, charts, truth metrics, errors
and the CLI; the rules that keep references from leaking the target (near-duplicate images by
perceptual hash, colourless answers, --max-similar) and the validator's near-duplicate check. Every
test writes its own tiny dataset (8x8 noise PNGs) into tmp_path, or adds copies to a small
synthetic one (data.synthetic, 64 px)."""
import io
import json
import os
import shutil
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import build as B
from data.synthetic import CLOTH_COLORS, generate
from data.validate import validate
from helpers import UNIFORM, row, write_dataset

REPO = Path(__file__).resolve().parents[1]


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
        "no_image": 1, "no_vqa_answer": 1, "no_mask": 1, "no_face_box": 1, "size_mismatch": 0,
        "bad_face_box": 0, "bad_mask": 0, "no_link": 2}
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


# ---- references that cannot leak the target ------------------------------------------------------

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """4 identities x 3 images at 64 px (+ 1 noise image); every image of one identity is another
    pose, position, scale and background."""
    root = tmp_path_factory.mktemp("synth")
    generate(root, identities=4, images_per_identity=3, size=64, seed=5)
    return root


def records(root):
    return [json.loads(l) for l in (Path(root) / "annotations.jsonl").read_text().splitlines()]


def resaved(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def cropped(im, frac=0.03):
    """``frac`` of the width and of the height cut off the left and the top."""
    dx, dy = round(frac * im.width), round(frac * im.height)
    return im.crop((dx, dy, im.width, im.height)), (dx, dy)


def test_hash_resave_crop_and_other_images(synth):
    T = B.NEAR_DUPLICATE_DISTANCE
    recs = records(synth)
    hashes = {}
    for r in recs:
        with Image.open(synth / r["image"]) as f:
            im = f.convert("RGB")
        h = hashes[r["id"]] = B.image_hash(synth / r["image"])
        assert 0 <= h < 2 ** B.HASH_BITS and B.image_hash(im) == h        # a path or an image
        assert B.image_hash(resaved(im, "PNG")) == h                        # a re-save: identical
        assert B.hash_distance(h, B.image_hash(resaved(im, "JPEG", quality=90))) <= 5
        assert B.hash_distance(h, B.image_hash(im.resize((96, 96), Image.LANCZOS))) <= T // 2
        crop = cropped(im)[0]
        assert crop.size == (62, 62)
        assert B.hash_distance(h, B.image_hash(crop)) <= T                  # a 3 % crop: small
        assert B.hash_distance(h, B.image_hash(resaved(crop, "JPEG", quality=90))) <= T
    # Every other picture, another pose of the same identity included, is far: at least 29 bits.
    for a, b in combinations(recs, 2):
        assert B.hash_distance(hashes[a["id"]], hashes[b["id"]]) > T + 4, (a["id"], b["id"])
    assert B.hash_distance(0, 2 ** B.HASH_BITS - 1) == B.HASH_BITS
    assert B.is_near_duplicate(5, 5) and not B.is_near_duplicate(0, 2 ** (T + 1) - 1)


def _add_copy(root, original, new_id, image):
    """Add ``image`` (a copy of sample ``original``) to the raw inputs under ``new_id``: same tags,
    answer, identity; mask and face box cut like the image."""
    raw = root / "raw"

    def lines(name):
        return [json.loads(l) for l in (raw / name).read_text().splitlines()]

    def append(name, obj):
        with open(raw / name, "a") as f:
            f.write(json.dumps(obj) + "\n")

    image, (dx, dy) = image
    image.save(root / "images" / f"{new_id}.jpg", quality=90)
    meta = next(m for m in lines("metadata.jsonl") if m["id"] == original)
    append("metadata.jsonl", dict(meta, id=new_id, image=f"images/{new_id}.jpg", width=image.width,
                                  height=image.height))
    answer = next(v for v in lines("vqa_answers.jsonl") if v["id"] == original)
    append("vqa_answers.jsonl", dict(answer, id=new_id))
    x0, y0, x1, y1 = next(b for b in lines("face_boxes.jsonl") if b["id"] == original)["face_bbox"]
    append("face_boxes.jsonl", {"id": new_id, "face_bbox": [max(x0 - dx, 0), max(y0 - dy, 0), x1 - dx, y1 - dy]})
    identity = next(t for t in lines("identities.jsonl") if t["id"] == original)
    append("identities.jsonl", dict(identity, id=new_id))
    with Image.open(root / "masks" / f"{original}.png") as m:
        m.crop((dx, dy, m.width, m.height)).save(root / "masks" / f"{new_id}.png")


def _build_synth(root, out, **kw):
    raw = root / "raw"
    return B.build(raw / "metadata.jsonl", raw / "vqa_answers.jsonl", raw / "cloth_tags.txt",
                   root / "masks", raw / "face_boxes.jsonl", out, root=root,
                   truth=raw / "identities.jsonl", **kw)


def test_a_copy_of_the_target_is_never_its_reference(synth, tmp_path):
    """A re-upload and a re-saved 3 %-cropped copy, with the very same VQA answers, link to the
    other images of their identity but never to the picture they copy."""
    root = tmp_path / "ds"
    shutil.copytree(synth, root)
    x, y = "000000", "000001"
    with Image.open(root / "images" / f"{x}.png") as im:
        _add_copy(root, x, "900000", (im.convert("RGB"), (0, 0)))           # re-upload (as JPEG)
    with Image.open(root / "images" / f"{y}.png") as im:
        _add_copy(root, y, "900001", cropped(im.convert("RGB")))            # 3 % crop + JPEG
    stats = _build_synth(root, tmp_path / "out")
    sim = {a["id"]: a["similar"] for a in read_ann(tmp_path / "out")}
    before = {r["id"]: r["similar"] for r in records(synth)}
    for target, copy in ((x, "900000"), (y, "900001")):
        assert copy not in sim[target] and target not in sim[copy]
        assert sim[target] == before[target] == sim[copy]                   # the real references stay
        for other in before[target]:
            assert sorted(sim[other]) == sorted(before[other] + [copy])
    # Every link in the built file is between pictures more than the threshold apart.
    hashes = {a["id"]: B.image_hash(tmp_path / "out" / a["image"]) for a in read_ann(tmp_path / "out")}
    for i, refs in sim.items():
        for j in refs:
            assert B.hash_distance(hashes[i], hashes[j]) > B.NEAR_DUPLICATE_DISTANCE
    # 4 identities of 3 -> 12 links; each copy adds 3 candidates, of which 1 is its original.
    assert stats["links"] == {"candidates": 18, "kept": 16, "near_duplicate_distance": B.NEAR_DUPLICATE_DISTANCE,
                              "max_similar": None,
                              "removed": {"colourless_answer": 0, "near_duplicate": 2, "max_similar": 0}}
    assert stats["kept_samples"] == 14 and stats["clusters"] == 4
    t = stats["truth"]   # the copy/original pairs are the same identity but not references
    assert t["precision"] == 1.0 and t["predicted_pairs"] == 16 and t["true_pairs"] == 18
    assert t["recall"] == pytest.approx(16 / 18)
    assert validate(tmp_path / "out") == []


def test_colourless_answers_link_nothing(tmp_path):
    rows = [row(1, answer="yes"), row(2, answer=" Yes"), row(3, answer="yes"),   # no colour: 3 links gone
            row(4, answer="the character is smiling"), row(5, answer="The character is smiling"),
            row(6, answer="Light-blue and white"), row(7, answer="light-blue  and white"),  # colours
            row(8, answer="navy/gold"), row(9, answer="navy/gold")]
    kw = write_dataset(tmp_path, rows)
    stats = B.build(**kw)
    sim = {a["id"]: a["similar"] for a in read_ann(kw["out"])}
    assert sim == {6: [7], 7: [6], 8: [9], 9: [8]}
    assert stats["links"]["removed"] == {"colourless_answer": 4, "near_duplicate": 0, "max_similar": 0}
    assert stats["links"]["candidates"] == 6 and stats["links"]["kept"] == 2
    assert stats["dropped"]["no_link"] == 5 and stats["clusters"] == 2
    assert set(CLOTH_COLORS) <= B.COLOUR_WORDS              # every colour the generator answers
    assert B.names_colour("Red and white") and B.names_colour("dark-grey, silver")
    for answer in ("", "yes", "none", "i don't know", "the character is smiling", "dark and light"):
        assert not B.names_colour(answer), answer


def test_max_similar_caps_symmetrically(tmp_path):
    rows = ([row(i) for i in range(1, 6)]                                # a clique of 5
            + [row(i, answer="blue and black") for i in (6, 7, 8, 9)]    # a clique of 4
            + [row(10, char="bob"), row(11, char="bob")])                # a pair
    kw = write_dataset(tmp_path, rows)
    stats = B.build(**kw, max_similar=2)
    sim = {a["id"]: a["similar"] for a in read_ann(kw["out"])}
    # First links in id order while both ends have room; 9, left without one, takes 6's last (6-8).
    assert sim == {1: [2, 3], 2: [1, 3], 3: [1, 2], 4: [5], 5: [4],
                   6: [7, 9], 7: [6, 8], 8: [7], 9: [6], 10: [11], 11: [10]}
    assert stats["links"]["removed"] == {"colourless_answer": 0, "near_duplicate": 0, "max_similar": 9}
    assert stats["links"]["candidates"] == 17 and stats["links"]["kept"] == 8    # 10 + 6 + 1 -> 4 + 3 + 1
    assert stats["links"]["max_similar"] == 2
    assert stats["references_histogram"] == {"1": 6, "2": 5}
    assert stats["dropped"]["no_link"] == 0 and stats["clusters"] == 4
    full = B.build(**dict(kw, out=tmp_path / "uncapped"))                 # the default: no cap
    assert full["links"]["removed"]["max_similar"] == 0 and full["references_histogram"] == {"1": 2, "3": 4, "4": 5}
    with pytest.raises(B.BuildError, match="max_similar"):
        B.build(**kw, max_similar=0)


def test_cap_links_directly():
    clique = lambda ids: {i: [j for j in ids if j != i] for i in ids}
    kept, removed = B.cap_links(clique([1, 2, 3]), 1)                    # n=1, odd: 3 is left alone
    assert kept == {1: [2], 2: [1]} and removed == 2
    kept, removed = B.cap_links(clique(list(range(1, 8))), 3)
    assert all(len(v) <= 3 for v in kept.values()) and set(kept) == set(range(1, 8))
    assert all(i in kept[j] for i, v in kept.items() for j in v)       # symmetric
    assert removed == 21 - sum(len(v) for v in kept.values()) // 2
    kept, removed = B.cap_links({1: [2], 2: [1, 3], 3: [2]}, 5)         # under the cap: unchanged
    assert kept == {1: [2], 2: [1, 3], 3: [2]} and removed == 0


def test_stats_count_each_rule(tmp_path):
    rows = ([row(i) for i in range(1, 5)] + [row(5, pic=1)]           # 5 re-uploads 1
            + [row(6, answer="yes"), row(7, answer="yes")])               # colourless
    kw = write_dataset(tmp_path, rows)
    stats = B.build(**kw, max_similar=2)
    sim = {a["id"]: a["similar"] for a in read_ann(kw["out"])}
    assert sim == {1: [2, 3], 2: [1, 3], 3: [1, 2], 4: [5], 5: [4]}       # never 1-5
    assert stats["links"] == {"candidates": 11, "kept": 4, "near_duplicate_distance": B.NEAR_DUPLICATE_DISTANCE,
                              "max_similar": 2,
                              "removed": {"colourless_answer": 1, "near_duplicate": 1, "max_similar": 5}}
    assert stats["dropped"]["no_link"] == 2
    assert json.loads((Path(kw["out"]) / "stats.json").read_text())["links"] == stats["links"]
    # Without the cap: 1 and 5 still never reference each other, the rest of the clique stays.
    stats = B.build(**dict(kw, out=tmp_path / "o2"))
    sim = {a["id"]: a["similar"] for a in read_ann(tmp_path / "o2")}
    assert sim[1] == [2, 3, 4] and sim[5] == [2, 3, 4] and sim[2] == [1, 3, 4, 5]
    assert stats["links"]["removed"] == {"colourless_answer": 1, "near_duplicate": 1, "max_similar": 0}


def test_unreadable_image_is_dropped_as_no_image(tmp_path):
    kw = write_dataset(tmp_path, [row(1), row(2), row(3)])
    (kw["metadata"].parent.parent / "images" / "3.png").write_bytes(b"not a png")
    stats = B.build(**kw)
    assert {a["id"]: a["similar"] for a in read_ann(kw["out"])} == {1: [2], 2: [1]}
    assert stats["dropped"]["no_image"] == 1 and stats["passed_filters"] == 2
    assert stats["links"]["candidates"] == 1


def test_cli_max_similar(tmp_path):
    kw = write_dataset(tmp_path, [row(1), row(2), row(3), row(4), row(5, pic=1)])
    r = run_cli(cli_args(kw, max_similar=1))
    assert r.returncode == 0, r.stderr
    assert [a["similar"] for a in read_ann(kw["out"])] == [[2], [1], [4], [3]]
    assert "removed      1  links: near_duplicate" in r.stderr
    # 9 links left after 1-5; n=1 keeps 1-2 and 3-4; 5's partners all have a single link: 5 is dropped.
    assert "removed      7  links: max_similar" in r.stderr and "dropped      1  no_link" in r.stderr
    r = run_cli(cli_args(dict(kw, out=tmp_path / "o2"), max_similar=0))
    assert r.returncode == 2 and "--max-similar must be >= 1" in r.stderr


# ---- the validator's near-duplicate check ---------------------------------------------------------

def _hand_written(root, synth, links):
    """A RetriBooru root written by hand: a = synthetic image 000000, a_copy = it cut by 3 % and
    re-saved, b = another image of its identity; ``links`` are the similar pairs."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    with Image.open(synth / "images" / "000000.png") as im:
        a = im.convert("RGB")
    with Image.open(synth / "images" / "000006.png") as im:
        b = im.convert("RGB")
    pictures = {"a": a, "a_copy": resaved(cropped(a)[0], "JPEG", quality=90), "b": b}
    recs = []
    for sid, im in pictures.items():
        im.save(root / "images" / f"{sid}.png")
        Image.new("L", im.size, 255).save(root / "masks" / f"{sid}.png")
        recs.append({"id": sid, "image": f"images/{sid}.png", "mask": f"masks/{sid}.png",
                     "width": im.width, "height": im.height, "character": "c", "artist": "a",
                     "tags": ["1girl", "shirt"], "cloth_tags": ["shirt"], "prompt": "1girl, shirt",
                     "face_bbox": [10, 2, 40, 30],
                     "similar": sorted({y for x, y in links if x == sid} | {x for x, y in links if y == sid})})
    recs = [r for r in recs if r["similar"]]
    (root / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return B.hash_distance(B.image_hash(a), B.image_hash(pictures["a_copy"]))


def test_validator_flags_near_duplicate_links(synth, tmp_path):
    d = _hand_written(tmp_path / "bad", synth, [("a", "a_copy"), ("a", "b"), ("a_copy", "b")])
    assert 0 < d <= B.NEAR_DUPLICATE_DISTANCE
    problems = validate(tmp_path / "bad")
    assert problems == [f"samples a and a_copy: similar links near-duplicate images "
                        f"(images/a.png, images/a_copy.png: hash distance {d} <= {B.NEAR_DUPLICATE_DISTANCE})"]
    assert validate(tmp_path / "bad", check_files=False) == []           # the check needs the files
    r = subprocess.run([sys.executable, "-m", "data.validate", str(tmp_path / "bad")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "samples a and a_copy" in r.stdout and "1 problems" in r.stderr
    # The same pictures, linked only across different pictures, are clean.
    _hand_written(tmp_path / "good", synth, [("a", "b"), ("a_copy", "b")])
    assert validate(tmp_path / "good") == []
    # A missing image is reported once, as missing, not hashed.
    (tmp_path / "bad" / "images" / "a_copy.png").unlink()
    assert validate(tmp_path / "bad") == ["sample a_copy: image images/a_copy.png is missing"]
