"""The miniature leakage benchmark (experiments/leakage.py), its scene scorer (data/synthetic/scene_score.py)
and the old command `python -m eval.leakage`."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.images import fit_and_pad, open_image
from data.annotations import load_records
from data.synthetic import SCENE_BACKGROUNDS, generate, scene_score
from experiments import leakage

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--identities", "2", "--images-per-identity", "4", "--heldout", "2", "--steps", "2", "--samples", "2",
       "--sample-steps", "2", "--seeds", "0", "--ip-scales", "0.5", "1.0",
       "--train-args", "--batch-size", "4", "--val-steps", "2", "--val-count", "1"]


def uint8(tensor):
    return ((tensor.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """32 real scene images at the sampling size (24 px, fitted as training fits them) and their scenes."""
    root = tmp_path_factory.mktemp("scenes")
    generate(root, 8, 4, 48, 11, noise_fraction=0.0, figure_scale=(0.8, 0.95), hats=False, scene=True)
    records = load_records(root)
    images = [uint8(fit_and_pad(open_image(root / r["image"]), 24)[0]) for r in records]
    return images, [scene_score.scene_of(r["tags"]) for r in records]


def test_background_and_arms_read_real_images(scenes):
    """The readers the benchmark scores read known images right (>= 90%, the bar for being scored);
    on images whose scenes are shuffled they score what chance gives, not more."""
    images, truth = scenes
    acc = scene_score.calibrate(images, truth, ("background", "arms"))
    assert acc["background"] == 1.0 and acc["arms"] >= 0.9, acc
    assert scene_score.reliable({**acc, "facing": 0.5}) == ["background", "arms"]
    shuffled = truth[5:] + truth[:5]
    wrong = scene_score.calibrate(images, shuffled, ("background", "arms"))
    assert wrong["background"] < 0.6 and wrong["arms"] < 0.75, wrong


def test_readers_stand_grainy_backgrounds(scenes):
    """Generated samples have grainy backgrounds: with Gaussian noise of sigma 12 on the real images
    the readers still read them (the noise-adaptive threshold and the speck filter)."""
    images, truth = scenes
    rng = np.random.default_rng(3)
    noisy = [np.clip(im + rng.normal(0, 12, im.shape), 0, 255).astype(np.uint8) for im in images]
    acc = scene_score.calibrate(noisy, truth, ("background", "arms"))
    assert acc["background"] == 1.0 and acc["arms"] >= 0.9, acc


def test_readers_refuse_what_is_no_scene():
    """A border of no palette colour has no scene background; noise and a blank image have no figure;
    a flat palette colour is that background."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    assert scene_score.background(noise) is None and scene_score.arms(noise) is None
    for name, colour in SCENE_BACKGROUNDS.items():
        flat = np.full((24, 24, 3), colour, np.uint8)
        assert scene_score.background(flat) == name and scene_score.arms(flat) is None
    assert scene_score.background(np.full((24, 24, 3), (250, 40, 40), np.uint8)) is None


