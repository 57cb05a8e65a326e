"""Fault injection on the data commands' inputs: out-of-range values are dropped or refused in one
line, and nothing written before is lost.

1. data.build drops a sample whose face box is not finite, empty, inverted or outside the image
   (`bad_face_box`), whose image file is not the metadata's size (`size_mismatch`) or whose mask is
   not a readable image of that size (`bad_mask`), counting each; it never writes NaN or Infinity,
   and its output stays clean by data.validate.
2. `data.build --out FILE` and `data.synthetic --out FILE` are one line, status 2.
3. `python -m data.synthetic` refuses a non-empty --out; `--replace` removes the earlier synthetic
   dataset's files (and no other file) first.
4. Sizes that cannot fit in memory are refused in one line naming the option, the value and the
   bound: sample.py --height / --width / --ref-size, data.synthetic --size.

D is a small synthetic dataset (data.synthetic.generate, 32 px), copied per test.
"""
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from data import build as B
from data.synthetic import generate
from data.synthetic import generator as G
from data.validate import validate

# ---- helpers ----------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict:
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(err: str, prefix: str) -> str:
    """The one error line of a run's stderr (no traceback, nothing else said to be an error)."""
    assert "Traceback" not in err, err
    found = [line for line in err.splitlines() if "error:" in line]   # usage names --vqa-error-rate
    assert len(found) == 1, err
    assert found[0].startswith(prefix), err
    return found[0]


def run(capsys, main, argv):
    """Run a command's main() in-process; (status, stderr). An argparse error's SystemExit is its status."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_lines(path: Path, objs) -> None:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))


def replace_line(path: Path, id_, text: str) -> None:
    """The JSON line of `id_` in `path` becomes `text`, written as it is (NaN and 1e999 included)."""
    objs = [text if o["id"] == id_ else o for o in lines(path)]
    assert text in objs
    write_lines(path, objs)


@pytest.fixture(scope="module")
def D(tmp_path_factory):
    """3 identities x 3 images at 32 px, 1 noise image."""
    root = tmp_path_factory.mktemp("D") / "syn"
    generate(root, identities=3, images_per_identity=3, size=32, seed=0, noise_fraction=0.1)
    return root


@pytest.fixture
def d(D, tmp_path):
    """A copy of D to tamper with, and the id of its first sample (whose identity keeps two more)."""
    root = tmp_path / "d"
    shutil.copytree(D, root)
    return root, lines(root / "annotations.jsonl")[0]["id"]


def build_args(root: Path, out: Path) -> list:
    raw = root / "raw"
    return ["--metadata", raw / "metadata.jsonl", "--vqa", raw / "vqa_answers.jsonl", "--cloth-tags",
            raw / "cloth_tags.txt", "--masks", root / "masks", "--boxes", raw / "face_boxes.jsonl", "--out", out,
            "--root", root]


def build(root: Path, out: Path) -> dict:
    raw = root / "raw"
    return B.build(raw / "metadata.jsonl", raw / "vqa_answers.jsonl", raw / "cloth_tags.txt", root / "masks",
                   raw / "face_boxes.jsonl", out, root=root)


def strict_json(path: Path) -> list[dict]:
    """The file's lines as JSON that has no NaN / Infinity (which json.loads would accept)."""
    def refuse(constant):
        raise AssertionError(f"{path}: {constant} is not JSON")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def assert_dropped_alone(root: Path, out: Path, stats: dict, victim: str, reason: str) -> None:
    """`victim` (and no other clean sample) is dropped under `reason`; the output is clean."""
    clean = {r["id"] for r in lines(root / "annotations.jsonl")}
    kept = strict_json(out / "annotations.jsonl")
    assert {r["id"] for r in kept} == clean - {victim}
    assert not any(victim in r["similar"] for r in kept)
    assert stats["dropped"][reason] == 1
    assert sum(stats["dropped"][r] for r in ("size_mismatch", "bad_face_box", "bad_mask")) == 1
    json.loads((out / "stats.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in stats.json"))
    assert validate(out) == []


