"""Run under torchrun by test_scale_out: train.py's Run for three steps, recording after each step
where every trainable parameter's gradient lives, into --out/probe-rank{RANK}.json. Not a test
itself: the test reads what it wrote."""
import json
import sys
from pathlib import Path

import torch

import train
from training.distributed import Progress


def main(argv: list[str]) -> None:
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


if __name__ == "__main__":
    main(sys.argv[1:])
