"""The demo (experiments/demo.py, `make demo`): its pipeline on a small budget, --sample-only, the step
budget, a SIGTERM during training, and the old command `python demo.py`."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import demo, recipe
from training.checkpoints import read_state

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_demo_end_to_end_on_a_small_budget(tmp_path):
    """make demo's pipeline with everything shrunk: data, training, held-out sampling, report."""
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--identities", "8", "--images-per-identity", "4", "--heldout", "3",
                      "--steps", "2", "--samples", "2", "--sample-steps", "2", "--train-args", "--batch-size",
                      "8", "--val-steps", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["samples"] == 6 and report["heldout_identities"] == 3
    assert set(report["generated"]) == {"identification", "exact", "hair", "top", "bottom"}
    assert set(report["p_value"]) == set(report["chance"]) == set(report["generated"])
    assert report["chance"]["identification"] == pytest.approx(1 / 3)
    assert all(0 < report["chance"][k] < 1 and 0 <= report["p_value"][k] <= 1 for k in report["chance"])
    assert report["counts"]["identification"][1] == 6 and report["real_images"]["exact"] > 0
    assert report["significance"].startswith("identification: ") and "binomial p = " in report["significance"]
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (6, 24, 24, 3) and samples["images"].dtype == np.uint8
    assert len(set(samples["identities"].tolist())) == 3
    effect = report["reference_effect_x0_rmse"]
    assert set(effect) == {"300", "500", "700"} and all(set(r) == {"own", "mismatched", "null"} and
                                                        all(v > 0 for v in r.values()) for r in effect.values())
    assert report["backgrounds"] == "scene" and report["figure_scale"] == [0.8, 0.95]
    assert report["sampling"]["prompt"] == "scene" and set(report["base_alone"]) == set(report["generated"])
    assert (out / "base-samples.png").is_file()
    assert report["ref_background"] == "white" and report["hats"] is False
    saved = json.loads(read_state(out / "run" / "checkpoints" / "step-000002")["args"])
    assert saved["ref_background"] == "white"
    added = dict(zip(recipe.TRAIN_RECIPE[::2], recipe.TRAIN_RECIPE[1::2]))
    assert {k: saved[k[2:].replace("-", "_")] for k in added} == {k: float(v) for k, v in added.items()}
    assert report["model_file"].endswith("step-000002/ema.safetensors") and report["ema"] == 0.995
    for root in ("data-train", "data-heldout"):
        assert not any("hat" in json.loads(line)["tags"] for line in (out / root / "annotations.jsonl").open())
    assert (out / "heldout-samples.png").is_file() and (out / "report.md").is_file()
    assert (out / "run" / "checkpoints" / "step-000002" / "retrinet.safetensors").is_file()
    # --sample-only samples the same checkpoint again with other settings, without training.
    assert demo.main(["--out", str(out), "--identities", "8", "--images-per-identity", "4", "--heldout", "3",
                      "--samples", "1", "--sample-steps", "3", "--sampler", "dpmpp_2m", "--sample-only",
                      "--raw-weights"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["model_file"].endswith("step-000002/retrinet.safetensors")
    assert again["steps"] == 2 and again["samples"] == 3 and again["training_minutes"] == report["training_minutes"]
    assert again["sampling"]["sampler"] == "dpmpp_2m" and len(json.loads(json.dumps(again["counts"]))) == 5
    assert sorted(p.name for p in (out / "run" / "checkpoints").iterdir()) == ["step-000002"]
    # bench/demo_curve.py scores every checkpoint of the run the same way.
    from helpers import bench_module
    curve = bench_module("demo_curve")
    assert curve.main(["--out", str(out), "--demo-args", "--samples", "1", "--sample-steps", "2",
                       "--ref-guidance", "2"]) == 0
    rows = json.loads((out / "curve.json").read_text())
    assert [(r["step"], r["ref_guidance"], r["model_file"]) for r in rows] == [(2, 2.0, "ema.safetensors")]
    assert rows[0]["minutes"] > 0 and 0 <= rows[0]["identification"] <= 1


def test_demo_sample_only_needs_a_trained_run(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--identities", "4", "--images-per-identity", "3", "--heldout", "2",
                      "--sample-only"]) == 2
    err = capsys.readouterr().err
    assert f"demo: --sample-only: no checkpoint in {out / 'run' / 'checkpoints'}" in err and "Traceback" not in err


def test_demo_step_budget_follows_the_minutes():
    assert demo.parse_args([]).steps == 10 * demo.STEPS_PER_MINUTE
    assert demo.parse_args(["--minutes", "30"]).steps == 30 * demo.STEPS_PER_MINUTE
    assert demo.parse_args(["--minutes", "30", "--steps", "7"]).steps == 7


@pytest.mark.slow
def test_sigterm_stops_the_demo_after_training_saves(tmp_path):
    """SIGTERM to the demo during training reaches train.py once: it saves, and the demo stops without
    sampling (status 128 + 15), saying how to resume."""
    out = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.demo", "--out", str(out), "--identities", "8",
                             "--images-per-identity", "4", "--heldout", "3", "--steps", "100000", "--samples", "2",
                             "--sample-steps", "2", "--train-args", "--batch-size", "8", "--log-every", "1",
                             "--val-steps", "2"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    log = out / "run" / "log.jsonl"
    deadline = time.time() + 90
    while not (log.is_file() and log.read_text().count("\n") >= 2):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    stdout, err = proc.communicate(timeout=60)
    assert time.time() - sent < 15
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "train.py: SIGTERM received" in err and err.count("SIGTERM received") == 2  # the demo's and train.py's
    (ckpt,) = (out / "run" / "checkpoints").iterdir()
    assert read_state(ckpt)["step"] == int(ckpt.name[5:]) >= 2
    assert f"demo: stopped by SIGTERM during training (train.py status 0; its checkpoint {ckpt}); no report. " \
           f"Run the same command again to resume training" in err
    assert not (out / "report.md").exists() and not (out / "heldout-samples.png").exists() and stdout == ""


def test_old_command_hands_over(tmp_path):
    """`python demo.py ...`, run from another folder: one deprecation line on stderr, then the demo
    itself with the same arguments (here it finds no checkpoint and exits 2, having written nothing)."""
    out = tmp_path / "old"
    res = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--out", str(out), "--identities", "4",
                          "--images-per-identity", "3", "--heldout", "2", "--sample-only"], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.splitlines()
    assert lines[0] == "demo.py is deprecated: use python -m experiments.demo (running it now)"
    assert res.stderr.count("deprecated") == 1 and "Traceback" not in res.stderr
    assert f"demo: --sample-only: no checkpoint in {out / 'run' / 'checkpoints'}" in res.stderr
    assert not out.exists()
