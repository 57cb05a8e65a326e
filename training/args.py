"""train.py's command line: its options, the defaults each preset and method fills in, and every
check of their values, made before anything is built or written (train.py exits with status 2 and
one line per problem)."""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

from common.options import (COMPILE_DEFAULT, COMPILE_HELP, DEVICE_PATTERN, PRECISIONS, compile_problems,
                            cuda_problems, resolve_device)
from data.dataset import REF_BACKGROUNDS, SETTINGS, TASKS
from retrinet import LOCKS, METHODS
from .checkpoints import checkpoint_dirs
from .objective import SCHEDULES
from .presets import PRESETS, STACK, stack_problems


def parse_args(argv=None, description: str | None = None) -> argparse.Namespace:
    """train.py's command line, with the preset's and the method's defaults filled in where it
    gives no value; `args.explicit` names the options it gave."""
    ap = argparse.ArgumentParser(prog="train.py", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="sd15",
                    help="sd15: on SD v1.5 (--weights), 384 px, fp32 (RetriNet as the paper); sd15-256: the same at "
                         "256 px in fp16 (the paper's baselines, Supp. A.3); tiny: the miniature SD + CLIP of --stack "
                         "(pixel space, 24 px, CPU), fine-tuned as the paper fine-tunes SD")
    ap.add_argument("--stack", default=None,
                    help="--preset tiny: the pre-trained tiny stack to start from (default: the shipped tiny-stack/)")
    ap.add_argument("--from-scratch", action="store_true",
                    help="--preset tiny: no pre-trained stack; a fresh U-Net trains with the method (lock none) on a "
                         "random frozen text encoder (and a random image encoder for the IP-Adapter)")
    ap.add_argument("--weights", default=None, help="SD v1.5 single file or diffusers folder (presets sd15*)")
    ap.add_argument("--config", default=None, help="JSON of unet / vae / text_encoder configs for --weights "
                                                   "that are not SD v1.5's shape (as sample.py --config)")
    ap.add_argument("--data", required=True, help="RetriBooru root (annotations.jsonl)")
    ap.add_argument("--out", required=True, help="output folder")
    task = ap.add_argument_group("task (Sec. 5.2)")
    task.add_argument("--method", choices=list(METHODS), default="retrinet",
                      help="retrinet, or a baseline of Sec. 3.1: controlnet, ip-adapter")
    task.add_argument("--task", choices=TASKS, default="recon")
    task.add_argument("--setting", choices=SETTINGS, default="b", help="a: target and references are independent transforms of one image (leaky, Sec. 3.1); "
                           "b: references are other images of the same identity")
    task.add_argument("--refs", type=int, default=None, help="references per target (K; default 2, baselines 1)")
    task.add_argument("--lock", choices=LOCKS, default=None,
                      help="none: train the method's module + SD decoder (RetriNet's default); decoder: LockD, "
                           "SD frozen (the baselines' default); both: LockB, RetriNet's E / the ControlNet's "
                           "encoder frozen too")
    task.add_argument("--prompt-drop", "--p-drop", type=float, default=None, dest="prompt_drop",
                      help="probability of replacing the prompt by \"\" (default 0.5; the paper's P025 / P075: "
                           "0.25 / 0.75; IP-Adapter drops with its own scheme)")
    task.add_argument("--face-weight", type=float, default=None,
                      help="lambda_face of Eq. 3 (RetriNet: 0.1; the baselines: 0, Sec. 3.1 uses no face loss)")
    task.add_argument("--ref-drop", type=float, default=0.0,
                      help="probability of replacing all references by a learned null reference (enables "
                           "--ref-guidance at sampling; our addition, 0 by default)")
    task.add_argument("--resolution", type=int, default=None)
    task.add_argument("--ref-resolution", type=int, default=None, help="reference side (default: --resolution)")
    task.add_argument("--ref-background", choices=REF_BACKGROUNDS, default="keep",
                      help="white: references show only the figure, their background whitened through the "
                           "sample's segmentation mask (Supp. A.1); keep: whole pictures (the default; the paper does not "
                           "say whether its references keep their background)")
    task.add_argument("--heads", type=int, default=None, help="attention heads of RetriNet's cross-attention")
    task.add_argument("--image-encoder", default=None,
                      help="ip-adapter with --preset sd15*: CLIP vision weights (the official image_encoder/ folder, "
                           "ViT-H/14, or openai/clip-vit-large-patch14, the paper's ViT-L/14)")
    opt = ap.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, default=None, help="per process and micro-batch")
    opt.add_argument("--grad-accum", type=int, default=None)
    opt.add_argument("--lr", type=float, default=None)
    opt.add_argument("--min-lr", type=float, default=0.0)
    opt.add_argument("--schedule", choices=SCHEDULES, default=None,
                     help="learning-rate schedule (training/objective.py lr_at): cosine-restarts (RetriNet's "
                          "default, Supp. A.4), constant after --warmup (the baselines' default, as their "
                          "official scripts)")
    opt.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: the preset's for "
                                                               "RetriNet, 0 for the baselines)")
    opt.add_argument("--restart-every", type=int, default=None,
                     help="cosine-restarts: restart period (steps; --schedule constant takes none)")
    opt.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 1e-2)")
    opt.add_argument("--adam-eps", type=float, default=None, help="AdamW eps (default 1e-8)")
    opt.add_argument("--clip-grad", type=float, default=None,
                     help="max gradient norm (0: no clipping; default 1.0, 0 for the IP-Adapter as its official "
                          "training)")
    opt.add_argument("--max-steps", type=int, default=None)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--zero", action="store_true", help="shard the AdamW state across processes (ZeRO-1)")
    opt.add_argument("--added-lr-scale", type=float, default=1.0, metavar="X",
                     help="learning rate of the method's added modules (RetriNet's E, cross-attention and zero "
                          "convs; the ControlNet; the IP-Adapter's layers) as a multiple of --lr")
    opt.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                     help="keep an exponential moving average of the trainable weights with this decay (e.g. "
                          "0.995; 0: none; one more fp32 copy of them in memory); checkpoints then hold it as "
                          "ema.safetensors, and validation samples from it (training/ema.py)")
    opt.add_argument("--snr-gamma", type=float, default=0.0, metavar="GAMMA",
                     help="min-SNR-gamma loss weighting (e.g. 5; 0: off, as the paper); training/objective.py")
    run = ap.add_argument_group("run")
    run.add_argument("--precision", choices=list(PRECISIONS), default=None,
                     help="default: the preset's (fp32; fp16 for sd15-256)")
    run.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in E and the decoder")
    run.add_argument("--compile", nargs="?", const=COMPILE_DEFAULT, default=None, metavar="BACKEND",
                     help=COMPILE_HELP + "; the model's forward and the loss, backward included")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    run.add_argument("--workers", type=int, default=None, help="data loader processes per training process")
    run.add_argument("--time-limit", type=float, default=0,
                     help="minutes; past it, save and stop at the next step boundary (0: none)")
    run.add_argument("--save-every", type=int, default=500)
    run.add_argument("--keep", type=int, default=3, help="checkpoints kept (0: all)")
    run.add_argument("--resume", nargs="?", const="latest", default=None,
                     help="continue from the last checkpoint in --out, or from the given checkpoint folder; with "
                          "no checkpoint there, start afresh. Give it under torchrun --max-restarts: a restarted "
                          "group then continues from the last complete checkpoint")
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--val-every", type=int, default=0, help="validation grid period (0: at the end only)")
    run.add_argument("--val-data", default=None, help="RetriBooru root of the validation samples (default --data)")
    run.add_argument("--val-count", type=int, default=4)
    run.add_argument("--val-steps", type=int, default=None)
    run.add_argument("--val-guidance", type=float, default=3.0)
    run.add_argument("--val-ref-guidance", type=float, default=3.0, help="used when --ref-drop > 0")
    run.add_argument("--ddp-timeout", type=float, default=30.0,
                     help="minutes a process waits in a collective (several processes) before it gives up, names "
                          "the processes that did not answer and exits with status 1; longer than a validation grid "
                          "and a checkpoint write, which the other processes wait for")
    args = ap.parse_args(argv)
    args.explicit = sorted(k for k, v in vars(args).items() if v is not None and ap.get_default(k) is None)
    for defaults in (METHODS[args.method].training_defaults, PRESETS[args.preset]):
        for name, value in defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    if args.preset == "tiny" and args.from_scratch and "lock" not in args.explicit:
        args.lock = "none"  # a base trained from scratch trains with everything
    if args.preset == "tiny" and not args.from_scratch and args.stack is None:
        args.stack = str(STACK)
    if METHODS[args.method].reference_at_target_size and "ref_resolution" not in args.explicit:
        args.ref_resolution = args.resolution  # ControlNet: the hint is the reference at the target's size
    return args


