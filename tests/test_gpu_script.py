"""bench/gpu.sh, the one command that runs every CUDA measurement: its syntax, the commands of its
dry run (each accepted by its script's parse_args), the --report row writer, and, with a stand-in
for python, what it records when commands fail, write nothing, or run out of time. No GPU needed."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import bench_module
import retrinet
from training.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.sh"
METHODS = ("retrinet", "controlnet", "ip-adapter")
LOCKS = ("none", "decoder", "both")
PAIRS = [(m, lock) for m in METHODS for lock in LOCKS if (m, lock) != ("ip-adapter", "both")]  # no LockB for it
# What bench/train.py trains at: RetriNet at the sd15 preset's size with its K, the baselines at 256 px.
TRAIN_SHAPE = {"retrinet": (384, 2), "controlnet": (256, 1), "ip-adapter": (256, 1)}


def cells(line: str) -> list[str]:
    """A Markdown row's cells, split at the pipes that are not escaped."""
    assert line.startswith("|") and line.endswith("|"), line
    return [c.strip().replace(r"\|", "|") for c in re.split(r"(?<!\\)\|", line[1:-1])]


def dry_run(out):
    env = {**os.environ, "GPU_DRY_RUN": "1"}
    env.pop("GPU_PYTHON", None)
    res = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=20)
    assert res.returncode == 0, res.stderr
    return [shlex.split(line) for line in res.stdout.splitlines()]


def bench_commands(commands):
    """{script name: [argument lists]} of the `python bench/X.py ...` commands."""
    found = {}
    for argv in commands:
        assert Path(argv[0]).name.startswith("python"), argv
        if argv[1].startswith("bench/"):
            found.setdefault(Path(argv[1]).stem, []).append(argv[2:])
    return found


def option(args, name):
    return args[args.index(name) + 1]


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry") / "table.md"
    commands = dry_run(out)
    assert not out.exists() and not out.with_suffix(".log").exists()  # runs nothing, writes nothing
    return out, commands


def test_syntax():
    assert os.access(SCRIPT, os.X_OK)
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_dry_run_lists_every_measurement(dry):
    out, commands = dry
    found = bench_commands(commands)
    assert set(found) == {"unet", "vae", "clip_text", "eval", "retrinet", "train", "memory"}
    for name in ("unet", "vae", "eval", "retrinet"):
        assert len(found[name]) == 1 and option(found[name][0], "--device") == "cuda"
    towers = sorted(option(a, "--tower") if "--tower" in a else "text" for a in found["clip_text"])
    assert towers == ["text", "vision"]
    assert all(option(a, "--dtype") == "fp16" and option(a, "--device") == "cuda" for a in found["clip_text"])
    for args in [a for name, runs in found.items() if name != "memory" for a in runs]:  # rows: one file
        assert option(args, "--report") == str(out)
    assert [a[1:] for a in commands if a[1:2] == ["-m"] and a[2] == "bench.machine"] == [["-m", "bench.machine"]]
    # python -m data.synthetic writes the training data once; every run reads it.
    data = [a for a in commands if a[1:3] == ["-m", "data.synthetic"]]
    assert len(data) == 1
    assert {option(a, "--data") for a in found["train"]} == {option(data[0], "--out")}


def test_train_runs_every_method_and_lock_beside_its_estimate(dry):
    _, commands = dry
    train_runs = {(option(a, "--method"), option(a, "--lock")): a for a in bench_commands(commands)["train"]}
    assert set(train_runs) == set(PAIRS)
    assert all(option(a, "--preset") == "sd15" and option(a, "--device") == "cuda" for a in train_runs.values())
    # The shapes the estimate is asked for are bench/train.py's (sd15 preset, each method's K).
    assert PRESETS["sd15"]["resolution"] == TRAIN_SHAPE["retrinet"][0]
    assert all(retrinet.METHODS[m].training_defaults["refs"] == TRAIN_SHAPE[m][1] for m in METHODS)
    memory = bench_commands(commands)["memory"]
    assert len(memory) == 8
    assert {(option(a, "--method"), option(a, "--lock")) for a in memory} == set(train_runs)
    for args in memory:
        m = option(args, "--method")
        assert (int(option(args, "--resolution")), int(option(args, "--refs"))) == TRAIN_SHAPE[m]
        assert option(args, "--precision") == "fp16" and "--checkpointing" in args
    # The estimates (CPU only) start first, in the background, so that they are ready for train.py.
    scripts = [Path(a[1]).stem for a in commands]
    assert scripts[:8] == ["memory"] * 8 and "memory" not in scripts[8:]


