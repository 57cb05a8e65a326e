"""Elastic restarts under fire: train.py under `torchrun --max-restarts 2 ... --resume` (two gloo
processes, the tiny preset, 12 steps, a checkpoint every 2), with one worker SIGKILLed at a random
moment per trial: after a random step, or while a checkpoint is being written (its .tmp folder
exists). Each trial passes when the agent exits 0 and the losses equal an uninterrupted run's.

    .venv/bin/python bench/restarts.py --trials 8 --seed 3      # about 50 s per trial on 2 CPU cores

Prints one line per trial: (how, which rank, at which step), the agent's status, same / DIFFERENT.
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data.synthetic import generate  # noqa: E402

TRAIN = ["--preset", "tiny", "--resolution", "16", "--ref-resolution", "8", "--warmup", "2", "--log-every", "1",
         "--val-count", "1", "--val-steps", "2", "--seed", "3", "--batch-size", "2", "--max-steps", "12",
         "--save-every", "2", "--resume", "--device", "cpu"]
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def steps_logged(out: Path) -> int:
    return len((out / "log.jsonl").read_text().splitlines()) if (out / "log.jsonl").exists() else 0


def trial(data: Path, out: Path, how: str, victim: int, after: int) -> tuple:
    """One run with one worker killed; returns (what was killed, agent status, same losses as straight)."""
    with open(f"{out}.err", "w") as err:
        agent = subprocess.Popen([*LAUNCH, "--max-restarts", "2", str(ROOT / "train.py"), "--data", str(data), *TRAIN,
                                  "--out", str(out)], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        start, killed = time.time(), None
        while agent.poll() is None and killed is None and time.time() - start < 200:
            n = steps_logged(out)
            writing = any(p.name.endswith(".tmp") for p in (out / "checkpoints").glob(".*"))
            if n >= after and (how == "after a step" or writing):
                workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
                if len(workers) == 2:
                    os.kill(int(sorted(workers, key=int)[victim]), signal.SIGKILL)
                    killed = (how, f"rank {victim}", f"step {n}")
            time.sleep(0.0005)
        try:
            status = agent.wait(timeout=300)
        except subprocess.TimeoutExpired:
            agent.kill()
            status = "HANG"
    return killed, status, time.time() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="draws each trial's kill (how, which rank, when)")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "data", identities=8, images_per_identity=3, size=32, seed=0, noise_fraction=0.0)
        straight = subprocess.run([*LAUNCH, str(ROOT / "train.py"), "--data", str(tmp / "data"), *TRAIN, "--out",
                                   str(tmp / "straight")], env=ENV, cwd=ROOT, capture_output=True, text=True)
        if straight.returncode != 0:
            sys.exit(f"bench/restarts.py: the uninterrupted run failed: {straight.stderr[-500:]}")
        want, passed = losses(tmp / "straight"), 0
        for i in range(a.trials):
            how, victim, after = rng.choice(["during a checkpoint", "after a step"]), rng.choice([0, 1]), rng.randint(2, 9)
            out = tmp / f"run{i}"
            killed, status, seconds = trial(tmp / "data", out, how, victim, after)
            same = status == 0 and losses(out) == want
            passed += same
            print(f"trial {i}: killed {killed}, agent status {status}, {'same' if same else 'DIFFERENT'} "
                  f"({seconds:.0f} s)", flush=True)
        print(f"{passed} of {a.trials} trials ended as the uninterrupted run")
    return 0 if passed == a.trials else 1


if __name__ == "__main__":
    sys.exit(main())
