"""Run under torchrun by test_scale_out; not a test itself, the test reads what it writes.

    ddp_probe.py buckets TRAIN_ARGS...  train.py's Run for three steps, recording after each step where
                                        every trainable parameter's gradient lives: --out/probe-rank{RANK}.json
    ddp_probe.py restart OUT            under --max-restarts: whether a restarted group sees a key of
                                        the first attempt in its store: OUT/restart.json"""
import json
import sys
from pathlib import Path

import torch

import train
from training.distributed import Progress


def buckets(argv: list[str]) -> None:
    args = train.parse_args(argv)
    out = Path(args.out)
    _, _, dataset, _ = train.prepare(args, out, processes=2, master=True)
    rank, world, device = train.setup_distributed(args.device)
    torch.manual_seed(args.seed + rank)
    out.mkdir(parents=True, exist_ok=True)
    run = train.Run(args, rank, world, device, out, dataset, Progress(rank, world, args.ddp_timeout))
    run.open_data()
    named = [(n, p) for n, p in run.model.named_parameters() if p.requires_grad]
    steps = []
    for _ in range(3):
        run.step(stop_requested=False, out_of_time=False)
        steps.append({n: None if p.grad is None else [p.grad.data_ptr(), p.grad.untyped_storage().data_ptr(),
                                                      p.grad.untyped_storage().nbytes()] for n, p in named})
    record = {"steps": steps, "trainable_bytes": sum(p.numel() * p.element_size() for _, p in named)}
    (out / f"probe-rank{rank}.json").write_text(json.dumps(record))
    torch.distributed.destroy_process_group()


def restart(out: str) -> int:
    """The first attempt: process 0 writes a key into the process group's store, the last process
    fails, the others wait (healthy) to be stopped. The next attempt: process 0 records whether it
    sees that key, and every process's TORCHELASTIC_RESTART_COUNT."""
    import os
    import time
    rank = int(os.environ["RANK"])
    first = not Path(out, f"started-{rank}").exists()
    Path(out, f"started-{rank}").touch()
    rank, world, _ = train.setup_distributed("cpu", 1.0)
    store = torch.distributed.distributed_c10d._get_default_store()
    if first:
        if rank == 0:
            store.set("written-by-the-first-attempt", "1")
        if rank == world - 1:
            return 1
        time.sleep(120)  # healthy until torchrun stops this attempt
        return 1
    counts = [None] * world
    torch.distributed.all_gather_object(counts, int(os.environ["TORCHELASTIC_RESTART_COUNT"]))
    if rank == 0:
        sees = store.check(["written-by-the-first-attempt"])
        Path(out, "restart.json").write_text(json.dumps({"sees_the_first_attempt": sees, "restart_counts": counts}))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(buckets(sys.argv[2:]) if sys.argv[1] == "buckets" else restart(sys.argv[2]))
