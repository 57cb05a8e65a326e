"""Running train.py under an experiment, with the experiment's SIGINT / SIGTERM passed on to it, and
what train.py would refuse in its command, found before the experiment writes anything."""
from __future__ import annotations

import signal
import subprocess
import sys
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def train_problems(command: list[str], samples: int, made_of: str) -> list[str]:
    """What train.py would refuse in `command` (recipe.train_command) before its --data is made:
    its arguments as its own parser and checks read them (the data roots, not made yet, left out),
    and a --batch-size (given in --train-args, else the preset's) above the `samples` its --data will
    hold (`made_of` says from which options). One line each; nothing is written."""
    import contextlib
    import io

    from training import args as cli
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
            args = cli.parse_args(command[2:])
    except SystemExit:
        last = said.getvalue().strip().splitlines()[-1:] or ["its parser stopped"]
        return [f"--train-args: train.py would refuse the run: {last[0]}"]
    args.data = args.val_data = None
    problems = [f"--train-args: train.py would refuse the run: {p}" for p in cli.check_args(args)]
    if args.batch_size > samples:
        given = (f"--train-args --batch-size {args.batch_size}" if "batch_size" in args.explicit
                 else f"the {args.preset} preset's --batch-size {args.batch_size} (none in --train-args)")
        problems.append(f"{given}: one micro-batch takes {args.batch_size} samples, but the training data will hold "
                        f"{samples} ({made_of}); give a smaller --batch-size in --train-args, or make more data")
    return problems


def run_child(command: list[str], notice: Optional[str] = None) -> tuple[int, int]:
    """Run `command` (train.py) to its end in its own session, forwarding each SIGINT / SIGTERM the
    experiment receives to it once: train.py then saves a checkpoint at its next step and exits (a
    second signal stops it at once, its own rule), and the experiment stops with it. A terminal's
    Ctrl-C reaches the experiment alone. `notice`, with {signal} filled in, is printed on stderr at the
    first signal. The experiment's own handlers are back in place on return.
    Returns (the child's status, the first signal forwarded or 0)."""
    received = []
    previous = {}
    child = subprocess.Popen(command, start_new_session=True)

    def forward(signum, frame):
        if not received and notice:
            print(notice.format(signal=signal.Signals(signum).name), file=sys.stderr, flush=True)
        received.append(signum)
        child.send_signal(signum)

    try:
        for sig in SIGNALS:
            previous[sig] = signal.signal(sig, forward)
        return child.wait(), (received[0] if received else 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:   # an exception of our own: do not leave train.py behind
            child.terminate()
            child.wait()
