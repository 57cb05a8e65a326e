"""Benchmark: RetriBooru loader throughput, samples per second per worker, at 384 px with K = 2
references from 512-px source images (a synthetic dataset generated first).

    .venv/bin/python bench/data.py [--samples 200] [--workers 0 1 2]

Target: >= 50 samples/s per worker on the 2-core dev machine, so data loading never limits a GPU.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch.utils.data import DataLoader  # noqa: E402

from data.dataset import RetriBooruDataset, collate  # noqa: E402
from data.synthetic import generate  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200, help="samples read per measurement")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--resolution", type=int, default=384)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate(Path(tmp), identities=25, images_per_identity=4, size=512, seed=0)
        print(f"generated 100 synthetic images at 512 px in {time.perf_counter() - start:.1f} s", flush=True)
        for task in ("recon", "compose"):
            ds = RetriBooruDataset(tmp, resolution=args.resolution, k=2, task=task)
            for workers in args.workers:
                loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=workers, collate_fn=collate,
                                    persistent_workers=workers > 0)
                n, start, epoch = 0, time.perf_counter(), 0
                while n < args.samples:
                    ds.set_epoch(epoch)
                    for batch in loader:
                        n += batch["size"]
                        if n >= args.samples:
                            break
                    epoch += 1
                rate = n / (time.perf_counter() - start)
                per = rate / max(workers, 1)
                print(f"task {task:8s} {workers} worker(s): {rate:7.1f} samples/s, {per:6.1f} per worker "
                      f"({'main process' if workers == 0 else 'worker processes'})", flush=True)


if __name__ == "__main__":
    main()