def test_every_bench_command_is_accepted_by_its_parse_args(dry):
    out, commands = dry
    for name, runs in bench_commands(commands).items():
        module = bench_module(name)
        for args in runs:
            parsed = module.parse_args(args)
            if name == "memory":  # an estimate on the CPU, read from its output
                assert parsed.report is None and parsed.method and not parsed.foreach_adamw
                continue
            assert parsed.report == str(out) and parsed.device == "cuda", (name, args)
            if name in ("unet", "vae", "retrinet"):
                assert parsed.cuda_only  # the CPU part would cost minutes of the GPU budget
            if name == "clip_text" and parsed.tower == "vision":
                assert parsed.vision_config == "h14"


def test_parse_args_checks():
    train = bench_module("train")
    base = ["--preset", "sd15", "--device", "cuda", "--report", "r.md"]
    assert train.gib(train.parse_args(base + ["--estimate", "14.2 GiB"]).estimate) == pytest.approx(14.2)
    assert train.gib("1536 MiB") == pytest.approx(1.5) and train.gib("3") == 3.0
    with pytest.raises(SystemExit):
        train.parse_args(base + ["--estimate", "lots"])
    for name in ("unet", "vae", "retrinet"):
        assert not bench_module(name).parse_args([]).cuda_only
        with pytest.raises(SystemExit):  # no CUDA part to keep
            bench_module(name).parse_args(["--cuda-only"])


def test_row_writer(tmp_path):
    from bench.report import COLUMNS, append_row, reporter
    path = tmp_path / "rows.md"
    line = append_row(path, "bench/x.py", "speed | with a pipe\nand a newline", "1.0 ms", "ref 2.0 ms", 0.5)
    reporter(path, "bench/y.py")("peak", "3.00 GiB")
    reporter(None, "bench/z.py")("ignored")  # no --report: nothing written
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and lines[0] + "\n" == line
    assert r"speed \| with a pipe and a newline" in lines[0]
    assert cells(lines[0]) == ["bench/x.py", "speed | with a pipe and a newline", "1.0 ms", "ref 2.0 ms", "0.5"]
    assert lines[1] == "| bench/y.py | peak | 3.00 GiB |  |  |"
    assert len(COLUMNS) == 5


def test_clip_vision_tower_rows(tmp_path, monkeypatch):
    """--tower vision end to end on a tiny tower (the real ones are ViT-H/14 and ViT-L/14 on a GPU)."""
    from clip import CLIPVisionConfig
    clip_text = bench_module("clip_text")
    tiny = CLIPVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            image_size=28, patch_size=14, projection_dim=32, hidden_act="gelu")
    monkeypatch.setitem(clip_text.VISION, "h14", ("tiny", lambda: tiny))
    report = tmp_path / "r.md"
    monkeypatch.setattr(sys, "argv", ["clip_text.py", "--tower", "vision", "--batch", "2", "--repeats", "1",
                                      "--warmup", "0", "--report", str(report)])
    clip_text.main()
    speed, error = (cells(line) for line in report.read_text().splitlines())
    assert speed[0] == "bench/clip_text.py" and speed[1].startswith("speed, CLIP tiny image tower")
    assert speed[2].endswith(" ms") and speed[3].startswith("transformers ")
    assert error[1].startswith("max relative error vs transformers") and float(error[4]) < 1e-4  # same weights


STUB = r"""#!/usr/bin/env bash
# Stands in for python: memory.py prints its estimate (the IP-Adapter with lock both fails), train.py
# writes a row, eval.py none, the rest fail.
echo "$*" >> "$STUB_CALLS"
report=; prev=
for a in "$@"; do [ "$prev" = --report ] && report=$a; prev=$a; done
case "$*" in
    *bench/memory.py*--method\ retrinet*) echo "| a table |"; echo "estimated peak: 15.36 GiB" ;;
    *bench/memory.py*--method\ controlnet\ --lock\ both*)
        echo "usage: memory.py: error: unrecognized arguments" >&2; exit 2 ;;
    *bench/memory.py*) echo "estimated peak: 12.5 GiB" ;;
    *bench/train.py*) echo "| bench/train.py | training step | 1.00 samples/s | | |" >> "$report" ;;
    *bench/eval.py*) echo "nothing measured" ;;
    *bench/retrinet.py*) sleep "$STUB_SLEEP"; echo "Traceback" >&2; echo "RuntimeError: x | y" >&2; exit 3 ;;
    *) echo "a warning" >&2; echo "RuntimeError: boom | bad" >&2; echo >&2; exit 3 ;;
esac
"""