# Options that must be finite numbers (argparse's float() takes "nan" and "inf"), and the range of
# each: (name, test, what is expected), tested once the value is finite.
FINITE = ("lr", "min_lr", "clip_grad", "face_weight", "prompt_drop", "ref_drop", "adam_eps", "weight_decay",
          "val_guidance", "val_ref_guidance", "time_limit", "ddp_timeout", "ema", "snr_gamma",
          "added_lr_scale")
RANGES = (("prompt_drop", lambda v, a: 0 <= v <= 1, "within [0, 1]"),
          ("ref_drop", lambda v, a: 0 <= v <= 1, "within [0, 1]"),
          ("lr", lambda v, a: v > 0, "> 0"),
          ("min_lr", lambda v, a: 0 <= v <= a.lr or not math.isfinite(a.lr), "within [0, --lr]"),
          ("clip_grad", lambda v, a: v >= 0, ">= 0 (0: no clipping)"),
          ("face_weight", lambda v, a: v >= 0, ">= 0"),
          ("adam_eps", lambda v, a: v > 0, "> 0"),
          ("weight_decay", lambda v, a: v >= 0, ">= 0"),
          ("time_limit", lambda v, a: v >= 0, ">= 0 (0: none)"),
          ("ddp_timeout", lambda v, a: v > 0, "> 0 (minutes)"),
          ("ema", lambda v, a: 0 <= v < 1, "within [0, 1) (0: no average)"),
          ("snr_gamma", lambda v, a: v >= 0, ">= 0 (0: off)"),
          ("added_lr_scale", lambda v, a: v > 0, "> 0"))