def test_scene_of_tags():
    assert scene_score.scene_of(["1girl", "arms_up", "grey_background", "facing_left", "red_hair"]) == \
        {"background": "grey", "arms": "arms_up", "facing": "facing_left"}
    assert scene_score.scene_of(["simple_background"]) == {"background": None, "arms": None, "facing": None}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The whole pipeline at toy size: 3 methods x 2 settings, one seed, 2 steps each, the IP-Adapter
    at two scales and the base-only row (about a minute)."""
    out = tmp_path_factory.mktemp("leakage")
    res = subprocess.run([sys.executable, "-m", "experiments.leakage", "--out", str(out), *TOY], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


@pytest.mark.slow
def test_toy_pipeline_writes_the_table(toy):
    out, res = toy
    table = json.loads((out / "table.json").read_text())
    rows = table["rows"]
    assert [(r["method"], r["setting"], r["scale"]) for r in rows] == \
        [("retrinet", "a", None), ("retrinet", "b", None), ("controlnet", "a", None), ("controlnet", "b", None),
         ("ip-adapter", "a", 0.5), ("ip-adapter", "a", 1.0), ("ip-adapter", "b", 0.5), ("ip-adapter", "b", 1.0),
         ("base", "", None)]
    assert table["scored_scene_attributes"][:1] == ["background"]
    for r in rows:
        assert r["seeds"] == 1
        for k in ("identification", "prompt_background", "copies_background", "joint"):
            assert 0.0 <= r[k] <= 1.0, (k, r[k])
        assert -1.0 <= r["clip_i"] <= 1.0 and -1.0 <= r["clip_t"] <= 1.0
    # the paper's element-wise product: the mean of per-sample CLIP-I x CLIP-T, not the product of means
    samples = json.loads((out / "runs" / "retrinet-a-s0" / "eval" / "result.json").read_text())["samples"]
    assert rows[0]["clip_product"] == pytest.approx(np.mean([x["clip_i"] * x["clip_t"] for x in samples]))
    assert table["chance"]["identification"] == 0.5 and table["chance"]["prompt_background"] == 0.25
    assert set(table["chance"]["copies_background"]) == {"K=1", "K=2"}   # copying's chance depends on K
    claims = table["claims"]
    assert {(c["method"], c["measure"]) for c in claims} >= {("retrinet", "copies_background"),
                                                            ("controlnet", "identified"), ("ip-adapter", "joint")}
    for c in claims:
        assert 0 < c["p"] <= 1 and 0 < c["p_opposite"] <= 1 and c["pairs"] == 4
        assert c["verdict"] in ("reproduced", "reversed", "not shown")
    # the scorers read the known held-out images (their ceiling row)
    real = table["scorer_on_real_images"]
    assert real["background"] == 1.0 and real["arms"] >= 0.9 and real["identification"] >= 0.5
    with open(out / "table.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 6 + 2 + 1   # every run and sampling, the extra scales, the base
    md = (out / "table.md").read_text()
    assert "| retrinet | -a |" in md and "| ip-adapter-0.5 | -b |" in md and "base only" in md
    assert "scorer on real images" in md and "## The paper's claims" in md and "| 1 | -b |" in md
    assert Image.open(out / "scatter.png").size[0] > 3 * 300
    assert Image.open(out / "fig3-ip-adapter.png").size[0] > 3 * 64
    for m in leakage.METHODS:
        for s in leakage.SETTINGS:
            run = out / "runs" / f"{m}-{s}-s0"
            folder = run / ("eval-ip0.5" if m == "ip-adapter" else "eval")
            k = leakage.references_for(m)
            assert Image.open(folder / "samples.png").size[0] > (k + 2) * 64
            assert np.load(folder / "samples.npz")["images"].shape == (2 * 2, 24, 24, 3)
            result = json.loads((folder / "result.json").read_text())
            assert len(result["samples"]) == 4 and len(list((folder / "images").glob("*.png"))) == 4
    assert "training 2 steps" in res.stderr


@pytest.mark.slow
def test_second_invocation_reuses_every_run(toy):
    out, _ = toy
    before = (out / "table.json").read_text()
    res = subprocess.run([sys.executable, "-m", "experiments.leakage", "--out", str(out), *TOY], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("trained (2 steps") == 6 and res.stderr.count("evaluated, reused") == 6 + 2 + 1
    assert "training 2 steps" not in res.stderr and "sampling" not in res.stderr
    strip = lambda t: {k: v for k, v in json.loads(t).items() if k != "total_minutes"}
    assert strip((out / "table.json").read_text()) == strip(before)
    other = subprocess.run([sys.executable, "-m", "experiments.leakage", "--out", str(out), *TOY[:6], "--steps", "3",
                            "--seeds", "0", "--methods", "retrinet", "--train-args", "--batch-size", "4"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 1 and "trained for 2 steps, not --steps 3" in other.stderr
    assert "Traceback" not in other.stderr
    data = subprocess.run([sys.executable, "-m", "experiments.leakage", "--out", str(out), *TOY[:4],
                           "--data-seed", "1", "--train-args", "--batch-size", "4"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert data.returncode == 1 and "holds data made with --identities 2" in data.stderr
    assert "--data-seed 0" in data.stderr and "Traceback" not in data.stderr


@pytest.mark.slow
def test_plan_asks_for_a_scene_the_references_do_not_show(toy):
    """References share their arms; the prompt asks for the other arms, the other facing and a
    background no reference shows. Scored on the references themselves, every sample copies and
    none follows the prompt (a property of the scores, no training involved)."""
    out, _ = toy
    plan = leakage.sampling_plan(out / "data-heldout", seed=0)
    assert len(plan) == 2
    for e in plan:
        refs, want = e["reference_scenes"], e["prompt_scene"]
        assert len(refs) == 2 and refs[0]["arms"] == refs[1]["arms"] != want["arms"]
        assert want["background"] not in {r["background"] for r in refs}
        assert want["facing"] != refs[0]["facing"]
        assert e["prompt"].endswith(f"{want['background']} background")
    images = [uint8(fit_and_pad(open_image(e["references"][0]), 24)[0]) for e in plan]
    rows = leakage.per_sample(images, plan, per=1, k=1, attributes=["background", "arms"], seed=0)
    assert all(r["copies_background"] for r in rows)
    assert not any(r["prompt_background"] or r["prompt_arms"] or r["prompt_followed"] or r["joint"] for r in rows)
    assert all(r["identified"] for r in rows)   # the references are their identities


@pytest.mark.parametrize("argv,message", [(["--steps", "0"], "--steps must be >= 1"),
                                          (["--heldout", "1"], "--heldout must be >= 2"),
                                          (["--seeds", "0", "0"], "--seeds must be distinct"),
                                          (["--guidance", "nan"], "--guidance must be a finite number"),
                                          (["--ip-scales", "0.5", "-1"], "--ip-scales must be a finite number"),
                                          (["--methods", "dreambooth"], "invalid choice")])
def test_bad_arguments(tmp_path, argv, message):
    res = subprocess.run([sys.executable, "-m", "experiments.leakage", "--out", str(tmp_path), *argv], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_a_stopped_run_resumes(tmp_path):
    """SIGTERM while a run trains: train.py saves a checkpoint and stops, the benchmark stops with a
    one-line message; the same command again resumes that run from its checkpoint and finishes."""
    import signal
    argv = [sys.executable, "-m", "experiments.leakage", "--out", str(tmp_path), *TOY[:6], "--steps", "60",
            "--methods", "retrinet", "--settings", "a", "--seeds", "0", "--no-base", "--samples", "1",
            "--sample-steps", "2",
            "--train-args", "--batch-size", "4", "--val-steps", "2", "--val-count", "1", "--log-every", "1"]
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "step 3/60" not in seen:
        line = proc.stderr.readline()
        assert line, seen[-2000:]
        seen += line
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM, rest[-2000:]
    assert "training retrinet-a-s0 stopped at step" in rest and "(by SIGTERM)" in rest
    assert "run the same command again" in rest and "sampling" not in rest
    assert "Traceback" not in rest
    run = tmp_path / "runs" / "retrinet-a-s0"
    saved = sorted(run.glob("checkpoints/step-*"))
    assert saved and int(saved[-1].name[5:]) < 60 and not (run / "done.json").exists()
    again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "training 60 steps (resuming)" in again.stderr
    assert json.loads((run / "done.json").read_text())["steps"] == 60
    assert (tmp_path / "table.md").is_file()


def test_scatter_labels_its_points(tmp_path):
    """eval.plots.scatter with a fourth element per series draws each point's label in its series
    colour; without it the plot is as before (no labels)."""
    from eval.plots import PALETTE, scatter
    series = [("setting a", [0.2, 0.5], [0.3, 0.1]), ("setting b", [0.6, 0.4], [0.2, 0.4])]
    scatter(tmp_path / "plain.png", series, xlabel="x", ylabel="y", title="t")
    scatter(tmp_path / "labels.png", [(*s, ["retrinet", "controlnet"]) for s in series], xlabel="x", ylabel="y",
            title="t")
    def near(path, colour):   # pixels of about the colour (the text is antialiased)
        rgb = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
        return int((np.abs(rgb - np.array(colour)).max(axis=1) <= 60).sum())

    for colour in PALETTE[:2]:
        assert near(tmp_path / "labels.png", colour) > near(tmp_path / "plain.png", colour) + 200


def test_old_command_hands_over(tmp_path):
    """`python -m eval.leakage ...`: one deprecation line on stderr, then the benchmark itself with the
    same arguments and exit status; importing eval.leakage loads nothing that trains."""
    res = subprocess.run([sys.executable, "-m", "eval.leakage", "--out", str(tmp_path), "--steps", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert lines[0] == "python -m eval.leakage is deprecated: use python -m experiments.leakage (running it now)"
    assert res.stderr.count("deprecated") == 1
    assert "usage: python -m experiments.leakage" in res.stderr and "--steps must be >= 1" in res.stderr
    loaded = subprocess.run([sys.executable, "-c", "import sys, eval.leakage; print(sorted({m.split('.')[0] for m in "
                             "sys.modules} & {'experiments', 'training', 'retrinet', 'torch'}))"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr


def _result(values: dict, n: int = 40, seed: int = 0) -> dict:
    """A fake evaluation: per-sample values drawn around `values` (binary measures as 0/1)."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        row = {}
        for k, v in values.items():
            row[k] = bool(rng.random() < v) if k in ("identified", "copies_background", "prompt_background", "joint") \
                else float(v + rng.normal(0, 0.01))
        samples.append(row)
    return {"samples": samples}


