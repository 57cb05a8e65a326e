"""train.py's step log: one JSON line per logged step in log.jsonl and a progress line on stderr."""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


class StepLog:
    """log.jsonl records and the progress line, every `log_every` steps (and at the end or on a
    non-finite step), with the sample rate since the last record. `path` None (processes other
    than 0): nothing is written."""

    def __init__(self, path: Path | None, first_step: int, max_steps: int, log_every: int, device: torch.device):
        self.file = open(path, "a") if path is not None else None
        self.max_steps, self.log_every, self.device = max_steps, log_every, device
        self.first_step, self.t_start = first_step, time.perf_counter()
        self.t_last, self.samples = self.t_start, 0.0

    def __call__(self, step: int, result: dict, skipped: int) -> None:
        self.samples += result["samples"]
        if self.file is None or not (step % self.log_every == 0 or step == self.max_steps or not result["finite"]):
            return
        now = time.perf_counter()
        rate = self.samples / max(now - self.t_last, 1e-9)
        eta = (self.max_steps - step) * (now - self.t_start) / (step - self.first_step)
        loss, grad_norm = result["loss"], result["grad_norm"]
        record = {"step": step, "loss": loss if math.isfinite(loss) else None, "lr": result["lr"],
                  "grad_norm": grad_norm if math.isfinite(grad_norm) else None, "skipped": skipped,
                  "samples_per_s": round(rate, 3), "peak_memory_mb": round(peak_memory_mb(self.device), 1)}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        print(f"step {step}/{self.max_steps} | loss {loss:.4f} | lr {result['lr']:.2e} | grad norm {grad_norm:.3f} | "
              f"{rate:.1f} samples/s | skipped {skipped} | ETA {int(eta // 60)}m{int(eta % 60):02d}s",
              file=sys.stderr, flush=True)
        self.t_last, self.samples = now, 0.0

    def close(self) -> None:
        if self.file:
            self.file.close()