# ---- 1. data.build drops what the validator would refuse -----------------------------------------------

def test_good_input_keeps_every_clean_sample(D, tmp_path):
    stats = build(D, tmp_path / "out")
    assert {r["id"] for r in strict_json(tmp_path / "out" / "annotations.jsonl")} == \
        {r["id"] for r in lines(D / "annotations.jsonl")}
    assert {r: stats["dropped"][r] for r in ("size_mismatch", "bad_face_box", "bad_mask")} == \
        {"size_mismatch": 0, "bad_face_box": 0, "bad_mask": 0}
    assert list(stats["dropped"]) == list(B.DROP_REASONS)
    assert validate(tmp_path / "out") == []


@pytest.mark.parametrize("box", ["[50, 50, 10, 10]",            # inverted
                                 "[NaN, 1, 1e308, 1e999]",      # not finite (1e999 reads as inf)
                                 "[1, 1, Infinity, 5]",
                                 "[0, 0, 33, 10]",              # outside the 32 px image
                                 "[-1, 0, 10, 10]",
                                 "[5, 5, 5, 9]"])               # empty
def test_a_face_box_out_of_range_is_dropped(d, tmp_path, box):
    root, victim = d
    replace_line(root / "raw" / "face_boxes.jsonl", victim, f'{{"id": "{victim}", "face_bbox": {box}}}')
    stats = build(root, tmp_path / "out")
    assert_dropped_alone(root, tmp_path / "out", stats, victim, "bad_face_box")


def test_box_inside_takes_huge_integers():
    assert B.box_inside([0, 0, 32, 32], 32, 32) and B.box_inside([0.5, 1, 31.5, 2], 32, 32)
    assert not B.box_inside([0, 0, 10 ** 400, 5], 32, 32)
    assert not B.box_inside([float("nan"), 0, 5, 5], 32, 32)
    assert not B.box_inside([0, 0, 5, float("inf")], 32, 32)


@pytest.mark.parametrize("mask", ["not an image", "truncated", "wrong size"])
def test_a_mask_that_is_not_an_image_of_the_size_is_dropped(d, tmp_path, mask):
    root, victim = d
    path = root / "masks" / f"{victim}.png"
    if mask == "not an image":
        path.write_bytes(b"not a png")
    elif mask == "truncated":
        path.write_bytes(path.read_bytes()[:60])
    else:
        Image.new("L", (31, 32), 255).save(path)
    stats = build(root, tmp_path / "out")
    assert_dropped_alone(root, tmp_path / "out", stats, victim, "bad_mask")


@pytest.mark.parametrize("what", ["metadata width", "metadata height", "image file"])
def test_a_recorded_size_that_is_not_the_files_is_dropped(d, tmp_path, what):
    root, victim = d
    meta = root / "raw" / "metadata.jsonl"
    if what == "image file":
        Image.new("RGB", (40, 40), (200, 30, 30)).save(root / "images" / f"{victim}.png")
    else:
        row = next(o for o in lines(meta) if o["id"] == victim)
        row[what.split()[1]] = 31
        replace_line(meta, victim, json.dumps(row))
    stats = build(root, tmp_path / "out")
    assert_dropped_alone(root, tmp_path / "out", stats, victim, "size_mismatch")


def test_the_cli_counts_and_names_the_first_drop(d, tmp_path, capsys):
    root, victim = d
    replace_line(root / "raw" / "face_boxes.jsonl", victim, f'{{"id": "{victim}", "face_bbox": [NaN, 1, 2, 3]}}')
    rc, err = run(capsys, B.main, build_args(root, tmp_path / "out"))
    assert rc == 0, err
    assert "Traceback" not in err and "dropped      1  bad_face_box" in err
    assert f"face box [nan, 1, 2, 3] of {root / 'images' / victim}.png is not inside its 32x32 pixels" in err
    strict_json(tmp_path / "out" / "annotations.jsonl")