def test_claims_read_the_pairs_pooled_over_seeds():
    """-a copies far more and -b follows far more: (i) and (ii) reproduced; a measure equal in both
    settings is not shown; ControlNet identifying better under -b reverses (iv)."""
    results = {}
    for seed in (0, 1, 2):
        a = {"copies_background": 0.9, "prompt_background": 0.1, "clip_t": 0.30, "identified": 0.2, "clip_i": 0.5,
             "joint": 0.05, "clip_product": 0.15}
        b = {"copies_background": 0.2, "prompt_background": 0.7, "clip_t": 0.35, "identified": 0.8, "clip_i": 0.5,
             "joint": 0.05, "clip_product": 0.15}
        for method in leakage.METHODS:
            scale = 0.5 if method == "ip-adapter" else None
            results[(method, "a", seed, scale)] = _result(a, seed=seed)
            results[(method, "b", seed, scale)] = _result(b, seed=seed + 10)
    got = {(c["claim"][:5], c["method"], c["measure"]): c for c in leakage.claims(results, [0, 1, 2], 0.5)}
    assert got[("(i) -", "retrinet", "copies_background")]["verdict"] == "reproduced"
    assert got[("(ii) ", "ip-adapter", "prompt_background")]["verdict"] == "reproduced"
    assert got[("(ii) ", "controlnet", "clip_t")]["verdict"] == "reproduced"
    assert got[("(iv) ", "controlnet", "identified")]["verdict"] == "reversed"
    same = got[("(iii)", "retrinet", "joint")]
    assert same["pairs"] == 120 and same["seeds"] == 3 and same["p"] > 0.05 and same["p_opposite"] > 0.05
    assert ("(iii)", "controlnet", "joint") not in got   # (iii) is claimed for RetriNet and the IP-Adapter only
    assert got[("(i) -", "retrinet", "copies_background")]["seeds_agreeing"] == 3


def test_chance_row():
    plan = [{"reference_scenes": [{"background": "blue"}, {"background": "grey"}]},
            {"reference_scenes": [{"background": "blue"}, {"background": "blue"}]}]
    c = leakage.chance(plan, ["background", "arms"])
    assert c["identification"] == 0.5 and c["prompt_background"] == 0.25 and c["prompt_arms"] == 0.5
    assert c["copies_background"] == {"K=1": 0.25, "K=2": pytest.approx(1.5 / 4)}
    assert c["joint"] == pytest.approx(0.5 * 0.25 * 0.5)
