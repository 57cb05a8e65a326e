"""Pre-train the tiny SD v1.5 + CLIP stack from scratch (`make base`); tiny runs start from it.

    python pretrain.py --out base-output            # both stages, 56 minutes measured on 2 CPU cores
    python pretrain.py --out base-output --score-only --guidance 2    # score the stack again

1. CLIP (training.pretrain.train_clip): the text and image towers learn a joint embedding of
   synthetic scenes and their Danbooru-style prompts; its zero-shot retrieval on held-out scenes is
   reported (training.pretrain.zero_shot). A folder that already holds clip/ reuses it.
2. The U-Net (training.pretrain.train_unet): text-to-image on the frozen CLIP text tower.
3. Quality (training.base_score): samples from full prompts of held-out colour combinations, read by
   the project's scorers beside the real images; base-samples.png shows them.

Writes --out/clip/ (model.safetensors + config.json, openai CLIP's layout), base.safetensors +
base-config.json (the SD single-file layout that sample.py and train.py --stack read) and stack.json
(command, seed, recipes, steps, minutes, scores, and the files' SHA-256). The shipped tiny-stack/ was
made by this command with its defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clip import load_clip
from training.base_score import score_base
from training.presets import load_tiny_stack, save_base, stack_problems
from training.pretrain import (CLIP_DIR, CLIP_RECORD, HALF_KEYS, STACK_FILE, ClipRecipe, UNetRecipe, round_half_keys,
                               save_clip, sha256, shipped_files, train_clip, train_unet, zero_shot)


def save_grid(samples: torch.Tensor, path: Path, columns: int = 16) -> None:
    """uint8 (N, H, W, 3) samples as one PNG grid, 3x enlarged (nearest)."""
    n, h, w, _ = samples.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, 3), 255, dtype=np.uint8)
    for i, im in enumerate(samples.numpy()):
        r, c = divmod(i, columns)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = im
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python pretrain.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the stack (clip/, base.safetensors, ...)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clip-steps", type=int, default=ClipRecipe.steps)
    ap.add_argument("--unet-steps", type=int, default=UNetRecipe.steps)
    ap.add_argument("--unet-minutes", type=float, default=None, help="stop the U-Net stage after this long")
    ap.add_argument("--clip-pool", type=int, default=ClipRecipe.pool, help="distinct scenes the CLIP trains on")
    ap.add_argument("--unet-pool", type=int, default=UNetRecipe.pool, help="distinct scenes the U-Net trains on")
    ap.add_argument("--guidance", type=float, default=2.0,
                    help="text guidance of the scored samples (2 read best of 2, 3 and 4: BENCHMARKS.md)")
    ap.add_argument("--score-samples", type=int, default=64, help="held-out scenes sampled for the quality scores")
    ap.add_argument("--zero-shot-samples", type=int, default=512, help="held-out scenes of the CLIP's zero-shot scores")
    ap.add_argument("--clip-lr", type=float, default=ClipRecipe.lr)
    ap.add_argument("--unet-lr", type=float, default=UNetRecipe.lr)
    ap.add_argument("--score-only", action="store_true",
                    help="train nothing: score the stack in --out again (--guidance, --score-samples) and record it")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    args.command = "python pretrain.py " + " ".join(map(str, argv if argv is not None else sys.argv[1:]))
    for name in ("clip_steps", "unet_steps", "score_samples", "clip_pool", "unet_pool", "zero_shot_samples"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.clip_pool < ClipRecipe.batch or args.unet_pool < UNetRecipe.batch:
        ap.error(f"--clip-pool and --unet-pool must hold at least a batch ({ClipRecipe.batch} and "
                 f"{UNetRecipe.batch} scenes), got {args.clip_pool} and {args.unet_pool}")
    if args.unet_minutes is not None and not (0 < args.unet_minutes < 1e4):
        ap.error(f"--unet-minutes must be a positive number of minutes, got {args.unet_minutes}")
    for name in ("clip_lr", "unet_lr"):
        if not (math.isfinite(getattr(args, name)) and 0 < getattr(args, name) < 1):
            ap.error(f"--{name.replace('_', '-')} must be a learning rate within (0, 1), got {getattr(args, name)}")
    if not math.isfinite(args.guidance) or args.guidance < 1:
        ap.error(f"--guidance must be a finite number >= 1, got {args.guidance}")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} exists and is not a folder")
    if args.score_only:
        missing = stack_problems(args.out) + ([] if (args.out / STACK_FILE).is_file() else
                                              [f"{args.out / STACK_FILE}: missing"])
        if missing:
            ap.error(f"--score-only: {missing[0]}")
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    out = args.out
    if args.score_only:
        return rescore(out, load_tiny_stack(out), args, log)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    clip_recipe = dataclasses.replace(ClipRecipe(), steps=args.clip_steps, pool=args.clip_pool, lr=args.clip_lr)
    recipe = dataclasses.replace(UNetRecipe(), steps=args.unet_steps, pool=args.unet_pool, lr=args.unet_lr)
    clip_file = out / CLIP_DIR / "model.safetensors"
    if clip_file.is_file() and (out / CLIP_DIR / "config.json").is_file():
        log(f"clip: reusing {clip_file} (delete {out / CLIP_DIR} to train it again)")
        clip = load_clip(clip_file)
        try:
            clip_record = json.loads((out / CLIP_DIR / CLIP_RECORD).read_text())
        except (OSError, ValueError):
            clip_record = {"recipe": None, "minutes": None, "seed": None}
    else:
        clip = train_clip(clip_recipe, args.seed, log)
        clip_record = {"recipe": dataclasses.asdict(clip_recipe), "seed": args.seed,
                       "minutes": (time.perf_counter() - began) / 60}
        round_half_keys(clip)
        save_clip(clip, out / CLIP_DIR)
        (out / CLIP_DIR / CLIP_RECORD).write_text(json.dumps(clip_record, indent=1) + "\n")
    retrieval = zero_shot(clip, n=args.zero_shot_samples)
    log("clip zero-shot: " + ", ".join(f"{k} {v['accuracy']:.0%} (chance {v['chance']:.0%})"
                                       for k, v in retrieval.items()))
    unet_began = time.perf_counter()
    sd, steps = train_unet(clip, recipe, args.seed, log, minutes=args.unet_minutes)
    unet_minutes = (time.perf_counter() - unet_began) / 60
    save_base(sd, out, half=HALF_KEYS)
    quality = score_and_show(sd, out, args, log)
    record = {"command": args.command,
              "seed": args.seed, "clip": {**clip_record, "zero_shot": retrieval},
              "unet": {"recipe": dataclasses.asdict(recipe), "steps_taken": steps, "minutes": unet_minutes,
                       "quality": quality},
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "sha256": {str(p.relative_to(out)): sha256(p) for p in shipped_files(out)}}
    (out / STACK_FILE).write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {out} in {(time.perf_counter() - began) / 60:.1f} minutes")
    return 0


def score_and_show(sd, out: Path, args, log) -> dict:
    """`score_base` at --guidance on --score-samples held-out scenes, the samples as base-samples.png."""
    quality, samples = score_base(sd, n=args.score_samples, guidance=args.guidance)
    save_grid(samples, out / "base-samples.png")
    log(f"base at guidance {args.guidance:g}: "
        + ", ".join(f"{k} {v:.0%} of real" for k, v in quality["ratio"].items() if v is not None)
        + f"; border std {quality['samples']['border_std']:.1f} (real {quality['real']['border_std']:.1f})")
    return quality


def rescore(out: Path, sd, args, log) -> int:
    """--score-only: the stack's quality scores again, at this --guidance, into its stack.json."""
    try:
        record = json.loads((out / STACK_FILE).read_text())
        record["unet"]["quality"] = score_and_show(sd, out, args, log)
    except (ValueError, KeyError, TypeError) as e:
        print(f"pretrain.py: error: {out / STACK_FILE}: not a stack record ({e})", file=sys.stderr)
        return 2
    record["scored_by"] = args.command
    (out / STACK_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