def test_a_non_finite_id_is_refused_naming_file_and_line(d, tmp_path, capsys):
    root, victim = d
    meta = root / "raw" / "metadata.jsonl"
    row = next(o for o in lines(meta) if o["id"] == victim)
    n = [o["id"] for o in lines(meta)].index(victim) + 1
    replace_line(meta, victim, json.dumps(dict(row, id=float("nan"))))
    rc, err = run(capsys, B.main, build_args(root, tmp_path / "out"))
    assert rc == 2
    assert one_error(err, "error: ") == (f"error: {meta}:{n}: field 'id' is nan, expected a string or a finite "
                                         f"number")
    assert not (tmp_path / "out").exists()


# ---- 2. --out naming a file ----------------------------------------------------------------------------

def test_build_out_naming_a_file_is_one_line(D, tmp_path, capsys):
    file = tmp_path / "built.txt"
    file.write_text("an earlier file")
    rc, err = run(capsys, B.main, build_args(D, file))
    assert rc == 2
    assert one_error(err, "error: ") == (f"error: --out {file} is not a folder; expected a folder or a path that "
                                         f"does not exist yet")
    rc, err = run(capsys, B.main, build_args(D, file / "sub"))
    assert rc == 2
    assert one_error(err, "error: ") == (f"error: --out {file / 'sub'} lies under {file}, not a folder; expected a "
                                         f"folder or a path that does not exist yet")
    assert file.read_text() == "an earlier file"
    with pytest.raises(B.BuildError, match="is not a folder"):
        build(D, file)


# ---- 3. data.synthetic --out: not empty, --replace -------------------------------------------------------

SMALL = ["--identities", 2, "--images-per-identity", 2, "--size", 32, "--noise-fraction", 0]

UNRELATED = {"notes.txt": b"mine", "stats.json": b"{}", "images/README.txt": b"about the images",
             "masks/outline.png": b"not generated", "raw/extra.jsonl": b"{}\n", "mine/7.png": b"digits, elsewhere"}


def test_synthetic_refuses_a_non_empty_out_and_replace_keeps_other_files(D, tmp_path, capsys):
    root = tmp_path / "d"
    shutil.copytree(D, root)
    for rel, data in UNRELATED.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    before = snapshot(root)
    rc, err = run(capsys, G.main, ["--out", root, *SMALL])
    assert rc == 2
    line = one_error(err, "python -m data.synthetic: error: ")
    assert f"--out {root} is not empty (" in line and "--replace" in line
    assert snapshot(root) == before

    rc, err = run(capsys, G.main, ["--out", root, *SMALL, "--replace"])
    assert rc == 0, err
    assert "Traceback" not in err
    assert "kept everything else (6 entries: images, masks, mine, notes.txt, raw, ...)" in err
    ids = [r["id"] for r in lines(root / "raw" / "metadata.jsonl")]
    assert len(ids) == 4
    for folder in ("images", "masks"):           # no stale image of the earlier 10: only the new 4, and ours
        assert sorted(p.name for p in (root / folder).iterdir() if p.suffix == ".png" and p.stem.isdigit()) == \
            sorted(f"{i}.png" for i in ids)
    after = snapshot(root)
    for rel, data in UNRELATED.items():
        assert after[Path(rel)] == data
    assert validate(root) == []
    # The same arguments into a new folder give the very same dataset.
    rc, err = run(capsys, G.main, ["--out", tmp_path / "fresh", *SMALL])
    assert rc == 0, err
    fresh = snapshot(tmp_path / "fresh")
    assert {k: v for k, v in after.items() if str(k) not in UNRELATED} == fresh


