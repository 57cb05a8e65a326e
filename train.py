"""Train RetriNet, or a baseline of the paper's Sec. 3.1, on a RetriBooru dataset (paper Sec. 5.2,
Supp. A.3-A.4; docs/training.md).

    python train.py --preset tiny --data synthetic/ --out runs/tiny             # CPU, minutes
    torchrun --nproc_per_node 8 train.py --preset sd15 --weights v1-5-pruned-emaonly.safetensors \\
        --data RetriBooru/ --task compose --grad-accum 1 --out runs/compose --checkpointing --zero
        # fp32, global batch 8 x 1 x 1 = the paper's 1 x 8
    torchrun --nproc_per_node 8 train.py --method controlnet --setting a --preset sd15-256 --grad-accum 1 \\
        --weights v1-5-pruned-emaonly.safetensors --data RetriBooru/ --out runs/controlnet-a   # 256 px, fp16

--method retrinet (default) | controlnet | ip-adapter: every method trains in this loop, each with
its own defaults and inputs (retrinet/: the baselines as diffusers' train_controlnet.py and
IP-Adapter's tutorial_train.py). One optimizer step = --grad-accum micro-batches of --batch-size per
process (paper: 1 x 8); the DDP all-reduce runs on the last. Rank 0 writes under --out: args.json,
log.jsonl, checkpoints/step-NNNNNN/ (<method>.safetensors + state.pt), samples/step-NNNNNN.png.
--resume continues bit-exactly from the last checkpoint (training/checkpoints.py says which settings
may change). SIGTERM / SIGINT save at the next step boundary. A step whose loss, gradient or update
is not finite is skipped and undone (training/guard.py); MAX_BAD_STEPS in a row stop the run.
Exit status: 0 done (or stopped by a signal or --time-limit), 2 bad arguments or an --out another
run holds (training/lock.py; nothing built or written), 1 a failure after that (one line on stderr;
earlier checkpoints kept), 3 the non-finite stop.
The tiny preset fine-tunes the shipped tiny SD + CLIP stack (tiny-stack/, `make base`) and copies its
base into --out, so sample.py loads a run as

    python sample.py --weights runs/tiny/base.safetensors --config runs/tiny/base-config.json \\
        --retrinet runs/tiny/checkpoints/step-001500/retrinet.safetensors --refs a.png b.png \\
        --prompt "" --height 24 --width 24 --ref-size 24 --sampler ddim --steps 25
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

# Intel MKL chooses kernels by memory alignment unless told otherwise, so a resumed process can round
# differently from the uninterrupted one (measured on a Xeon with one thread per process: 1-ulp weight
# differences after one step). Strict conditional numerical reproducibility keeps resume exact.
# Set before torch loads MKL.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common.options import PRECISIONS
from common.weights import CheckpointError
from data.dataset import RetriBooruDataset
from data.stream import BatchStream
from training import args as cli
from training import lock
from training import objective
from training.build import build, make_optimizer, param_groups  # noqa: F401  (tests call train.build)
from training.checkpoints import (checkpoint_dirs, model_file, read_state, resume_problems, run_settings,
                                  saved_settings, truncate_log, write_checkpoint)
from training.distributed import (Progress, all_sum, is_collective_failure, setup_distributed,
                                  shared_out_problem)
from training.ema import EMA, EMA_FILE
from training.guard import Guard
from training.log import StepLog
from training.validation import sample_grid, validation_records

MAX_BAD_STEPS = 50  # non-finite steps in a row that stop the run
check_args = cli.check_args


def parse_args(argv=None) -> argparse.Namespace:
    return cli.parse_args(argv, description=__doc__)


class TrainingError(Exception):
    """A failure after the start that ends the run with one line (status 1)."""


class Run:
    """One training run on this process: the models, the optimizer and the batch stream, with the
    four things the loop does: `resume`, `step` (one optimisation step), `save` and `validate`."""

    def __init__(self, args, rank: int, world: int, device, out: Path, dataset, progress):
        self.args, self.rank, self.world, self.device, self.out = args, rank, world, device, out
        self.dataset, self.progress = dataset, progress
        self.master = rank == 0
        self.sd, self.model = build(args, device, rank, out)
        self.params = self.model.trainable_parameters()
        self.log(f"{args.preset}: {sum(p.numel() for p in self.model.parameters()) / 1e6:.1f} M parameters in the "
                 f"denoiser, {sum(p.numel() for p in self.params) / 1e6:.1f} M trainable ({args.method}, "
                 f"lock {args.lock}); {world} process(es) on {device}, {args.precision}")
        progress.at("the first weight broadcast (building DistributedDataParallel)")
        # Gradients as views of DDP's all-reduce buckets: no second copy of them (bench/memory.py).
        self.ddp = (DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                        gradient_as_bucket_view=True) if world > 1 else self.model)
        self.optimizer = make_optimizer(param_groups(self.model, self.params, args.added_lr_scale), args, world)
        self.ema = EMA(self.params, args.ema) if args.ema > 0 else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "fp16")
        self.amp = (torch.autocast(device.type, dtype=getattr(torch, PRECISIONS[args.precision]))
                    if args.precision != "fp32" else contextlib.nullcontext())
        self.text = objective.Conditioning(self.sd)
        # --compile: the gradient half of the loss (the model's forward, the loss, and so the backward)
        # as one graph; the per-sample draws and frozen encoders (draw_step) stay eager. Under DDP its
        # forward's Python hooks run between graphs (dynamo cuts the graph at DDP's buckets anyway).
        self.loss_fn = (torch.compile(objective.denoising_loss, backend=args.compile, fullgraph=world == 1)
                        if args.compile else objective.denoising_loss)
        self.guard = Guard(self.params, self.optimizer, self.scaler, agree=self.all_agree)
        self.step_count = 0
        self.data_pos = {"epoch": 0, "offset": 0}
        self.last_batch = None
        self.batches = None
        self.left_out: set[str] = set()  # validation samples already reported unreadable

    def log(self, msg: str) -> None:
        if self.master:
            print(msg, file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        self.log(f"train.py: warning: {msg}")

    def all_agree(self, ok: bool, step: int) -> bool:
        """Whether `ok` holds on every process (the guard's check of each process's own state)."""
        self.progress.at(f"the update check of step {step}")
        return ok if self.world == 1 else all_sum([not ok], self.world)[0] == 0

    def resume(self, ckpt: Path | None, state: dict | None) -> None:
        """Weights, optimizer, scaler, step, data position and RNG states of checkpoint `ckpt`,
        whose state.pt (`read_state`) is `state`; nothing (step 0) when --resume found none."""
        if ckpt is None:
            self.log(f"--resume: no checkpoint in {self.out / 'checkpoints'}; starting from step 0")
            return
        self.model.load_weights(model_file(ckpt, self.args.method))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{ckpt / 'state.pt'}: its optimizer state does not fit this model's "
                                  f"trainable parameters ({e}; --added-lr-scale 1 keeps one parameter group, any "
                                  f"other value two: resume with the checkpoint's)") from None
        if len(self.optimizer.param_groups) == 2:  # the scale of this run, not the checkpoint's
            self.optimizer.param_groups[1]["lr_scale"] = self.args.added_lr_scale
        if self.scaler.is_enabled() and not state["scaler"]:
            self.log("--resume: the checkpoint's run had no fp16 GradScaler; the scaler starts afresh")
        else:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if (ckpt / EMA_FILE).is_file():
                self.ema.load(self.model, ckpt, state.get("ema_updates", 0))
            else:
                self.log(f"--resume: {ckpt} holds no weight average ({EMA_FILE}); --ema starts one from its weights")
                self.ema = EMA(self.params, self.args.ema)
        self.step_count, self.data_pos = state["step"], state["data"]
        self.guard.resume(state["step"], state["skipped"])
        rng = state["rng"][self.rank] if len(state["rng"]) == self.world else None
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if self.device.type == "cuda" and rng.get("cuda") is not None:
                torch.cuda.set_rng_state(rng["cuda"], self.device)
            random.setstate(rng["python"])
        self.log(f"resumed from {ckpt} at step {self.step_count}")

    def open_data(self) -> None:
        args = self.args
        self.batches = BatchStream(self.dataset, args.batch_size, rank=self.rank, world=self.world, seed=args.seed,
                                   workers=args.workers, pin_memory=self.device.type == "cuda", **self.data_pos)

    def next_batch(self) -> tuple[dict, int, float]:
        """(micro-batch, its epoch, its loss weight). A batch whose every sample was unreadable is
        replaced by the last one at weight 0, so that every process still takes part in the step."""
        batch, epoch = next(self.batches)
        if batch["size"] > 0:
            self.last_batch = (batch, epoch)
            return batch, epoch, 1.0
        if self.last_batch is None:
            raise TrainingError(f"--data {self.args.data}: the first batch holds no readable sample; "
                                f"check the root with python -m data.validate {self.args.data}")
        return (*self.last_batch, 0.0)

    def step(self, stop_requested: bool, out_of_time: bool) -> dict:
        """One optimisation step: --grad-accum micro-batches (DDP's all-reduce on the last), one
        collective for the loss, the sample count and the stop flag, then the update, guarded
        (training/guard.py: skipped when the loss or the gradient is not finite, undone when it
        makes weights that do not compute). Returns what the log and the loop need."""
        args, n = self.args, self.step_count + 1
        lr = objective.lr_at(self.step_count, lr=args.lr, warmup=args.warmup, restart_every=args.restart_every,
                             min_lr=args.min_lr, schedule=args.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        losses, n_samples = [], 0
        self.progress.at(f"the gradient all-reduce of step {n} (with its forward and backward passes)")
        for micro in range(args.grad_accum):
            batch, epoch, weight = self.next_batch()
            n_samples += batch["size"] if weight else 0
            sync = micro == args.grad_accum - 1
            with self.ddp.no_sync() if self.world > 1 and not sync else contextlib.nullcontext():
                with self.amp:
                    loss = objective.diffusion_loss(self.model, self.sd, self.sd.schedule, self.text, batch,
                                                    epoch=epoch, seed=args.seed, face_weight=args.face_weight,
                                                    ref_drop=args.ref_drop, snr_gamma=args.snr_gamma,
                                                    loss_fn=self.loss_fn, forward=self.ddp)
                self.scaler.scale(loss * (weight / args.grad_accum)).backward()
            losses.append(loss.detach().float())
        self.progress.at(f"the loss all-reduce of step {n}")
        loss, n_samples, stopping = all_sum([torch.stack(losses).mean(), n_samples, stop_requested or out_of_time],
                                            self.world)
        loss /= self.world
        grad_norm, grads_ok = float("nan"), False
        if math.isfinite(loss):
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, args.clip_grad or float("inf")).item()
            grads_ok = math.isfinite(grad_norm)

        def update():  # skips the update itself on inf / NaN gradients (the fp16 scaler)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        updated, warning = self.guard.step(n, math.isfinite(loss), grads_ok, update)
        # Under DDP the gradients are views of its buckets: zeroed in place, they stay so; set to None,
        # every step would allocate them again and copy them into the buckets.
        self.optimizer.zero_grad(set_to_none=self.world == 1)
        self.step_count = n
        if updated and self.ema is not None:
            self.ema.update()
        if warning:
            self.warn(warning)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "finite": updated, "samples": n_samples,
                "stopping": bool(stopping)}

    def save(self, tag: str = "") -> Path | None:
        """Collective: ZeRO gathers the full optimizer state on rank 0, which writes the checkpoint;
        then every process learns whether it was written (TrainingError if not). Returns its path
        on rank 0."""
        args, world, step = self.args, self.world, self.step_count
        self.progress.at(f"the checkpoint of step {step} (gathering the optimizer and RNG states)")
        if args.zero and world > 1:
            self.optimizer.consolidate_state_dict(to=0)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        path, error = None, None
        if self.master:
            state = {"step": step, "skipped": self.guard.skipped, "data": self.batches.state(),
                     "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs,
                     "args": json.dumps(vars(args)), "processes": world, "samples": len(self.dataset),
                     "ema_updates": self.ema.updates if self.ema is not None else None}
            try:
                path = write_checkpoint(self.out, step, self.model, state, args.keep, ema=self.ema)
            except OSError as e:
                where = f" ({e.filename})" if e.filename else ""
                error = (f"cannot write the checkpoint of step {step} in {self.out / 'checkpoints'}: "
                         f"{e.strerror or e}{where}; the checkpoints written before are kept")
        self.progress.at(f"the checkpoint of step {step} (waiting for process 0 to write it)")
        failed = all_sum([error is not None], world)[0] if world > 1 else error is not None
        if failed:
            raise TrainingError(error or f"process 0 could not write the checkpoint of step {step} (see its message)")
        self.log(f"saved {path}{tag}")
        return path

    def validate(self, records: list[dict]) -> None:
        """Rank 0 writes samples/step-NNNNNN.png: the validation records' references and samples. A
        record it cannot read is left out with a warning (once per sample); a grid that fails for
        any other reason is a warning too: training goes on."""
        args, step = self.args, self.step_count
        if not (self.master and records):
            return

        def left_out(rec: dict, reason: str) -> None:
            if rec["id"] not in self.left_out:
                self.left_out.add(rec["id"])
                self.warn(f"validation grid: left out sample {rec['id']}: {reason}")

        self.progress.at(f"the validation grid of step {step} (process 0 alone)")
        try:
            with self.amp, self.ema.applied() if self.ema is not None else contextlib.nullcontext():
                grid = sample_grid(self.sd, self.model, Path(args.val_data or args.data), records, k=args.refs,
                                   size=args.resolution, ref_size=args.ref_resolution or args.resolution,
                                   steps=args.val_steps, guidance=args.val_guidance,
                                   ref_guidance=args.val_ref_guidance if args.ref_drop > 0 else None,
                                   seed=args.seed, ref_background=args.ref_background, skip=left_out)
            if grid is None:
                self.warn(f"validation grid of step {step}: no validation sample could be read; no grid")
                return
            (self.out / "samples").mkdir(exist_ok=True)
            grid.save(self.out / "samples" / f"step-{step:06d}.png")
        except Exception as e:  # noqa: BLE001 - a grid is a by-product: it never ends the run
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.warn(f"the validation grid of step {step} failed ({type(e).__name__}: {first}); training goes on")


def error(msg: str) -> None:
    print(f"train.py: error: {msg}", file=sys.stderr, flush=True)


class Refused(Exception):
    """Why the run cannot start: its exit status and the lines that say why."""

    def __init__(self, status: int, *lines: str):
        super().__init__(*lines)
        self.status, self.lines = status, lines


def prepare(args, out: Path, processes: int, master: bool):
    """Before anything is built: the checkpoint to resume and its state, the dataset, the validation
    records, and whether the checkpoint's settings allow this run. Returns (checkpoint, state,
    dataset, validation records); raises Refused."""
    ckpt, state = None, None
    try:
        if args.resume:
            ckpt = Path(args.resume) if args.resume != "latest" else (checkpoint_dirs(out) or [None])[-1]
            state = read_state(ckpt) if ckpt is not None else None
        dataset = RetriBooruDataset(args.data, resolution=args.resolution, k=args.refs, setting=args.setting,
                                    task=args.task, prompt_drop=args.prompt_drop, seed=args.seed,
                                    ref_resolution=args.ref_resolution, ref_background=args.ref_background)
        val_records = validation_records(Path(args.val_data or args.data), args.val_count)  # every process fails alike
    except (CheckpointError, ValueError) as e:  # AnnotationError is a ValueError
        raise Refused(1, str(e)) from None
    if len(dataset) < args.batch_size * processes:
        raise Refused(1, f"--data {args.data}: {len(dataset)} samples, but one micro-batch needs --batch-size "
                         f"{args.batch_size} on each of {processes} process(es), {args.batch_size * processes} "
                         f"samples: lower --batch-size or add samples")
    if state is not None:
        problems, notes = resume_problems(saved_settings(state), run_settings(vars(args), processes, len(dataset)),
                                          ckpt)
        if problems:
            raise Refused(2, *(problems if master else []))
        for note in notes if master else []:
            print(f"train.py: note: --resume: {note}", file=sys.stderr)
    return ckpt, state, dataset, val_records


def prepare_out(args, out: Path, state: dict | None) -> str | None:
    """Process 0 writes args.json into --out and, on --resume, cuts log.jsonl back to the resumed
    step (the steps after it run again). Returns the problem, if any."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=1))
        if args.resume:
            resumed = state["step"] if state is not None else 0
            dropped = truncate_log(out / "log.jsonl", resumed)
            if dropped:
                print(f"train.py: note: --resume: {dropped} line(s) of {out / 'log.jsonl'} after step {resumed} "
                      f"removed; those steps run again", file=sys.stderr)
    except OSError as e:
        return f"--out {out}: cannot write there ({e.strerror or e}{f': {e.filename}' if e.filename else ''})"
    return None


