"""train.py's processes: the process group (NCCL on CUDA, gloo on the CPU) with a finite timeout and a
store prefix of its torchrun attempt's own, the one collective of the step's scalars, and what a
process says when a collective fails.

Every process records where it is (`Progress.at`: the step and the collective it is about to
reach) in the rendezvous store. When a collective times out (--ddp-timeout) or loses a process, the
processes that gave up each post that they did in the store, wait a short grace period for the
others to do the same, and name the processes that did not: those are the ones that did not answer
(stalled, stopped or dead), with the place each last reported. Each survivor prints one line and
exits with status 1; the last checkpoint stays as it was.

gloo raises the timeout in the waiting call, where train.py catches it. NCCL's own watchdog handles
its timeouts: with the default TORCH_NCCL_ASYNC_ERROR_HANDLING it tears the process down with a log
line naming the operation (e.g. ``WorkNCCL(SeqNum=12, OpType=ALLREDUCE, ...) ran for 1800000
milliseconds before timing out``); the finite timeout applies all the same."""
from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

PREFIX = "retrinet-train"
# What the transports say when a peer stalls or goes away (gloo: "Timed out waiting 3000ms for recv
# operation to complete", "Connection closed by peer", "Application timeout caused pair closure").
FAILURE_PATTERNS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                    "pair closure", "connection refused")


def setup_distributed(device: str, timeout_minutes: float = 30.0):
    """(rank, world size, device) from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on
    CUDA, gloo on the CPU; collectives time out after `timeout_minutes`."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    timeout = timedelta(minutes=timeout_minutes)
    group = dict(store=store_of_this_attempt(rank, world, timeout), rank=rank, world_size=world, timeout=timeout)
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local), **group)
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo", **group)
    return rank, world, torch.device("cpu")


def store_of_this_attempt(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """torchrun's rendezvous store under a prefix that only this attempt's processes use.

    torchrun keeps one store server across the restarts of `--max-restarts`, keys included, so a
    restarted group would read what the group before it wrote: gloo then connects to a dead
    process's address ("connectFullMesh failed ... Connection refused") and a later restart can wait
    on stale keys for good. No value in that store tells this attempt from an earlier one, and
    TORCHELASTIC_RESTART_COUNT differs between nodes (an agent restarted for a membership change does
    not count it), so the processes agree on a fresh prefix: each posts a random nonce; process 0
    answers every nonce it reads with its random token, under a key named by that nonce (no earlier
    attempt can have written it), until every process has acknowledged the token under a key named
    by the token."""
    import secrets

    from torch.distributed.rendezvous import rendezvous
    store, _, _ = next(rendezvous("env://", timeout=timeout))
    if world == 1:
        return store
    if rank == 0:
        token, waiting = secrets.token_hex(8), set(range(1, world))
        deadline = time.monotonic() + timeout.total_seconds()
        while waiting:
            for r in sorted(waiting):
                if store.check([f"{PREFIX}/hello/{r}"]):  # this attempt's nonce, or an earlier one's
                    store.set(f"{PREFIX}/token-for/{store.get(f'{PREFIX}/hello/{r}').decode()}", token)
                if store.check([f"{PREFIX}/token/{token}/{r}"]):
                    waiting.discard(r)
            if waiting and time.monotonic() > deadline:
                raise dist.DistStoreError(f"timeout: processes {sorted(waiting)} did not join this attempt")
            time.sleep(0.02)
    else:
        nonce = secrets.token_hex(8)
        store.set(f"{PREFIX}/hello/{rank}", nonce)
        token = store.get(f"{PREFIX}/token-for/{nonce}").decode()  # waits for process 0, up to the timeout
        store.set(f"{PREFIX}/token/{token}/{rank}", "1")
    return dist.PrefixStore(f"{PREFIX}/attempt-{token}", store)


def all_sum(values: list, world: int) -> list[float]:
    """The sums of a few floats over processes, in one all-reduce every process must reach (on the
    current CUDA device under NCCL, which reduces no CPU tensor)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if world > 1:
        if dist.get_backend() == "nccl":
            t = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(t)
    return t.tolist()


