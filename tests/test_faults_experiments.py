"""The demo and the leakage benchmark under bad input: every argument is checked before anything is
written (train.py's own checks of the run's command and the batch against the data to be made
included); a truncated or corrupt record of an earlier invocation is recomputed (done.json,
result.json) or refused (data.json) in one line; train.py refusing to start (status 2) is said as
such, with status 2. train.py itself is replaced where a test needs its status only."""
import argparse
import hashlib
import json
from pathlib import Path

import pytest

from experiments import demo, leakage

# 2 x 4 = 8 training samples: the tiny preset's batch of 32 does not fit, a batch of 4 does.
LEAK = ["--identities", "2", "--images-per-identity", "4", "--heldout", "2", "--steps", "2", "--seeds", "0"]
FITS = ["--train-args", "--batch-size", "4"]
# 4 x 3 = 12 training samples.
DEMO = ["--identities", "4", "--images-per-identity", "3", "--heldout", "2"]


def files(out) -> dict:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(out).rglob("*")) if p.is_file()}


def refused(main, argv, capsys) -> str:
    """`main(argv)` stops at argument parsing with status 2; its stderr, without a traceback."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err, err
    return err


# -- the leakage benchmark: arguments ----------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--sample-steps", "100000", *FITS], "--sample-steps must be <= 999 (the ddim sampler's limit on the tiny "
                                          "stack's schedule), got 100000"),
    (["--sampler", "dpmpp_2m", "--sample-steps", "999", *FITS], "--sample-steps must be <= 998"),
    (["--size", "24", *FITS], "--size must be >= 32, got 24"),
    (["--data-seed", "-1", *FITS], "--data-seed must be >= 0, got -1"),
    (["--seeds", "0", "4294967296", *FITS], "--seeds and --data-seed must be < 2^32"),
    (["--train-args", "--batch-size", "9"], "--train-args --batch-size 9: one micro-batch takes 9 samples, but the "
                                            "training data will hold 8 (--identities 2 x --images-per-identity 4)"),
    ([], "the tiny preset's --batch-size 32 (none in --train-args): one micro-batch takes 32 samples, but the "
         "training data will hold 8"),
    (["--train-args", "--batch-size", "4", "--lr", "nan"],
     "--train-args: train.py would refuse the run: --lr nan must be a finite number"),
    (["--train-args", "--batch-size", "4", "--no-such-option"],
     "--train-args: train.py would refuse the run: train.py: error: unrecognized arguments: --no-such-option"),
])
def test_leakage_refuses_before_writing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert message in refused(leakage.main, ["--out", str(out), *LEAK, *argv], capsys)
    assert not out.exists()


def test_leakage_refuses_an_out_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("a file")
    assert f"--out {out} is a file, expected a folder" in refused(leakage.main, ["--out", str(out), *LEAK, *FITS],
                                                                  capsys)
    assert out.read_text() == "a file"


def test_leakage_takes_good_arguments_without_writing(tmp_path):
    out = tmp_path / "out"
    args = leakage.parse_args(["--out", str(out), *LEAK, "--sample-steps", "999", *FITS])
    assert args.sample_steps == 999 and args.train_args == ["--batch-size", "4"]
    assert not out.exists()


# -- the leakage benchmark: records of an earlier invocation -------------------------------------------

@pytest.mark.parametrize("content", ["", '{"identities": 2, "images_per_ident', "[2, 4, 2]"])
def test_leakage_refuses_a_corrupt_data_json(tmp_path, capsys, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.json").write_text(content)
    before = files(out)
    assert leakage.main(["--out", str(out), *LEAK, *FITS]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [l for l in err.splitlines() if l.startswith("leakage: error: ")]
    assert line.startswith(f"leakage: error: {out / 'data.json'}: cannot read it (truncated or corrupt)")
    assert "delete it with data-train/ and data-heldout/" in line and line.endswith("or use another --out")
    assert files(out) == before and not (out / "data-train").exists()


class FakeTrain:
    """run_child in place of train.py: records the command, leaves the checkpoint of step `reached`
    (when given) and returns `status`."""

    def __init__(self, status: int = 0, reached: int | None = None):
        self.status, self.reached, self.commands = status, reached, []

    def __call__(self, command, notice=None):
        self.commands.append(command)
        if self.reached:
            out = Path(command[command.index("--out") + 1])
            (out / "checkpoints" / f"step-{self.reached:06d}").mkdir(parents=True, exist_ok=True)
        return self.status, 0


def leak_args(tmp_path) -> argparse.Namespace:
    return leakage.parse_args(["--out", str(tmp_path / "out"), *LEAK, *FITS])


def test_leakage_trains_again_after_a_corrupt_done_json(tmp_path, capsys, monkeypatch):
    """done.json truncated by a kill: the run is taken as not finished and trained (resuming from its
    checkpoint, which here is the last step already); wall.json corrupt: its earlier time counts as 0."""
    args = leak_args(tmp_path)
    run = tmp_path / "out" / "runs" / "retrinet-a-s0"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "done.json").write_text('{"steps": 2, "minu')
    (run / "wall.json").write_text("not json")
    fake = FakeTrain()
    monkeypatch.setattr(leakage, "run_child", fake)
    record = leakage.train_run(run, "retrinet", "a", 0, tmp_path / "out" / "data-train", args)
    assert len(fake.commands) == 1 and "--resume" in fake.commands[0]
    assert record["steps"] == 2 and json.loads((run / "done.json").read_text()) == record
    assert json.loads((run / "wall.json").read_text())["minutes"] < 1
    err = capsys.readouterr().err
    assert f"leakage: {run / 'done.json'}: cannot read it (truncated or corrupt); retrinet-a-s0 is taken as not " \
           f"finished: training it (again, from its last checkpoint)" in err.splitlines()
    assert f"leakage: {run / 'wall.json'}: cannot read it (truncated or corrupt); its earlier training time counts " \
           f"as 0" in err.splitlines()
    assert "Traceback" not in err
    # and the record now reads: the run is reused, train.py not started again
    assert leakage.train_run(run, "retrinet", "a", 0, tmp_path / "out" / "data-train", args) == record
    assert len(fake.commands) == 1 and "trained (2 steps" in capsys.readouterr().err


def test_leakage_says_train_py_refused_its_arguments(tmp_path, monkeypatch):
    """train.py status 2 (it refused to start, writing nothing): not 'run the same command again',
    which it would refuse the same way, but fix --train-args; status 2."""
    args = leak_args(tmp_path)
    run = tmp_path / "out" / "runs" / "controlnet-b-s0"
    monkeypatch.setattr(leakage, "run_child", FakeTrain(status=2))
    with pytest.raises(leakage.LeakageError) as stop:
        leakage.train_run(run, "controlnet", "b", 0, tmp_path / "out" / "data-train", args)
    message = str(stop.value)
    assert stop.value.status == 2 and not isinstance(stop.value, leakage.Stopped)
    assert message.startswith("training controlnet-b-s0: train.py refused to start (status 2; its error above says "
                              "why): fix --train-args as it says")
    assert "run the same command again" not in message and not run.exists()
    # main exits with the error's status

    def benchmark(args):
        raise stop.value
    monkeypatch.setattr(leakage, "run_benchmark", benchmark)
    assert leakage.main(["--out", str(tmp_path / "out"), *LEAK, *FITS]) == 2


def _plan(tmp_path):
    return [{"prompt": "1girl, solo, arms up, blue background", "references": [tmp_path / "a.png", tmp_path / "b.png"]}]


def test_leakage_evaluates_again_after_a_corrupt_result_json(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "runs" / "retrinet-a-s0" / "eval"
    folder.mkdir(parents=True)
    args = argparse.Namespace(samples=2, sample_steps=2, sampler="ddim", guidance=7.0)
    plan = _plan(tmp_path)
    (folder / "result.json").write_text('{"settings": {"samples": 2, "sample_st')
    # main asks first without the model: not evaluated, said nothing yet (it loads the model and asks again)
    assert leakage.evaluate(folder, None, None, "retrinet", plan, ["background"], 0, None, None, args) == {}
    assert capsys.readouterr().err == ""

    class Sampling(Exception):
        pass

    def sample_images(*a, **kw):
        raise Sampling
    monkeypatch.setattr(leakage, "sample_images", sample_images)
    with pytest.raises(Sampling):
        leakage.evaluate(folder, object(), object(), "retrinet", plan, ["background"], 0, None, None, args)
    err = capsys.readouterr().err
    assert err.strip() == f"leakage: {folder / 'result.json'}: cannot read it (truncated or corrupt); sampling and " \
                          f"scoring it again"


def test_leakage_reuses_a_readable_result_json(tmp_path, capsys):
    folder = tmp_path / "base-s0"
    folder.mkdir()
    args = argparse.Namespace(samples=2, sample_steps=2, sampler="ddim", guidance=7.0)
    settings = {"samples": 2, "sample_steps": 2, "sampler": "ddim", "guidance": 7.0, "seed": 0, "scale": None,
                "attributes": ["background"], "plan": [["1girl, solo, arms up, blue background", "a.png"]]}
    saved = {"settings": settings, "n": 2, "samples": [{"joint": True}, {"joint": False}], "joint": 0.5}
    (folder / "result.json").write_text(json.dumps(saved))
    plan = [{**_plan(tmp_path)[0], "references": [tmp_path / "a.png"]}]
    assert leakage.evaluate(folder, None, None, None, plan, ["background"], 0, None, None, args) == saved
    assert capsys.readouterr().err.strip() == f"leakage: {tmp_path.name}/base-s0: evaluated, reused"


# -- the demo -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--minutes", "nan"], "--minutes nan: expected a number of minutes > 0 and at most 1440 (a day)"),
    (["--minutes", "inf"], "--minutes inf: expected a number of minutes > 0"),
    (["--minutes", "-1"], "--minutes -1.0: expected a number of minutes > 0"),
    (["--minutes", "0"], "--minutes 0.0: expected"),
    (["--minutes", "1441"], "--minutes 1441.0: expected"),
    (["--steps", "0"], "--steps 0: expected an integer >= 1"),
    (["--heldout", "1"], "--heldout 1: expected an integer >= 2 and <= 1000"),
    (["--images-per-identity", "1"], "--images-per-identity 1: expected an integer >= 2"),
    (["--samples", "0"], "--samples 0: expected an integer >= 1"),
    (["--seed", "-1"], "--seed -1: expected an integer >= 0 and < 2^32"),
    (["--guidance", "nan"], "--guidance nan: expected a finite number >= 0"),
    (["--ref-guidance", "-1"], "--ref-guidance -1.0: expected a finite number >= 0"),
    (["--sample-steps", "100000"], "--sample-steps 100000: expected an integer >= 1 and <= 999 (the ddim sampler's "
                                   "limit on the tiny stack's schedule)"),
    (["--size", "24"], "--size must be >= 32, got 24"),
    (["--figure-scale", "nan", "0.9"], "--figure-scale must be 0.2 <= low <= high <= 0.95"),
    (["--train-args", "--batch-size", "13"], "--train-args --batch-size 13: one micro-batch takes 13 samples, but the "
                                             "training data will hold 12 (--identities 4 x --images-per-identity 3)"),
    ([], "the tiny preset's --batch-size 32 (none in --train-args)"),
    (["--train-args", "--batch-size", "4", "--time-limit", "-5"],
     "--train-args: train.py would refuse the run: --time-limit -5.0 must be >= 0"),
])
def test_demo_refuses_before_writing(tmp_path, capsys, argv, message):
    out = tmp_path / "demo"
    err = refused(demo.main, ["--out", str(out), *DEMO, *argv], capsys)
    assert message in err, err
    assert not out.exists()


def test_demo_takes_good_arguments_without_writing(tmp_path):
    out = tmp_path / "demo"
    args = demo.parse_args(["--out", str(out), *DEMO, "--minutes", "0.5", "--train-args", "--batch-size", "12"])
    assert args.steps == round(0.5 * demo.STEPS_PER_MINUTE) and not out.exists()
    # --sample-only needs no training arguments that fit: it trains nothing
    assert demo.parse_args(["--out", str(out), *DEMO, "--sample-only"]).sample_only


def test_demo_sample_only_without_a_trained_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), *DEMO, "--sample-only"]) == 2
    err = capsys.readouterr().err
    assert f"demo: --sample-only: no checkpoint in {out / 'run' / 'checkpoints'}; run the demo without it first" in err
    assert "generating" not in err and not out.exists()


def test_demo_says_train_py_refused_to_start(tmp_path, capsys, monkeypatch):
    """train.py status 2 (here: faked; e.g. --resume with another --train-args --batch-size, or its
    --out held by another run): the demo says so and exits 2, not 'training failed'."""
    fake = FakeTrain(status=2)
    monkeypatch.setattr(demo, "run_child", fake)
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--identities", "2", "--images-per-identity", "2", "--heldout", "2",
                      "--size", "32", "--train-args", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert f"demo: train.py refused to start (status 2; its error above says why): fix --train-args as it says, or " \
           f"wait for the run it names in {out / 'run'} to end" in err
    assert "training failed" not in err and "Traceback" not in err and len(fake.commands) == 1