def train_loop(run: Run, log: StepLog, stop: dict, val_records: list[dict]) -> int:
    """One optimisation step at a time, then checkpoint / stop (nanoGPT's loop). Returns the status."""
    args = run.args
    run.model.train()
    while run.step_count < args.max_steps:
        out_of_time = bool(args.time_limit) and time.perf_counter() - log.t_start > 60 * args.time_limit
        result = run.step(stop["signal"] is not None, out_of_time)
        log(run.step_count, result, run.guard.skipped)
        step = run.step_count
        if run.guard.bad_in_row >= MAX_BAD_STEPS:
            path = run.save(" (after non-finite steps)")
            if run.master:
                error(run.guard.stop_message(MAX_BAD_STEPS, path, step, args))
            return 3
        if result["stopping"]:  # every process stops here
            why = stop["signal"] or ("the time limit" if out_of_time else "a signal on another process")
            run.save(f" (stopped by {why} at step {step})")
            return 0
        if step % args.save_every == 0 or step == args.max_steps:
            run.save()
        if args.val_every and step % args.val_every == 0 or step == args.max_steps:
            run.validate(val_records)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    master = int(os.environ.get("RANK", "0")) == 0
    # A run already in --out comes first: the other checks of --out read what it is writing.
    busy = lock.holder(args.out) if master else None
    problems = [busy] if busy else check_args(args)
    if problems:
        for p in problems:
            error(p)
        return 2

    out = Path(args.out)
    processes = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1

    # -- before anything is built: the checkpoint to resume, the data, the resume checks ----------------
    try:
        ckpt, state, dataset, val_records = prepare(args, out, processes, master)
    except Refused as e:
        for line in e.lines:
            error(line)
        return e.status

    # -- one run at a time in --out: process 0 holds its lock for every process, to the end ---------------
    try:
        held = lock.acquire(out) if master else None
    except lock.LockError as e:
        error(str(e))
        return e.status

    # -- the processes ---------------------------------------------------------------------------------
    try:
        rank, world, device = setup_distributed(args.device, args.ddp_timeout)
    except RuntimeError as e:
        if held is not None:
            held.release()
        if not is_collective_failure(e):
            raise
        error(f"the processes did not all meet within --ddp-timeout {args.ddp_timeout:g} min ({str(e).strip()[:300]})")
        return 1
    progress = Progress(rank, world, args.ddp_timeout)
    torch.manual_seed(args.seed + rank)  # per-rank; each sample's own randomness is seeded by its index
    random.seed(args.seed + rank)

    stop = {"signal": None}

    def request_stop(signum, frame):
        if stop["signal"] is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
        print(f"train.py: {stop['signal']} received; saving at the end of this step", file=sys.stderr, flush=True)

    previous, log, status, broken, run = {}, None, 0, False, None
    try:
        # -- the run folder, the build, the resume --------------------------------------------------------
        problem = prepare_out(args, out, state) if rank == 0 else None
        progress.at("the start (waiting for process 0 to prepare --out)")
        if (all_sum([problem is not None], world)[0] if world > 1 else problem is not None):
            raise TrainingError(problem or "process 0 could not prepare --out (see its message)")
        if world > 1:
            problem = shared_out_problem(out, state["step"] if state is not None else None, rank, world)
            if problem:
                raise TrainingError(problem)
        try:
            run = Run(args, rank, world, device, out, dataset, progress)
            if args.resume:
                run.resume(ckpt, state)
            state = None  # the optimizer holds what it needs of it
            run.open_data()
        except (CheckpointError, ValueError) as e:
            raise TrainingError(str(e)) from None
        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

        # -- the loop ------------------------------------------------------------------------------------
        log = StepLog(out / "log.jsonl" if rank == 0 else None, run.step_count, args.max_steps, args.log_every,
                      device)
        status = train_loop(run, log, stop, val_records)
    except TrainingError as e:
        if rank == 0 or "process 0" not in str(e):
            error(e)
        status = 1
    except RuntimeError as e:
        if not (world > 1 and is_collective_failure(e)):
            raise
        error(progress.failure(e))
        status, broken = 1, True
    except OSError as e:  # log.jsonl, a full disk
        error(f"{e.filename or out}: {e.strerror or e}; the checkpoints written before are kept")
        status = 1
    except KeyboardInterrupt:  # a second SIGTERM / SIGINT (request_stop), or one before the loop
        error(f"interrupted at step {run.step_count if run is not None else 0} without saving it (a second SIGTERM "
              f"/ SIGINT stops at once); the checkpoints written before are kept")
        status = 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if log is not None:
            log.close()
        # Free the run (its DDP reducer holds the process group) while the interpreter is whole: left to
        # the garbage collector at exit, gloo's threads could be torn down mid-shutdown (an abort).
        run = None
        gc.collect()
        if world > 1 and not broken:
            dist.destroy_process_group()
        if held is not None:
            held.release()
    return status


if __name__ == "__main__":
    sys.exit(main())