def is_collective_failure(e: BaseException) -> bool:
    """Whether `e` is a collective that timed out or lost a process (not a bug in the step itself)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and any(p in str(e).lower() for p in FAILURE_PATTERNS)


class Progress:
    """Where this process is, kept in the rendezvous store for the others (one small store write
    per mark, a few per step); `failure` turns a failed collective into one line."""

    def __init__(self, rank: int, world: int, timeout_minutes: float):
        self.rank, self.world, self.timeout_minutes = rank, world, timeout_minutes
        self.where = "starting"
        self.store = None
        if world > 1:
            try:
                self.store = dist.distributed_c10d._get_default_store()
            except Exception:  # noqa: BLE001 - a private accessor: without it, no names in the diagnosis
                self.store = None

    def at(self, where: str) -> None:
        self.where = where
        if self.store is not None:
            try:
                self.store.set(f"{PREFIX}/at/{self.rank}", where)
            except Exception:  # noqa: BLE001 - the store is gone: carry on without it
                self.store = None

    def silent_processes(self) -> dict[int, str] | None:
        """{rank: where it last reported} of the processes that did not give up waiting with this
        one within a grace period; None when the store cannot tell."""
        if self.store is None:
            return None
        grace = min(30.0, max(2.0, 15.0 * self.timeout_minutes))  # a quarter of the timeout, within [2 s, 30 s]
        try:
            self.store.set_timeout(timedelta(seconds=grace + 5))
            self.store.set(f"{PREFIX}/failed/{self.rank}", self.where)
            others = [r for r in range(self.world) if r != self.rank]
            deadline = time.monotonic() + grace
            while True:
                silent = [r for r in others if not self.store.check([f"{PREFIX}/failed/{r}"])]
                if not silent or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            return {r: (self.store.get(f"{PREFIX}/at/{r}").decode()
                        if self.store.check([f"{PREFIX}/at/{r}"]) else "no report") for r in silent}
        except Exception:  # noqa: BLE001 - the store's host is the stalled process, or gone
            return None

    def failure(self, e: BaseException) -> str:
        """One line: which collective failed on this process, how, and which processes did not answer."""
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        how = (f"timed out after {self.timeout_minutes:g} min (--ddp-timeout)" if "time" in text.lower()
               else f"failed ({text})")
        silent = self.silent_processes()
        if silent is None:
            who = "which process did not answer is unknown (the rendezvous store did not answer either)"
        elif not silent:
            who = "every other process gave up waiting too: the network or the backend failed"
        else:
            who = "; ".join(f"process {r} did not answer (the last place it reported: {w})"
                            for r, w in sorted(silent.items()))
        return (f"process {self.rank}: {self.where} {how}: {who}. The checkpoints written before are kept; "
                f"continue with --resume once every process runs")


def shared_out_problem(out, resumed_step: int | None, rank: int, world: int) -> str | None:
    """Whether every process sees the same --out (on several nodes it must be a filesystem they all
    mount) and resumes from the same checkpoint. Process 0 writes a file with a fresh token into
    --out; each process reads it back; the processes exchange what they saw (one collective).
    Returns the problem as one line, the same on every process, or None."""
    import secrets
    from pathlib import Path
    marker = Path(out) / ".shared-out-check"
    token = [secrets.token_hex(8) if rank == 0 else None]
    if rank == 0:
        marker.write_text(token[0])
    dist.broadcast_object_list(token, src=0)
    try:
        sees = marker.read_text() == token[0]
    except OSError:
        sees = False
    seen = [None] * world
    dist.all_gather_object(seen, (sees, resumed_step, os.uname().nodename))
    dist.barrier()
    if rank == 0:
        marker.unlink(missing_ok=True)
    blind = [f"process {r} on {host}" for r, (ok, _, host) in enumerate(seen) if not ok]
    if blind:
        return (f"--out {out} is not shared: {', '.join(blind)} cannot see what process 0 wrote there; on several "
                f"nodes --out must be on a filesystem every node mounts at the same path")
    steps = {step for _, step, _ in seen}
    if len(steps) > 1:
        return (f"--resume: the processes found different last checkpoints in --out {out} (steps "
                f"{', '.join(str(s) for s in sorted(steps, key=lambda s: -1 if s is None else s))}); is a checkpoint "
                f"being written by another run?")
    return None