def test_remove_dataset_removes_only_what_the_generator_writes(D, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(D, root)
    assert G.remove_dataset(root) == [] and not any(root.iterdir())       # nothing else: nothing left
    shutil.rmtree(root)
    shutil.copytree(D, root)
    (root / "images" / "keep.jpg").write_bytes(b"x")
    (root / "raw" / "metadata.jsonl.bak").write_bytes(b"y")
    assert G.remove_dataset(root) == ["images", "raw"]
    assert snapshot(root) == {Path("images/keep.jpg"): b"x", Path("raw/metadata.jsonl.bak"): b"y"}


def test_synthetic_writes_into_a_new_or_empty_folder_and_refuses_a_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, err = run(capsys, G.main, ["--out", tmp_path / "empty", *SMALL])
    assert rc == 0, err
    file = tmp_path / "file"
    file.write_text("kept")
    for out, where in ((file, "is not a folder"), (file / "sub", f"lies under {file}, not a folder")):
        rc, err = run(capsys, G.main, ["--out", out, *SMALL, "--replace"])
        assert rc == 2
        assert one_error(err, "python -m data.synthetic: error: ") == \
            f"python -m data.synthetic: error: --out {out} {where}; expected a new or empty folder"
    assert file.read_text() == "kept"


def test_generate_in_process_still_writes_into_a_non_empty_folder(tmp_path):
    """experiments/recipe.py regenerates an interrupted dataset in place through generate()."""
    (tmp_path / "notes.txt").write_text("kept")
    generate(tmp_path, identities=2, images_per_identity=2, size=32, seed=0, noise_fraction=0.0)
    assert (tmp_path / "notes.txt").read_text() == "kept" and validate(tmp_path) == []


# ---- 4. sizes that cannot fit -----------------------------------------------------------------------------

def test_synthetic_size_is_bounded(tmp_path, capsys):
    out = tmp_path / "big"
    rc, err = run(capsys, G.main, ["--out", out, "--identities", 2, "--images-per-identity", 2, "--size", 100000])
    assert rc == 2
    assert one_error(err, "python -m data.synthetic: error: ") == (
        f"python -m data.synthetic: error: size must be <= {G.MAX_SIZE} (images are drawn at 4x their size), "
        f"got 100000")
    assert not out.exists()
    with pytest.raises(ValueError, match="size must be <= 1024"):
        generate(out, identities=2, images_per_identity=2, size=1025, seed=0)
    assert not out.exists()
    G._check_args(2, 2, 1024, 0, 0.0, 0.0)      # the bound itself is taken


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny preset's base and --config (sample.py checks them, builds nothing here)."""
    from training.presets import build_tiny, save_base
    root = tmp_path_factory.mktemp("tiny")
    return save_base(build_tiny(0), root)


def sample_args(tiny, out, *extra):
    weights, config = tiny
    return ["--weights", weights, "--config", config, "--prompt", "x", "--steps", 2, "--height", 16, "--width", 16,
            "--device", "cpu", "--out", out, *extra]


@pytest.mark.parametrize("option,value", [("--ref-size", 100000), ("--height", 100000), ("--width", 4096)])
def test_sample_sizes_are_bounded(tiny, tmp_path, capsys, option, value):
    import sample
    rc, err = run(capsys, sample.main, sample_args(tiny, tmp_path / "out", option, value))
    assert rc == 2
    assert one_error(err, "sample.py: error: ") == (f"sample.py: error: {option} {value} is too large: expected at "
                                                    f"most {sample.MAX_SIDE} pixels (SD v1.5 works at 384 to 1024)")
    assert not list((tmp_path / "out").glob("*.png"))


def test_sample_takes_sizes_up_to_the_bound(tiny, tmp_path):
    import sample
    args = sample.parse_args([str(a) for a in sample_args(tiny, tmp_path / "out", "--ref-size", 2048,
                                                          "--height", 2048, "--width", 2048)])
    assert sample.check_args(args) == []
