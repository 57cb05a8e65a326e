"""train.py under faults: non-finite training, unreadable validation data, resuming with other
settings, a killed run's log, bad data and arguments, a full disk and a stalled DDP process (a stopped
demo: test_demo.py). Each fault ends with its exit status and one line naming what is wrong, and
nothing written before is lost.

Tiny preset at 16 px, batch 4, a few steps on a 24-sample synthetic dataset; subprocesses run with
one thread each (two processes on two shared cores)."""
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from training.checkpoints import read_state

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--preset", "tiny", "--resolution", "16", "--ref-resolution", "8", "--batch-size", "4", "--warmup", "2",
        "--log-every", "1", "--val-count", "1", "--val-steps", "2", "--seed", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished 2-step run (checkpoints 1 and 2, log, grid), copied by `earlier_run`."""
    out = tmp_path_factory.mktemp("fault-run") / "run"
    assert run(data, out, "--max-steps", 2, "--save-every", 1) == 0
    return out


@pytest.fixture
def earlier_run(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def run(data, out, *extra) -> int:
    return train.main(["--data", str(data), "--out", str(out), *FAST, *map(str, extra)])


def files(out) -> dict:
    """{relative path: content hash} of everything under a run folder."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(out).rglob("*")) if p.is_file()}


def checkpoints(out) -> list[str]:
    return sorted(p.name for p in (Path(out) / "checkpoints").iterdir())


