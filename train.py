"""Train RetriNet, or a baseline of the paper's Sec. 3.1, on a RetriBooru dataset (paper Sec. 5.2,
Supp. A.3-A.4; docs/design.md sections 3-5).

    python train.py --preset tiny --data synthetic/ --out runs/tiny             # CPU, minutes
    torchrun --nproc_per_node 8 train.py --preset sd15 --weights v1-5-pruned-emaonly.safetensors \\
        --data RetriBooru/ --task compose --out runs/compose --checkpointing --zero    # fp32, as the paper
    torchrun --nproc_per_node 8 train.py --method controlnet --setting a --preset sd15-256 \\
        --weights v1-5-pruned-emaonly.safetensors --data RetriBooru/ --out runs/controlnet-a   # 256 px, fp16

--method retrinet (default) | controlnet | ip-adapter: every method trains in this loop. The
baselines take one whole-figure reference (--task recon, K = 1) and train as their own code does:
ControlNet as diffusers' train_controlnet.py (SD frozen, lock "decoder"; the reference at the
target's size is the hint; prompts emptied with --prompt-drop), IP-Adapter as its official
tutorial_train.py (SD and the CLIP image encoder frozen, lock "decoder"; the image embedding, the
text or both dropped with probability 0.05 each; --image-encoder gives the encoder for sd15).

One optimizer step = --grad-accum micro-batches of --batch-size per process, so the global batch is
processes x batch size x accumulation (paper: 1 x 8). The DDP gradient all-reduce runs on the last
micro-batch only. Rank 0 writes everything under --out: log.jsonl (one JSON line per logged step),
args.json, checkpoints/step-NNNNNN/ (retrinet.safetensors + state.pt), samples/step-NNNNNN.png.
`--resume` continues from the last checkpoint with the same losses and weights as a run that was
never stopped (and starts afresh when there is none, so under `torchrun --max-restarts N` a group
restarted after a worker died picks up where the last complete checkpoint left off); it refuses settings that would change what the checkpoint's weights or data position
mean (training/checkpoints.py RESUME_FIXED), notes the others that changed, and cuts log.jsonl back
to the resumed step. SIGTERM / SIGINT save a checkpoint at the next step boundary and exit cleanly.
A step whose loss, gradient or update is not finite is skipped and the weights go back to the last
finite ones (training/guard.py); MAX_BAD_STEPS of them in a row save those and stop with status 3.
A collective that waits longer than --ddp-timeout names the processes that did not answer
(training/distributed.py). Under several processes --out must be one folder they all see (on several
nodes, a shared filesystem): that is checked at the start. Exit status: 0 done (or stopped by a signal / the time limit), 2 bad
arguments (nothing built or written), 1 a failure after that (one line; the checkpoints written
before are kept), 3 the non-finite stop. Problems are one line each on stderr, "train.py: error: ...".
The tiny preset fine-tunes the shipped pre-trained tiny stack (tiny-stack/: SD v1.5 and CLIP in
miniature, made by `make base`; another with --stack, none with --from-scratch) as the paper
fine-tunes SD, and copies its base.safetensors + base-config.json into --out for sample.py:

    python sample.py --weights runs/tiny/base.safetensors --config runs/tiny/base-config.json \\
        --retrinet runs/tiny/checkpoints/step-001500/retrinet.safetensors --refs a.png b.png \\
        --prompt "" --height 24 --width 24 --ref-size 24 --sampler ddim --steps 25
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

from common.options import COMPILE_DEFAULT, COMPILE_HELP, PRECISIONS, compile_problems

# Intel MKL chooses kernels by memory alignment unless told otherwise, so a resumed process can round
# differently from the uninterrupted one (measured on a Xeon with one thread per process: 1-ulp weight
# differences after one step). Strict conditional numerical reproducibility keeps resume exact.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

MAX_BAD_STEPS = 50  # non-finite steps in a row that stop the run


def parse_args(argv=None) -> argparse.Namespace:
    from data.dataset import REF_BACKGROUNDS, SETTINGS, TASKS
    from retrinet import LOCKS, METHODS
    from training.presets import METHOD_DEFAULTS, PRESETS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    opt.add_argument("--warmup", type=int, default=None)
    opt.add_argument("--restart-every", type=int, default=None, help="cosine schedule restart period (steps)")
    opt.add_argument("--weight-decay", type=float, default=1e-2)
    opt.add_argument("--adam-eps", type=float, default=1e-8)
    opt.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: no clipping)")
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
    for defaults in (METHOD_DEFAULTS[args.method], PRESETS[args.preset]):
        for name, value in defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    if args.preset == "tiny" and args.from_scratch and "lock" not in args.explicit:
        args.lock = "none"  # a base trained from scratch trains with everything
    if args.preset == "tiny" and not args.from_scratch and args.stack is None:
        from training.presets import STACK
        args.stack = str(STACK)
    if args.method == "controlnet" and "ref_resolution" not in args.explicit:
        args.ref_resolution = args.resolution  # the hint is the reference at the target's size
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
        from training.presets import stack_problems
        problems += [f"--stack: {p}" for p in stack_problems(args.stack)]
    if args.config and not Path(args.config).is_file():
        problems.append(f"--config {args.config}: no such file")
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
    problems += out_problems(args)
    if args.resume and args.resume != "latest" and not (Path(args.resume) / "state.pt").is_file():
        problems.append(f"--resume {args.resume}: not a checkpoint folder (no state.pt)")
    return problems + method_problems(args)


def device_problems(args: argparse.Namespace) -> list[str]:
    """--device: cpu, cuda, cuda:N or auto (resolved here), and what --precision needs of it."""
    from common.options import DEVICE_PATTERN, cuda_problems, resolve_device
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
    from training.checkpoints import checkpoint_dirs
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
    """Options that do not apply to --method: the baselines take one whole-figure reference
    (Sec. 3.1) and have no null reference or reference attention."""
    method = f"--method {args.method}"
    problems = []
    if args.image_encoder and args.method != "ip-adapter":
        problems.append(f"--image-encoder belongs to --method ip-adapter, not {args.method}")
    if args.method == "retrinet":
        return problems
    if args.task != "recon":
        problems.append(f"{method} takes one whole-figure reference: only --task recon applies, got {args.task}")
    if args.refs != 1:
        problems.append(f"{method} takes one reference: --refs 1, got {args.refs}")
    if args.ref_drop > 0:
        problems.append(f"--ref-drop replaces RetriNet's references by its learned null reference; {method} has none")
    if "heads" in args.explicit:
        problems.append(f"--heads sets RetriNet's reference attention; {method} has none")
    if args.method == "controlnet" and args.ref_resolution != args.resolution:
        problems.append(f"{method}: the hint is the reference at the target's size, so --ref-resolution "
                        f"{args.ref_resolution} must equal --resolution {args.resolution}")
    if args.method == "ip-adapter":
        if args.lock == "both":
            problems.append("--lock both (LockB) freezes an encoder the IP-Adapter does not have; use none or decoder")
        if "prompt_drop" in args.explicit:
            problems.append("--prompt-drop: the IP-Adapter drops the text, the image or both with probability 0.05 "
                            "each, as its official training; it takes no --prompt-drop")
        if args.preset != "tiny" and not args.image_encoder:
            problems.append(f"--method ip-adapter with --preset {args.preset} needs --image-encoder (CLIP vision "
                            f"weights: the official image_encoder/ folder or openai/clip-vit-large-patch14)")
        if args.preset == "tiny" and args.image_encoder:
            problems.append("--preset tiny takes its image encoder from its stack's CLIP: --image-encoder belongs to "
                            "the sd15 presets")
        if args.image_encoder and not Path(args.image_encoder).exists():
            problems.append(f"--image-encoder {args.image_encoder}: no such file or folder")
    return problems


# -- distributed: training/distributed.py ----------------------------------------------------------

def setup_distributed(device: str, timeout_minutes: float = 30.0):
    from training.distributed import setup_distributed as setup
    return setup(device, timeout_minutes)


def all_sum(values: list, world: int) -> list[float]:
    from training.distributed import all_sum as reduce
    return reduce(values, world)


class TrainingError(Exception):
    """A failure after the start that ends the run with one line (status 1)."""


# -- the run ---------------------------------------------------------------------------------------

def build(args, device, rank: int, out: Path):
    """The SD parts and the --method model around SD's U-Net, on `device`; frozen parts in half
    precision under amp."""
    import torch
    from diffusion.sd15 import load_configs, load_sd15
    from retrinet import ControlNetUNet, IPAdapterUNet, RetriUNet
    from training.presets import build_tiny, frozen_to, image_encoder_for, load_tiny_stack, save_base
    from unet import UNetEncoder
    if args.preset == "tiny" and not args.from_scratch:
        if args.resume and (out / "base.safetensors").is_file():  # the run's own copy, whatever --stack holds now
            sd = load_sd15(out / "base.safetensors", configs=load_configs(out / "base-config.json"))
        else:
            sd = load_tiny_stack(args.stack)
            if rank == 0:
                copy_base(Path(args.stack), out)
    elif args.preset == "tiny":
        sd = build_tiny(args.seed)
        if rank == 0 and not (out / "base.safetensors").is_file():
            save_base(sd, out)
        if (out / "base.safetensors").is_file():  # resume: the very same frozen text encoder
            from safetensors.torch import load_file
            state = load_file(out / "base.safetensors")
            p = "cond_stage_model.transformer."
            sd.text_encoder.load_state_dict({k[len(p):]: v for k, v in state.items() if k.startswith(p)})
    else:
        sd = load_sd15(args.weights, configs=load_configs(args.config) if args.config else None)
    for part in (sd.unet, sd.vae, sd.text_encoder):
        part.to(device)
    common = dict(lock=args.lock, train_base=args.preset == "tiny" and args.from_scratch)
    if args.method == "retrinet":
        model = RetriUNet(sd.unet, heads=args.heads, null_reference=args.ref_drop > 0, **common)
    elif args.method == "controlnet":
        model = ControlNetUNet(sd.unet, hint_downscale=sd.vae.config.downscale, **common)
    else:
        encoder = image_encoder_for(args, out, rank).to(device)
        model = IPAdapterUNet(sd.unet, image_embed_dim=encoder.config.projection_dim, image_encoder=encoder, **common)
    if args.checkpointing:
        for m in model.modules():
            if isinstance(m, UNetEncoder):  # SD's U-Net, RetriNet's E, the ControlNet
                m.gradient_checkpointing = True
    if args.precision != "fp32":  # frozen weights may live in half precision; trainable ones stay fp32
        frozen_to(sd, model, getattr(torch, PRECISIONS[args.precision]))
    sd.vae.eval()
    sd.text_encoder.eval()
    return sd, model


def copy_base(stack: Path, out: Path) -> None:
    """The run's own copy of the stack's base (base.safetensors, base-config.json), for sample.py and
    the evaluations, which load a tiny run from its folder; the weights file goes in last, under a
    temporary name first, as its presence marks the copy complete."""
    import shutil
    shutil.copyfile(stack / "base-config.json", out / "base-config.json")
    shutil.copyfile(stack / "base.safetensors", out / ".base.safetensors.tmp")
    (out / ".base.safetensors.tmp").replace(out / "base.safetensors")


def param_groups(model, params: list, scale: float) -> list:
    """AdamW's parameter groups: one, or with --added-lr-scale != 1 two, the method's added modules
    (RetriNet's E, cross-attention and zero convs; the ControlNet; the IP-Adapter's layers) apart
    from the U-Net's, their learning rate `scale` times --lr."""
    if scale == 1:
        return params
    added = {id(p) for p in model.added.parameters()}
    return [{"params": [p for p in params if id(p) not in added], "lr_scale": 1.0},
            {"params": [p for p in params if id(p) in added], "lr_scale": scale}]