POSITIVE = ("heads", "refs", "resolution", "batch_size", "grad_accum", "restart_every", "max_steps", "save_every",
            "log_every", "val_steps")
NON_NEGATIVE = ("warmup", "workers", "keep", "val_count", "val_every", "seed")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(args: argparse.Namespace) -> list[str]:
    """Every problem with the arguments, found before anything is built (nothing is written)."""
    problems = []
    if args.preset != "tiny" and not args.weights:
        problems.append(f"--preset {args.preset} needs --weights (SD v1.5, single file or diffusers folder)")
    if args.weights and not Path(args.weights).exists():
        problems.append(f"--weights {args.weights}: no such file or folder")
    if args.preset == "tiny" and (args.weights or args.config):
        problems.append("--preset tiny starts from its tiny stack (--stack): --weights / --config belong to the sd15 presets")
    if args.preset != "tiny" and (args.stack or args.from_scratch):
        problems.append(f"--stack / --from-scratch belong to --preset tiny, not {args.preset}")
    if args.preset == "tiny" and args.from_scratch and args.stack:
        problems.append("--from-scratch builds no stack: leave out --stack")
    if args.preset == "tiny" and not args.from_scratch:
        problems += [f"--stack: {p}" for p in stack_problems(args.stack)]
    if args.config and not Path(args.config).is_file():
        problems.append(f"--config {args.config}: no such file")
    elif args.config:
        from diffusion.sd15 import load_configs
        try:   # a downloaded file: typed and bounded before anything is built from it
            load_configs(args.config)
        except ValueError as e:
            problems.append(f"--config {e}")
    for root in filter(None, (args.data, args.val_data)):
        if not (Path(root) / "annotations.jsonl").is_file():
            problems.append(f"{root}: no annotations.jsonl (not a RetriBooru root)")
    problems += [f"{flag(n)} {getattr(args, n)} must be at least 1" for n in POSITIVE if getattr(args, n) < 1]
    problems += [f"{flag(n)} {getattr(args, n)} must be >= 0" for n in NON_NEGATIVE if getattr(args, n) < 0]
    problems += [f"{flag(n)} {getattr(args, n)} must be a finite number" for n in FINITE
                 if not math.isfinite(getattr(args, n))]
    problems += [f"{flag(n)} {getattr(args, n)} must be {expected}" for n, test, expected in RANGES
                 if math.isfinite(getattr(args, n)) and not test(getattr(args, n), args)]
    for name in ("resolution", "ref_resolution"):
        if getattr(args, name) is not None and (getattr(args, name) < 8 or getattr(args, name) % 8):
            problems.append(f"{flag(name)} {getattr(args, name)} must be a positive multiple of 8")
    if args.preset == "tiny" and args.from_scratch and args.lock != "none":
        problems.append("--from-scratch trains the base U-Net with the method: only --lock none applies")
    problems += device_problems(args)
    problems += compile_problems(args.compile)
    problems += schedule_problems(args)
    problems += out_problems(args)
    if args.resume and args.resume != "latest" and not (Path(args.resume) / "state.pt").is_file():
        problems.append(f"--resume {args.resume}: not a checkpoint folder (no state.pt)")
    return problems + method_problems(args)


