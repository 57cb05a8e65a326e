"""One train.py run at a time in an output folder: process 0 holds an exclusive flock on OUT/.lock
for the whole run, the file naming it (pid, host, command). A second run in that folder is refused
(`LockError`, status 2) naming the holder. The OS drops a flock when its holder dies, so the file a
killed run leaves behind blocks nothing; a run that ends removes it. Linux / macOS (fcntl).

`holder` looks without writing (before train.py reads the checkpoints a running run may be writing);
`acquire` takes the lock (before train.py writes into the folder)."""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".lock"


class LockError(Exception):
    """The folder's lock cannot be taken: held by another run (status 2) or not writable (status 1)."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def _describe(out: Path, fh) -> str:
    """The refusal naming the holder, from what it wrote into the lock file."""
    try:
        fh.seek(0)
        info = json.loads(fh.read())
        who = f"process {int(info['pid'])} on {info['host']}"
        if info.get("command"):
            who += f" ({info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        who = "a process that has not written its pid yet"
    return (f"--out {out}: another run is using this folder: {who}, holding {out / LOCK_FILE}; wait for it to end "
            f"or stop it, or choose another --out")


def holder(out: str | Path) -> str | None:
    """Why `out` cannot take a run now (one line naming the process that holds its lock), or None.
    Writes nothing."""
    out = Path(out)
    try:
        fh = open(out / LOCK_FILE)
    except OSError:  # no lock file (no run there yet), or out is not a folder: nothing holds it
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(out, fh)
        except OSError:
            return None
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


class OutLock:
    """A held lock on one folder; `release` ends it (also at the process's exit, by the OS)."""

    def __init__(self, path: Path, fh):
        self.path, self.fh = path, fh

    def release(self) -> None:
        """Remove the lock file (while it is still this lock's) and drop the lock."""
        if self.fh is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fh.fileno()).st_ino:
                self.path.unlink()
        except OSError:
            pass
        self.fh.close()
        self.fh = None
        if self in _HELD:
            _HELD.remove(self)


_HELD: list[OutLock] = []


def _close_in_child() -> None:
    # A forked child (a data loader worker) shares the parent's open lock file, and the flock lasts
    # until every copy is closed: closed in the child, the lock ends with the run that took it.
    for held in _HELD:
        if held.fh is not None:
            held.fh.close()
            held.fh = None
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def acquire(out: str | Path) -> OutLock:
    """Take `out`'s lock (creating `out` if needed) and write this process into it; LockError
    naming the holder when another run has it."""
    out = Path(out)
    path = out / LOCK_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        tries = 0
        while True:
            fh = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                tries += 1
                if tries < 10:  # `holder`'s look lasts microseconds: a run holds it for longer than this
                    fh.close()
                    time.sleep(0.05)
                    continue
                message = _describe(out, fh)
                fh.close()
                raise LockError(message) from None
            # The holder before us may have removed the file between our open and our flock: the lock
            # we hold is then on a file nobody else will open. Take the one now at `path`.
            try:
                if os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "command": shlex.join(sys.argv)[:300]}) + "\n")
        fh.flush()
    except LockError:
        raise
    except OSError as e:
        raise LockError(f"--out {out}: cannot take its lock {path} ({e.strerror or e})", status=1) from None
    held = OutLock(path, fh)
    _HELD.append(held)
    return held