def one_error(err: str) -> str:
    """The run's single error line; no traceback."""
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("train.py: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def logged(out) -> list[dict]:
    return [json.loads(l) for l in (Path(out) / "log.jsonl").read_text().splitlines()]


def trainable_weights(model) -> dict:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"w-{os.getpid()}.safetensors"
    model.save(path)
    try:
        return load_file(path)
    finally:
        path.unlink()


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# -- 1. the non-finite guard ------------------------------------------------------------------------

@pytest.mark.slow
def test_exploding_lr_stops_with_the_initial_weights(data, tmp_path, capsys, monkeypatch):
    """--lr 1e10: the first update gives finite but huge weights whose loss is NaN. The guard goes back
    to the weights before it each time, so after MAX_BAD_STEPS the checkpoint holds the initial
    weights, bit for bit, with a finite optimizer state; status 3, and no --precision advice in fp32."""
    monkeypatch.setattr(train, "MAX_BAD_STEPS", 6)
    out = tmp_path / "boom"
    assert run(data, out, "--max-steps", 200, "--lr", "1e10", "--log-every", 1000) == 3
    err = capsys.readouterr().err
    line = one_error(err)
    assert "6 steps in a row" in line and "--lr (now 1e+10)" in line and "after step 0 (the initial weights)" in line
    assert "--precision" not in line and str(out / "checkpoints" / "step-000006") in line
    assert "back to the weights after step 0" in err  # the warning at the first undone update
    state = read_state(out / "checkpoints" / "step-000006")
    assert state["step"] == 6 and state["skipped"] == 6
    saved = load_file(out / "checkpoints" / "step-000006" / "retrinet.safetensors")
    torch.manual_seed(3)  # as train.main seeds rank 0 before building
    random.seed(3)
    args = train.parse_args(["--data", str(data), "--out", str(out), *FAST])
    assert not [p for p in train.check_args(args) if "checkpoints of an earlier run" not in p]
    initial = trainable_weights(train.build(args, torch.device("cpu"), 0, out)[1])
    assert max_diff(saved, initial) == 0.0
    optimizer = state["optimizer"]["state"]
    assert all(torch.isfinite(t).all() for s in optimizer.values() for t in s.values())


@pytest.mark.slow
def test_non_finite_loss_goes_back_to_the_last_finite_weights(data, tmp_path, capsys, monkeypatch):
    """Losses NaN from step 4 on: the update of step 3 made the weights that give them, so the run
    stops with the weights after step 2, equal to those of a clean 2-step run."""
    import training.objective as objective
    real, calls = objective.diffusion_loss, []

    def nan_from_step_4(*a, **kw):
        calls.append(1)
        loss = real(*a, **kw)
        return loss * float("nan") if len(calls) >= 4 else loss

    monkeypatch.setattr(objective, "diffusion_loss", nan_from_step_4)
    monkeypatch.setattr(train, "MAX_BAD_STEPS", 4)
    out = tmp_path / "nan"
    assert run(data, out, "--max-steps", 100, "--precision", "bf16") == 3
    line = one_error(capsys.readouterr().err)
    assert "after step 2." in line and "--precision fp32 (now bf16)" in line
    (ckpt,) = (out / "checkpoints").iterdir()  # steps 3 (undone) to 6: 4 bad steps in a row
    assert ckpt.name == "step-000006" and read_state(ckpt)["skipped"] == 4
    monkeypatch.setattr(objective, "diffusion_loss", real)
    assert run(data, tmp_path / "clean16", "--max-steps", 2, "--precision", "bf16") == 0
    assert max_diff(load_file(ckpt / "retrinet.safetensors"),
                    load_file(tmp_path / "clean16" / "checkpoints" / "step-000002" / "retrinet.safetensors")) == 0.0
    assert [r["loss"] is None for r in logged(out)] == [False] * 3 + [True] * 3


@pytest.mark.slow
def test_an_update_that_makes_non_finite_weights_is_undone_at_once(data, tmp_path, capsys, monkeypatch):
    """An optimizer step that writes NaN into a weight (as --clip-grad nan or --lr inf did) is undone
    in the same step: training goes on from the weights before it and ends with finite weights."""
    make = train.make_optimizer

    def poisoned(params, args, world):
        opt = make(params, args, world)
        step, count = opt.step, []

        def step_then_nan(*a, **kw):
            result = step(*a, **kw)
            count.append(1)
            if len(count) == 2:
                with torch.no_grad():
                    params[0].fill_(float("nan"))
            return result

        opt.step = step_then_nan
        return opt

    monkeypatch.setattr(train, "make_optimizer", poisoned)
    out = tmp_path / "poison"
    assert run(data, out, "--max-steps", 4) == 0
    assert "step 2: its update made non-finite weights; back to the weights after step 1" in capsys.readouterr().err
    state = read_state(out / "checkpoints" / "step-000004")
    assert state["skipped"] == 1
    w = load_file(out / "checkpoints" / "step-000004" / "retrinet.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())
    assert [r["skipped"] for r in logged(out)] == [0, 1, 1, 1]


def test_options_that_must_be_finite_are_refused_up_front(data, tmp_path, capsys):
    bad = {"--lr": "inf", "--min-lr": "nan", "--clip-grad": "nan", "--face-weight": "nan", "--prompt-drop": "nan",
           "--ref-drop": "inf", "--adam-eps": "nan", "--weight-decay": "inf", "--val-guidance": "nan",
           "--val-ref-guidance": "-inf", "--time-limit": "nan", "--ddp-timeout": "inf"}
    out = tmp_path / "o"
    assert run(data, out, *[f"{option}={value}" for option, value in bad.items()]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for option, value in bad.items():
        assert f"train.py: error: {option} {float(value)} must be a finite number" in err, option
    assert not out.exists()
    assert run(data, out, "--clip-grad", "-1", "--face-weight", "-0.1", "--adam-eps", "0", "--weight-decay", "-1",
               "--min-lr", "1") == 2
    err = capsys.readouterr().err
    for expected in ("--clip-grad -1.0 must be >= 0", "--face-weight -0.1 must be >= 0", "--adam-eps 0.0 must be > 0",
                     "--weight-decay -1.0 must be >= 0", "--min-lr 1.0 must be within [0, --lr]"):
        assert expected in err, expected
    assert not out.exists()


# -- 2. validation on data the loader tolerates ---------------------------------------------------

@pytest.mark.slow
def test_validation_leaves_out_an_unreadable_sample_and_training_goes_on(data, tmp_path, capsys):
    from training.validation import validation_records
    root = tmp_path / "data"
    shutil.copytree(data, root)
    first, second = validation_records(root, 2)
    (root / first["image"]).unlink()
    out = tmp_path / "run"
    assert run(root, out, "--max-steps", 2, "--val-every", 1, "--val-count", 2, "--save-every", 1) == 0
    err = capsys.readouterr().err
    warnings = [l for l in err.splitlines() if "left out sample" in l]
    assert warnings == [f"train.py: warning: validation grid: left out sample {first['id']}: target "
                        f"{root / first['image']}: cannot read it as an image "
                        f"([Errno 2] No such file or directory: '{root / first['image']}')"]  # once, not per grid
    assert checkpoints(out) == ["step-000001", "step-000002"]
    assert (out / "samples" / "step-000001.png").is_file() and (out / "samples" / "step-000002.png").is_file()


def test_a_failing_grid_warns_and_training_goes_on(data, tmp_path, capsys, monkeypatch):
    import training.validation as validation

    def broken(*a, **kw):
        raise RuntimeError("out of memory in the sampler\nsecond line")

    monkeypatch.setattr(validation, "generate", broken)
    out = tmp_path / "run"
    assert run(data, out, "--max-steps", 3, "--val-every", 1, "--save-every", 1) == 0
    err = capsys.readouterr().err
    assert ("train.py: warning: the validation grid of step 1 failed (RuntimeError: out of memory in the sampler); "
            "training goes on") in err
    assert checkpoints(out) == ["step-000001", "step-000002", "step-000003"]
    assert not (out / "samples").exists()
    assert [r["step"] for r in logged(out)] == [1, 2, 3]


# -- 3. --resume compares the checkpoint's settings ------------------------------------------------

@pytest.mark.parametrize("extra, expected", [
    (["--heads", "2"], "this run has --heads 2, the checkpoint's run had --heads 1"),
    (["--refs", "3"], "this run has --refs 3, the checkpoint's run had --refs 2"),
    (["--batch-size", "8"], "this run has --batch-size 8, the checkpoint's run had --batch-size 4"),
    (["--ref-drop", "0.1"], "this run has --ref-drop 0.1, the checkpoint's run had --ref-drop 0.0"),
    (["--seed", "4"], "this run has --seed 4, the checkpoint's run had --seed 3"),
    (["--preset", "sd15", "--weights", "model.safetensors"], "this run has --preset sd15, the checkpoint's run had "
                                                            "--preset tiny"),
])
def test_resume_refuses_settings_that_change_the_checkpoints_meaning(data, earlier_run, capsys, extra, expected):
    before = files(earlier_run)
    if "--weights" in extra:
        (earlier_run.parent / "model.safetensors").touch()
        extra = ["--preset", "sd15", "--weights", str(earlier_run.parent / "model.safetensors")]
    assert run(data, earlier_run, "--max-steps", 3, "--resume", *extra) == 2
    line = one_error(capsys.readouterr().err)
    assert line.startswith(f"train.py: error: --resume {earlier_run / 'checkpoints' / 'step-000002'}: {expected}; ")
    assert "or start a fresh run in a new --out" in line
    assert files(earlier_run) == before


def test_resume_notes_harmless_changes_and_stores_processes_and_samples(data, earlier_run, capsys):
    assert run(data, earlier_run, "--max-steps", 3, "--resume", "--lr", "5e-4", "--log-every", 2, "--save-every", 3,
               "--val-count", 0) == 0
    err = capsys.readouterr().err
    for note in ("--lr 0.0005 (the checkpoint's run had 0.001)", "--log-every 2 (the checkpoint's run had 1)",
                 "--max-steps 3 (the checkpoint's run had 2)", "--val-count 0 (the checkpoint's run had 1)"):
        assert f"train.py: note: --resume: {note}" in err, note
    state = read_state(earlier_run / "checkpoints" / "step-000003")
    assert state["processes"] == 1 and state["samples"] == 24


def test_resume_refuses_another_dataset_size(data, earlier_run, tmp_path, capsys):
    smaller = tmp_path / "smaller"
    shutil.copytree(data, smaller)
    lines = (smaller / "annotations.jsonl").read_text().splitlines()
    (smaller / "annotations.jsonl").write_text("\n".join(lines[:20]) + "\n")
    before = files(earlier_run)
    assert run(smaller, earlier_run, "--max-steps", 3, "--resume") == 2
    line = one_error(capsys.readouterr().err)
    assert "this run has 20 samples in --data, the checkpoint's run had 24 samples in --data" in line
    assert files(earlier_run) == before


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_state_file_is_one_line(data, earlier_run, capsys, damage):
    state = earlier_run / "checkpoints" / "step-000002" / "state.pt"
    state.write_bytes(state.read_bytes()[:200] if damage == "truncated" else b"not a checkpoint at all")
    before = files(earlier_run)
    assert run(data, earlier_run, "--max-steps", 3, "--resume") == 1
    line = one_error(capsys.readouterr().err)
    assert line.startswith(f"train.py: error: {state}: cannot read it as a training state")
    assert files(earlier_run) == before


# -- 4. the log of a resumed run ---------------------------------------------------------------------

@pytest.mark.slow
def test_resume_truncates_the_log_to_the_resumed_step(data, tmp_path, capsys):
    """A run killed after logging step 4 but before its checkpoint, mid-line: resuming from step 2
    keeps steps 1-2 of the log, so that every step appears once."""
    out = tmp_path / "run"
    assert run(data, out, "--max-steps", 4, "--save-every", 2) == 0
    straight = logged(out)
    shutil.rmtree(out / "checkpoints" / "step-000004")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # torn by kill -9
    assert run(data, out, "--max-steps", 4, "--save-every", 2, "--resume") == 0
    assert "3 line(s) of" in capsys.readouterr().err
    again = logged(out)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert [r["loss"] for r in again] == [r["loss"] for r in straight]


# -- 5. one line instead of a traceback ------------------------------------------------------------

@pytest.mark.parametrize("line, expected", [
    ('{"id": "x1", "image": ', "annotations.jsonl:3: not valid JSON"),
    ('[1, 2, 3]', "annotations.jsonl:3: expected a JSON object"),
    ("without_similar", "annotations.jsonl:3: sample "),
    ("without_id", "annotations.jsonl:3: sample ?: missing or mistyped fields: id (expected str)"),
])
def test_bad_annotations_are_one_line(data, earlier_run, tmp_path, capsys, line, expected):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    lines = (root / "annotations.jsonl").read_text().splitlines()
    if line.startswith("without_"):
        rec = json.loads(lines[2])
        del rec[line[len("without_"):]]
        line = json.dumps(rec)
    lines[2] = line
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    before = files(earlier_run)
    assert run(root, earlier_run, "--max-steps", 3, "--resume") == 1
    err_line = one_error(capsys.readouterr().err)
    assert str(root / "annotations.jsonl") in err_line and expected in err_line
    assert files(earlier_run) == before


@pytest.mark.parametrize("keep", [0, 3])
def test_a_dataset_smaller_than_one_batch_is_one_line(data, tmp_path, capsys, keep):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    lines = (root / "annotations.jsonl").read_text().splitlines()[:keep]
    (root / "annotations.jsonl").write_text("".join(l + "\n" for l in lines))
    assert run(root, tmp_path / "run", "--max-steps", 2) == 1
    line = one_error(capsys.readouterr().err)
    assert line == (f"train.py: error: --data {root}: {keep} samples, but one micro-batch needs --batch-size 4 on each "
                    f"of 1 process(es), 4 samples: lower --batch-size or add samples")
    assert not (tmp_path / "run").exists()


def test_bad_values_are_refused_before_anything_is_written(data, tmp_path, capsys):
    out = tmp_path / "o"
    assert run(data, out, "--workers", -1, "--warmup", -5, "--keep", -1, "--val-count", -1, "--val-every", -2,
               "--seed", -1, "--device", "tpu") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for expected in ("--workers -1 must be >= 0", "--warmup -5 must be >= 0", "--keep -1 must be >= 0",
                     "--val-count -1 must be >= 0", "--val-every -2 must be >= 0", "--seed -1 must be >= 0",
                     "--device tpu: expected cpu, cuda, cuda:N or auto"):
        assert f"train.py: error: {expected}" in err, expected
    assert not out.exists()


def test_an_out_that_cannot_be_a_run_folder_is_refused(data, earlier_run, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    assert run(data, a_file, "--max-steps", 1) == 2
    assert one_error(capsys.readouterr().err) == (f"train.py: error: --out {a_file}: is a file, expected a folder "
                                                  f"(new, or a run's to --resume)")
    assert run(data, a_file / "run", "--max-steps", 1) == 2
    assert f"cannot create it, {a_file} is a file" in one_error(capsys.readouterr().err)
    assert a_file.read_text() == "not a folder"
    # A fresh run in a folder that holds another run's checkpoints would mix with them.
    before = files(earlier_run)
    assert run(data, earlier_run, "--max-steps", 3) == 2
    assert "holds the checkpoints of an earlier run (last: step-000002); add --resume" in one_error(
        capsys.readouterr().err)
    assert files(earlier_run) == before


def test_an_unwritable_out_is_refused_with_a_temporary_file(data, earlier_run, capsys, monkeypatch):
    """A read-only --out is refused up front. The check is a temporary file in --out; the test makes it
    fail by patching (a chmod would not stop root, as CI runs)."""
    import tempfile

    def refuse(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    before = files(earlier_run)
    assert run(data, earlier_run, "--max-steps", 3, "--resume") == 2
    assert one_error(capsys.readouterr().err) == (f"train.py: error: --out {earlier_run}: cannot write there "
                                                  f"(Permission denied)")
    assert files(earlier_run) == before


@pytest.mark.slow
def test_a_full_disk_at_checkpoint_time_keeps_the_earlier_checkpoints(data, earlier_run, capsys, monkeypatch):
    import training.checkpoints as ckpts
    real_save, saved = torch.save, []

    def fill_up(obj, f, *a, **kw):
        if len(saved) >= 1:
            Path(f).write_bytes(b"partial")  # what a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        saved.append(f)
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpts.torch, "save", fill_up)
    ckpt2 = {k: v for k, v in files(earlier_run).items() if k.startswith("checkpoints/")}
    assert run(data, earlier_run, "--max-steps", 6, "--save-every", 1, "--keep", 0, "--resume") == 1
    line = one_error(capsys.readouterr().err)
    tmp = earlier_run / "checkpoints" / ".step-000004.tmp"
    assert line == (f"train.py: error: cannot write the checkpoint of step 4 in {earlier_run / 'checkpoints'}: No space "
                    f"left on device ({tmp / 'state.pt'}); the checkpoints written before are kept")
    assert checkpoints(earlier_run) == ["step-000001", "step-000002", "step-000003"]
    after = files(earlier_run)
    assert {k: v for k, v in after.items() if k in ckpt2} == ckpt2
    read_state(earlier_run / "checkpoints" / "step-000003")
    assert [r["step"] for r in logged(earlier_run)] == [1, 2, 3, 4]


# -- 6. a stalled DDP process --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_stalled_process_times_out_with_one_line_naming_it(data, tmp_path):
    """Two gloo processes (started as torchrun would, without torchrun's own restarts); once training
    runs, process 1 is stopped (SIGSTOP). Process 0 gives up after --ddp-timeout (0.1 min) and
    names process 1; the checkpoints written before stay loadable."""
    out = tmp_path / "ddp"
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(data), "--out", str(out), *FAST, "--batch-size", "2",
           "--max-steps", "100000", "--save-every", "2", "--ddp-timeout", "0.1"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        deadline = time.time() + 60
        while not (out / "checkpoints" / "step-000002").is_dir():
            assert time.time() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.time()
        _, err = procs[0].communicate(timeout=60)
        waited = time.time() - stopped
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == 1, err
    line = one_error(err)
    assert line.startswith("train.py: error: process 0: the ") and "timed out after 0.1 min (--ddp-timeout)" in line
    assert "process 1 did not answer (the last place it reported: the " in line
    assert 6 <= waited < 30, waited
    assert not list((out / "checkpoints").glob(".step-*"))
    for ckpt in (out / "checkpoints").iterdir():
        assert read_state(ckpt)["step"] == int(ckpt.name[5:])
