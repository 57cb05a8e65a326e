"""train.py's lock on its --out (training/lock.py): a second run in a folder another run holds, with
or without --resume, is refused in one line naming the holder, status 2, the folder unchanged; a
lock file left by a killed run blocks nothing, and neither does a forked child of the run."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import run
from training import lock

ROOT = Path(__file__).resolve().parents[1]
# A process that takes the lock of the folder argv[1] and keeps it (no torch: it starts in a blink).
HOLD = ("import sys, time; from training import lock; lock.acquire(sys.argv[1]); print('held', flush=True); "
        "time.sleep(120)")


def files(out) -> dict:
    """{relative path: content hash} of everything under a folder, dotfiles included."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(out).rglob("*")) if p.is_file()}


def one_error(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("train.py: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def hold():
    """hold(out): a child process holding out's lock (killed at the end of the test if still alive)."""
    children = []

    def start(out: Path) -> subprocess.Popen:
        child = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        children.append(child)
        assert child.stdout.readline().strip() == "held"
        return child

    yield start
    for child in children:
        child.kill()
        child.wait()
        child.stdout.close()


def test_a_held_lock_refuses_another_and_ends_with_release(tmp_path):
    out = tmp_path / "run"
    held = lock.acquire(out)
    record = json.loads((out / lock.LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    expected = f"--out {out}: another run is using this folder: process {os.getpid()} on {socket.gethostname()} ("
    assert lock.holder(out).startswith(expected)
    with pytest.raises(lock.LockError) as refused:
        lock.acquire(out)   # another open of the file: flock tells them apart even in one process
    assert refused.value.status == 2 and str(refused.value).startswith(expected)
    assert json.loads((out / lock.LOCK_FILE).read_text()) == record   # the refused one wrote nothing
    held.release()
    assert not (out / lock.LOCK_FILE).exists() and lock.holder(out) is None
    lock.acquire(out).release()


def test_a_lock_file_left_by_a_killed_process_blocks_nothing(tmp_path, hold):
    out = tmp_path / "run"
    child = hold(out)
    assert lock.holder(out).startswith(f"--out {out}: another run is using this folder: process {child.pid} on ")
    child.kill()
    child.wait()
    assert json.loads((out / lock.LOCK_FILE).read_text())["pid"] == child.pid   # left behind
    assert lock.holder(out) is None
    held = lock.acquire(out)
    assert json.loads((out / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    held.release()


def test_a_forked_child_does_not_keep_a_dead_runs_lock(tmp_path):
    """A run's forked children (data loader workers) close their copy of the lock file, so a run killed
    while a child lives on does not block its --resume."""
    script = ("import os, sys, time; from training import lock; lock.acquire(sys.argv[1]); child = os.fork()\n"
              "if child == 0:\n    os.close(1)\n    os.close(2)\n    time.sleep(60)\n    os._exit(0)\n"
              "print(child, flush=True); os._exit(0)")   # the parent ends without releasing, as a killed one
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    grandchild = int(res.stdout)
    try:
        os.kill(grandchild, 0)   # still alive
        assert (tmp_path / lock.LOCK_FILE).is_file() and lock.holder(tmp_path) is None
        lock.acquire(tmp_path).release()
    finally:
        os.kill(grandchild, signal.SIGKILL)


def test_a_second_train_py_in_a_held_folder_is_refused_then_takes_over(data, tmp_path, capsys, hold):
    """train.py into a folder another run holds: refused before it reads or writes anything there,
    fresh or with --resume; once the holder is killed, a run takes the folder over."""
    out = tmp_path / "run"
    child = hold(out)
    before = files(out)
    for extra in ([], ["--resume"]):
        assert run(data, out, "--max-steps", 1, *extra) == 2
        line = one_error(capsys.readouterr().err)
        assert line.startswith(f"train.py: error: --out {out}: another run is using this folder: process {child.pid} "
                               f"on {socket.gethostname()} ("), line
        assert line.endswith("; wait for it to end or stop it, or choose another --out")
        assert files(out) == before
    child.kill()
    child.wait()
    start = time.time()
    assert run(data, out, "--max-steps", 1) == 0
    assert time.time() - start < 60
    assert (out / "checkpoints" / "step-000001").is_dir() and (out / "log.jsonl").is_file()
    assert not (out / lock.LOCK_FILE).exists()   # released at the end of the run