def run_with_stub(tmp_path, budget, sleep):
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out, calls = tmp_path / "gpu.md", tmp_path / "calls.txt"
    env = {**os.environ, "GPU_PYTHON": str(stub), "STUB_CALLS": str(calls), "STUB_SLEEP": str(sleep),
           "GPU_BUDGET_S": str(budget)}
    env.pop("GPU_DRY_RUN", None)
    res = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=25)
    text = out.read_text()
    rows = [cells(line) for line in text.splitlines() if line.startswith("| ") and not line.startswith("| script")]
    return res, text, rows, calls.read_text().splitlines()


def test_failures_are_rows_and_the_estimate_reaches_train(tmp_path):
    res, text, rows, calls = run_with_stub(tmp_path, budget=465, sleep=0)
    assert res.returncode == 1  # some rows failed
    assert text.startswith("# CUDA measurements") and "- date: " in text and "- commit: " in text
    assert "- GPU: " in text and "torch not importable" in text  # the stand-in has no torch
    assert "| script | measurement | ours | reference | ratio / error |\n|---|---|---|---|---|\n" in text
    assert all(len(r) == 5 for r in rows)
    failed = {r[0]: r[1] for r in rows if r[1].startswith("FAILED")}
    assert failed["bench/unet.py"] == "FAILED (exit 3): RuntimeError: boom | bad"  # last non-empty stderr line
    assert failed["bench/retrinet.py"] == "FAILED (exit 3): RuntimeError: x | y"
    assert failed["bench/eval.py"] == "FAILED: exit 0 but no row written"
    assert failed["bench/memory.py --method controlnet --lock both"] == (
        "FAILED (exit 2): usage: memory.py: error: unrecognized arguments")
    assert set(failed) == {"bench/unet.py", "bench/vae.py", "bench/clip_text.py (text)",
                           "bench/clip_text.py (vision)", "bench/eval.py", "bench/retrinet.py",
                           "python -m data.synthetic (train.py's data)",
                           "bench/memory.py --method controlnet --lock both"}
    # Each estimate is a row right before its training run's, whose command got it as --estimate.
    estimates = {r[0]: r[3] for r in rows if r[0].startswith("bench/memory.py") and not r[1].startswith("FAILED")}
    assert len(estimates) == 7 and estimates["bench/memory.py --method retrinet --lock none"] == "15.36 GiB"
    assert estimates["bench/memory.py --method ip-adapter --lock decoder"] == "12.5 GiB"
    names = [r[0] for r in rows]
    assert sum(n == "bench/train.py" for n in names) == 8
    assert all(names[i + 1] == "bench/train.py" for i, n in enumerate(names) if n.startswith("bench/memory.py"))
    train_calls = {c for c in calls if "bench/train.py" in c}
    assert len(train_calls) == 8
    assert {c.rpartition("--report ")[2].partition(" ")[2] for c in train_calls} == {
        "--estimate 15.36 GiB", "--estimate 12.5 GiB", ""}
    assert sum(c.endswith("--estimate 15.36 GiB") for c in train_calls) == 3
    assert not any("--estimate" in c for c in train_calls if "--method controlnet --lock both" in c)
    assert not any("--data" in c for c in train_calls)  # the shared data failed: each run makes its own
    assert "Total wall time" in text.splitlines()[-1]
    assert any(c.startswith("-m bench.machine") for c in calls)  # the machine report, beside the table
    assert (tmp_path / "gpu-machine.md").read_text() == "python -m bench.machine failed (its error is in gpu.log)\n"
    log = (tmp_path / "gpu.log").read_text()
    assert log.count("== exit ") == 15 and log.count("[in the background, exit ") == 8


def test_commands_past_the_budget_are_skipped(tmp_path):
    # 17 s: everything up to retrinet.py starts with >= 15 s left; its 3 s leave < 15 for the rest.
    res, text, rows, calls = run_with_stub(tmp_path, budget=17, sleep=3)
    assert res.returncode == 1
    skipped = [r[0] for r in rows if r[1].startswith("SKIPPED")]
    assert skipped[0] == "python -m data.synthetic (train.py's data)" and len(skipped) == 9
    assert all(name == "bench/train.py --method %s --lock %s" % (m, lock)
               for name, (m, lock) in zip(skipped[1:], PAIRS))
    assert not any("bench/train.py" in c for c in calls)
    # The estimates ran in the background all the same: their rows are there.
    assert sum(r[0].startswith("bench/memory.py") for r in rows) == 8
