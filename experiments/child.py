"""Running train.py under an experiment, with the experiment's SIGINT / SIGTERM passed on to it."""
from __future__ import annotations

import signal
import subprocess
import sys
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