def schedule_problems(args: argparse.Namespace) -> list[str]:
    """What the constant schedule does not take: a restart period, a cosine floor."""
    if args.schedule != "constant":
        return []
    problems = []
    if "restart_every" in args.explicit:
        problems.append(f"--restart-every {args.restart_every}: --schedule constant has no restarts (it belongs "
                        f"to --schedule cosine-restarts)")
    if math.isfinite(args.min_lr) and args.min_lr != 0:
        problems.append(f"--min-lr {args.min_lr}: --schedule constant has no cosine floor (it belongs to "
                        f"--schedule cosine-restarts)")
    return problems


def device_problems(args: argparse.Namespace) -> list[str]:
    """--device: cpu, cuda, cuda:N or auto (resolved here), and what --precision needs of it."""
    if not DEVICE_PATTERN.fullmatch(args.device):
        return [f"--device {args.device}: expected cpu, cuda, cuda:N or auto"]
    args.device = resolve_device(args.device)
    problems = cuda_problems(args.device)
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        problems.append("--precision fp16 (with a GradScaler) needs CUDA; use fp32 or bf16 on the CPU")
    return problems


def out_problems(args: argparse.Namespace) -> list[str]:
    """--out: a folder this process can write (tried with a temporary file when it exists, else its
    nearest existing parent must be a writable folder; nothing is created), and without another
    run's checkpoints unless --resume continues them."""
    out = Path(args.out)
    if out.exists():
        if not out.is_dir():
            return [f"--out {out}: is a file, expected a folder (new, or a run's to --resume)"]
        try:
            with tempfile.NamedTemporaryFile(dir=out):
                pass
        except OSError as e:
            return [f"--out {out}: cannot write there ({e.strerror or e})"]
        done = checkpoint_dirs(out)
        if done and not args.resume:
            return [f"--out {out}: holds the checkpoints of an earlier run (last: {done[-1].name}); add --resume "
                    f"to continue it, or choose a new --out"]
        return []
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return [f"--out {out}: cannot create it, {parent} is a file"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"--out {out}: cannot create it, {parent} is not writable"]
    return []


def method_problems(args: argparse.Namespace) -> list[str]:
    """Options that do not apply to --method (each method says which: `option_problems`)."""
    cls = METHODS[args.method]
    problems = []
    if args.image_encoder and not cls.needs_image_encoder:
        problems.append(f"--image-encoder belongs to --method ip-adapter, not {args.method}")
    return problems + cls.option_problems(args)