def make_optimizer(params, args, world: int):
    """AdamW; on CUDA its fused kernel, which updates in place: torch's default there (foreach)
    allocates temporaries the size of every trainable weight at once (3.4 GB for RetriNet's 0.92 G
    trainable parameters; bench/memory.py)."""
    import torch
    kw = dict(lr=args.lr, betas=(0.9, 0.999), eps=args.adam_eps, weight_decay=args.weight_decay)
    if args.device.startswith("cuda"):
        kw["fused"] = True
    if args.zero and world > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **kw)
    return torch.optim.AdamW(params, **kw)


def peak_memory_mb(device) -> float:
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


class Run:
    """One training run on this process: the models, the optimizer and the batch stream, with the
    four things the loop does: `resume`, `step` (one optimisation step), `save` and `validate`."""

    def __init__(self, args, rank: int, world: int, device, out: Path, dataset, progress):
        import torch
        from torch.nn.parallel import DistributedDataParallel as DDP
        from training.ema import EMA
        from training.guard import LastGood
        from training.objective import Conditioning, denoising_loss
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
        self.text = Conditioning(self.sd)
        # --compile: the gradient half of the loss (the model's forward, the loss, and so the backward)
        # as one graph; the per-sample draws and frozen encoders (draw_step) stay eager. Under DDP its
        # forward's Python hooks run between graphs (dynamo cuts the graph at DDP's buckets anyway).
        self.loss_fn = (torch.compile(denoising_loss, backend=args.compile, fullgraph=world == 1) if args.compile
                        else denoising_loss)
        self.step_count, self.skipped, self.bad_in_row = 0, 0, 0
        # The guard (training/guard.py): the state before the last update, which the next step confirms.
        self.last_good = LastGood(self.params, self.optimizer, self.scaler)
        self.pending = False  # the weights come from an update no step has confirmed yet
        self.weights_step = 0  # the number of updates behind the weights held now
        self.data_pos = {"epoch": 0, "offset": 0}
        self.last_batch = None
        self.batches = None
        self.left_out: set[str] = set()  # validation samples already reported unreadable

    def log(self, msg: str) -> None:
        if self.master:
            print(msg, file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        self.log(f"train.py: warning: {msg}")

    def resume(self, ckpt: Path | None, state: dict | None) -> None:
        """Weights, optimizer, scaler, step, data position and RNG states of checkpoint `ckpt`,
        whose state.pt (`read_state`) is `state`; nothing (step 0) when --resume found none."""
        import random

        import torch
        from common.weights import CheckpointError
        if ckpt is None:
            self.log(f"--resume: no checkpoint in {self.out / 'checkpoints'}; starting from step 0")
            return
        self.model.load_weights(ckpt / "retrinet.safetensors")
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
            from training.ema import EMA, EMA_FILE
            if (ckpt / EMA_FILE).is_file():
                self.ema.load(self.model, ckpt, state.get("ema_updates", 0))
            else:
                self.log(f"--resume: {ckpt} holds no weight average ({EMA_FILE}); --ema starts one from its weights")
                self.ema = EMA(self.params, self.args.ema)
        self.step_count, self.skipped, self.data_pos = state["step"], state["skipped"], state["data"]
        self.weights_step = self.step_count
        rng = state["rng"][self.rank] if len(state["rng"]) == self.world else None
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if self.device.type == "cuda" and rng.get("cuda") is not None:
                torch.cuda.set_rng_state(rng["cuda"], self.device)
            random.setstate(rng["python"])
        self.log(f"resumed from {ckpt} at step {self.step_count}")

    def open_data(self) -> None:
        from data.stream import BatchStream
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
        (training/guard.py): when the loss or the gradient is not finite, the update is skipped
        and, if the weights come from an update not yet confirmed, that update is undone; when the
        update itself leaves a non-finite weight or optimizer state, it is undone at once.
        Returns what the log and the loop need."""
        import torch
        from training.objective import diffusion_loss, lr_at
        args, n = self.args, self.step_count + 1
        lr = lr_at(self.step_count, lr=args.lr, warmup=args.warmup, restart_every=args.restart_every,
                   min_lr=args.min_lr)
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
                    loss = diffusion_loss(self.ddp, self.sd, self.sd.schedule, self.text, batch, epoch=epoch,
                                          seed=args.seed, face_weight=args.face_weight, ref_drop=args.ref_drop,
                                          snr_gamma=args.snr_gamma, loss_fn=self.loss_fn)
                self.scaler.scale(loss * (weight / args.grad_accum)).backward()
            losses.append(loss.detach().float())
        self.progress.at(f"the loss all-reduce of step {n}")
        loss, n_samples, stopping = all_sum([torch.stack(losses).mean(), n_samples, stop_requested or out_of_time],
                                            self.world)
        loss /= self.world
        grad_norm, grads_ok, bad_before = float("nan"), False, self.bad_in_row
        if math.isfinite(loss):
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, args.clip_grad or float("inf")).item()
            grads_ok = math.isfinite(grad_norm)
        # The weights held compute when their loss is finite and so is the gradient, unless the fp16
        # scaler owns gradient overflow (it skips the update and lowers its scale).
        weights_ok = math.isfinite(loss) and (grads_ok or self.scaler.is_enabled())
        undone = None
        if self.pending:
            self.pending = False
            if weights_ok:
                self.bad_in_row = 0  # the last update is confirmed
            else:  # the last update made weights that do not compute: back to those before it
                undone, self.weights_step = self.step_count, self.last_good.restore()
        updated = False
        if weights_ok:
            if grads_ok:
                self.last_good.keep(self.weights_step)
            self.scaler.step(self.optimizer)  # skips the update itself on inf / NaN gradients (fp16)
            self.scaler.update()
            if grads_ok:
                self.progress.at(f"the update check of step {n}")
                ok = self.last_good.is_finite()
                if self.world > 1:  # ZeRO: each process checks its own shard of the optimizer state
                    ok = all_sum([not ok], self.world)[0] == 0
                if ok:
                    updated = self.pending = True
                else:
                    undone, self.weights_step = n, self.last_good.restore()
        # Under DDP the gradients are views of its buckets: zeroed in place, they stay so; set to None,
        # every step would allocate them again and copy them into the buckets.
        self.optimizer.zero_grad(set_to_none=self.world == 1)
        self.step_count += 1
        if updated:
            self.weights_step = self.step_count
            if self.ema is not None:
                self.ema.update()
        else:
            self.skipped, self.bad_in_row = self.skipped + 1, self.bad_in_row + 1
        if undone is not None and undone != n:  # the previous step's update, undone now, counts as skipped too
            self.skipped, self.bad_in_row = self.skipped + 1, self.bad_in_row + 1
        if undone is not None and bad_before == 0:
            what = "its update made non-finite weights" if undone == n else f"the update of step {undone} made " \
                   f"weights that give a non-finite loss or gradient"
            self.warn(f"step {n}: {what}; back to the weights after step {self.weights_step}")
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "finite": updated, "samples": n_samples,
                "stopping": bool(stopping)}

    def save(self, tag: str = "") -> Path | None:
        """Collective: ZeRO gathers the full optimizer state on rank 0, which writes the checkpoint;
        then every process learns whether it was written (TrainingError if not). Returns its path
        on rank 0."""
        import random

        import torch
        import torch.distributed as dist
        from training.checkpoints import write_checkpoint
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
            state = {"step": step, "skipped": self.skipped, "data": self.batches.state(),
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
        import torch
        from training.validation import sample_grid
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


class StepLog:
    """log.jsonl records and the progress line, every --log-every steps (and at the end or on a
    non-finite step), with the sample rate since the last record."""

    def __init__(self, run: Run):
        self.run = run
        self.file = open(run.out / "log.jsonl", "a") if run.master else None
        self.first_step, self.t_start = run.step_count, time.perf_counter()
        self.t_last, self.samples = self.t_start, 0.0

    def __call__(self, result: dict) -> None:
        run, args = self.run, self.run.args
        self.samples += result["samples"]
        step = run.step_count
        if not (run.master and (step % args.log_every == 0 or step == args.max_steps or not result["finite"])):
            return
        now = time.perf_counter()
        rate = self.samples / max(now - self.t_last, 1e-9)
        eta = (args.max_steps - step) * (now - self.t_start) / (step - self.first_step)
        loss, grad_norm = result["loss"], result["grad_norm"]
        record = {"step": step, "loss": loss if math.isfinite(loss) else None, "lr": result["lr"],
                  "grad_norm": grad_norm if math.isfinite(grad_norm) else None, "skipped": run.skipped,
                  "samples_per_s": round(rate, 3), "peak_memory_mb": round(peak_memory_mb(run.device), 1)}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        print(f"step {step}/{args.max_steps} | loss {loss:.4f} | lr {result['lr']:.2e} | grad norm {grad_norm:.3f} | "
              f"{rate:.1f} samples/s | skipped {run.skipped} | ETA {int(eta // 60)}m{int(eta % 60):02d}s",
              file=sys.stderr, flush=True)
        self.t_last, self.samples = now, 0.0

    def close(self) -> None:
        if self.file:
            self.file.close()


def error(msg: str) -> None:
    print(f"train.py: error: {msg}", file=sys.stderr, flush=True)


def stop_message(run: Run, path: Path | None) -> str:
    """The status-3 line: what stopped the run, what the checkpoint holds, what to change."""
    args = run.args
    fixes = [f"lower --lr (now {args.lr:g})"]
    if not args.clip_grad:
        fixes.append("clip the gradient (--clip-grad 1; now 0, no clipping)")
    if args.precision != "fp32":
        fixes.append(f"train in --precision fp32 (now {args.precision})")
    return (f"{MAX_BAD_STEPS} steps in a row had a non-finite loss, gradient or update, or had their update undone "
            f"(see training/guard.py); stopped at step {run.step_count}. {path} holds the last finite weights, those "
            f"after step {run.weights_step}{' (the initial weights)' if run.weights_step == 0 else ''}. To continue, {' or '.join(fixes)}, and add --resume")


class Refused(Exception):
    """Why the run cannot start: its exit status and the lines that say why."""

    def __init__(self, status: int, *lines: str):
        super().__init__(*lines)
        self.status, self.lines = status, lines


def prepare(args, out: Path, processes: int, master: bool):
    """Before anything is built: the checkpoint to resume and its state, the dataset, the validation
    records, and whether the checkpoint's settings allow this run. Returns (checkpoint, state,
    dataset, validation records); raises Refused."""
    from common.weights import CheckpointError
    from data.dataset import RetriBooruDataset
    from training.checkpoints import checkpoint_dirs, read_state, resume_problems, run_settings, saved_settings
    from training.validation import validation_records
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
    from training.checkpoints import truncate_log
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
        log(result)
        step = run.step_count
        if run.bad_in_row >= MAX_BAD_STEPS:
            path = run.save(" (after non-finite steps)")
            if run.master:
                error(stop_message(run, path))
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
    problems = check_args(args)
    master = int(os.environ.get("RANK", "0")) == 0
    if problems:
        for p in problems:
            error(p)
        return 2

    import random

    import torch
    import torch.distributed as dist

    from common.weights import CheckpointError
    from training.distributed import Progress, is_collective_failure

    out = Path(args.out)
    processes = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1

    # -- before anything is built: the checkpoint to resume, the data, the resume checks ----------------
    try:
        ckpt, state, dataset, val_records = prepare(args, out, processes, master)
    except Refused as e:
        for line in e.lines:
            error(line)
        return e.status

    # -- the processes ---------------------------------------------------------------------------------
    try:
        rank, world, device = setup_distributed(args.device, args.ddp_timeout)
    except RuntimeError as e:
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
            from training.distributed import shared_out_problem
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
        log = StepLog(run)
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
        if world > 1 and not broken:
            dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
