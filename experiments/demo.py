"""The demo (`make demo`): RetriNet learns to retrieve identities on the CPU.

    python -m experiments.demo --out demo-output              # 10 minutes of training (make demo)
    python -m experiments.demo --out demo-30 --minutes 30     # longer (make demo MINUTES=30)
    python -m experiments.demo --out demo-output --sample-only --sampler dpmpp_2m   # sample the trained run again

1. Generates a synthetic RetriBooru dataset (data.synthetic --scene by default: a named background
   colour, arms and facing per image, and a prompt naming that scene but not the identity; figures
   80-95% of the image high, no hats) for training and a second one whose identities the model never
   sees (another seed).
2. Fine-tunes RetriNet from the shipped pre-trained tiny stack (train.py --preset tiny: SD v1.5 and
   CLIP in miniature, pixel space, 24 px, v-prediction; E copied from the pre-trained U-Net, E and
   SD's decoder trained, lock none), with 10% reference dropout for reference guidance, references
   on white, plus the experiments' recipe (recipe.TRAIN_RECIPE), for --minutes, the cosine
   learning-rate schedule running once over the step budget (STEPS_PER_MINUTE per minute).
3. Samples every held-out identity from two of its images and the scene prompt of a third (reference
   guidance) from the weight average of the last checkpoint, and the base alone from the same
   prompts without references; scores identity retrieval with the generator's ground truth
   (data.synthetic.identity_score): identification (which held-out identity each sample matches
   best; chance 1 / identities) and the fraction of samples whose hair, top and bottom colours equal
   the reference identity's, each against its chance rate with a binomial p-value, beside the base
   alone and the scorer's ceiling on real held-out images.
4. Writes report.md / report.json, the held-out sample grid, samples.npz, the training log,
   checkpoints and validation grids into --out, and prints its path.

SIGTERM or Ctrl-C (SIGINT) during training is passed on to train.py, which saves a checkpoint at
its next step and stops; the demo then stops too, without sampling or a report, with status 128 +
the signal's number (143, 130). Running the same command again resumes training from that
checkpoint (--resume is passed whenever run/checkpoints exists), then samples and reports.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path

from . import recipe
from .child import SIGNALS, run_child, train_problems
from .recipe import make_datasets, real_image, resolutions, train_command

STEPS_PER_MINUTE = 180  # training steps of the demo's settings per minute on an idle 2-core CPU (BENCHMARKS.md)
DEFAULTS = {**recipe.DEFAULTS, "backgrounds": "scene", "prompt": "scene", "guidance": 1.0, "ref_background": "white",
            "hats": False, "minutes": 10.0, "ref_guidance": 2.0}
MAX_MINUTES = 24 * 60   # a day; make demo trains for 10
# The counts' ranges: identification needs two held-out identities (and the reference effect another
# identity's references); the upper bounds only catch a slip of the keyboard. --steps has none: --minutes
# ends training.
COUNTS = {"identities": (1, 10_000), "images_per_identity": (2, 1_000), "heldout": (2, 1_000), "samples": (1, 1_000),
          "steps": (1, None)}
SEED_LIMIT = 2 ** 32


def parse_args(argv=None) -> argparse.Namespace:
    from data.dataset import REF_BACKGROUNDS
    from data.synthetic import BACKGROUNDS, FIGURE_SCALE
    from diffusion import SAMPLERS
    ap = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-output")
    ap.add_argument("--identities", type=int, default=DEFAULTS["identities"], help="training identities")
    ap.add_argument("--images-per-identity", type=int, default=DEFAULTS["images_per_identity"])
    ap.add_argument("--heldout", type=int, default=DEFAULTS["heldout"], help="identities never trained on")
    ap.add_argument("--size", type=int, default=DEFAULTS["size"], help="side of the generated dataset images")
    ap.add_argument("--backgrounds", choices=BACKGROUNDS + ("scene",), default=DEFAULTS["backgrounds"],
                    help="data.synthetic backgrounds: one colour per image by default, so that a model trained "
                         "for minutes spends itself on the figures")
    ap.add_argument("--figure-scale", type=float, nargs=2, default=DEFAULTS["figure_scale"], metavar=("LOW", "HIGH"),
                    help="full-figure height as a fraction of the image (data.synthetic's default: "
                         f"{FIGURE_SCALE[0]} {FIGURE_SCALE[1]}); "
                         "large figures give the references more to say and the scorer more pixels")
    ap.add_argument("--hats", action=argparse.BooleanOptionalAction, default=DEFAULTS["hats"],
                    help="data.synthetic's hats: they hide most of the hair, which the scorer then cannot read "
                         "(the report's real held-out images: 62.5%% exact with hats, 75%% without)")
    ap.add_argument("--ref-background", choices=REF_BACKGROUNDS, default=DEFAULTS["ref_background"],
                    help="train.py --ref-background: references show the figure on white (through its mask), so "
                         "that what they share with the target is the identity")
    ap.add_argument("--minutes", type=float, default=DEFAULTS["minutes"],
                    help="training time limit (make demo MINUTES=N); the step budget follows from it")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"training steps, over which the learning rate's cosine runs once (default: "
                         f"{STEPS_PER_MINUTE} per minute of --minutes, what an idle 2-core CPU makes)")
    ap.add_argument("--samples", type=int, default=DEFAULTS["samples"], help="samples per held-out identity")
    ap.add_argument("--sample-steps", type=int, default=DEFAULTS["sample_steps"])
    ap.add_argument("--sampler", choices=list(SAMPLERS), default=DEFAULTS["sampler"])
    ap.add_argument("--ref-guidance", type=float, default=DEFAULTS["ref_guidance"])
    ap.add_argument("--guidance", type=float, default=DEFAULTS["guidance"],
                    help="text guidance at sampling (1: the prompt's prediction, no extrapolation)")
    ap.add_argument("--prompt", choices=("scene", "none"), default=DEFAULTS["prompt"],
                    help="scene: sample each held-out identity with the prompt of one of its other images (with "
                         "--backgrounds scene it names the background, arms and facing, not the identity); none: \"\"")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--raw-weights", action="store_true",
                    help="sample the trained weights themselves, not their average (ema.safetensors)")
    ap.add_argument("--sample-only", action="store_true",
                    help="no training: sample and score the last checkpoint in --out again (other sampling settings)")
    ap.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                    help="extra train.py arguments (everything after this flag)")
    args = ap.parse_args(argv)
    minutes_ok = math.isfinite(args.minutes) and 0 < args.minutes <= MAX_MINUTES
    if args.steps is None and minutes_ok:
        args.steps = max(1, round(STEPS_PER_MINUTE * args.minutes))
    problems = option_problems(args, minutes_ok)
    if problems:
        ap.error("; ".join(problems))
    return args


def option_problems(args: argparse.Namespace, minutes_ok: bool) -> list[str]:
    """Every problem with the arguments, found before anything is written: ranges, finite numbers,
    what the synthetic generator takes, the sampler's step limit, --out, and (unless --sample-only)
    what train.py would refuse in the run's command."""
    from data.synthetic.generator import _check_args as generator_check
    from diffusion.sd15 import steps_limit
    from training.presets import tiny_configs
    problems = [] if minutes_ok else [f"--minutes {args.minutes}: expected a number of minutes > 0 and at most "
                                      f"{MAX_MINUTES} (a day)"]
    for name, (low, high) in COUNTS.items():
        value = getattr(args, name)
        if value is not None and not (low <= value and (high is None or value <= high)):
            problems.append(f"--{name.replace('_', '-')} {value}: expected an integer >= {low}"
                            + (f" and <= {high}" if high is not None else ""))
    if not 0 <= args.seed < SEED_LIMIT:
        problems.append(f"--seed {args.seed}: expected an integer >= 0 and < 2^32")
    for name in ("guidance", "ref_guidance"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a finite number >= 0")
    limit = steps_limit(args.sampler, tiny_configs()["schedule"].num_train_timesteps)
    if not 1 <= args.sample_steps <= limit:
        problems.append(f"--sample-steps {args.sample_steps}: expected an integer >= 1 and <= {limit} (the "
                        f"{args.sampler} sampler's limit on the tiny stack's schedule)")
    if not problems:
        try:   # the training data as data.synthetic will make it (the held-out set differs only in its counts)
            generator_check(args.identities, args.images_per_identity, args.size, args.seed, 0.0, 0.0,
                            "mixed" if args.backgrounds == "scene" else args.backgrounds, tuple(args.figure_scale))
        except ValueError as e:
            problems.append(f"--{e}")
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        problems.append(f"--out {args.out}: is a file, expected a folder")
    if not problems and not args.sample_only:
        problems += train_problems(run_command(out, args), args.identities * args.images_per_identity,
                                   f"--identities {args.identities} x --images-per-identity {args.images_per_identity}")
    return problems


def run_command(out: Path, args: argparse.Namespace) -> list[str]:
    """train.py's command for the demo's run, out/run, on the data in `out` (resuming when it has
    checkpoints). The cosine schedule runs once over the step budget, so the learning rate ends near 0."""
    run = out / "run"
    return train_command(
        "--data", str(out / "data-train"), "--out", str(run), "--ref-drop", "0.1", "--ref-background",
        args.ref_background, "--max-steps", str(args.steps), "--restart-every", str(args.steps), "--time-limit",
        str(args.minutes), "--log-every", "25", "--save-every", "250", "--val-every", "500", "--val-data",
        str(out / "data-heldout"), "--seed", str(args.seed), resume=(run / "checkpoints").is_dir(),
        train_args=args.train_args)


def heldout_references(root: Path) -> list[tuple[str, list[Path], dict]]:
    """(identity key, its image paths, identity) per identity of a synthetic root; the first two
    images are the references. The identity dict gains "prompt": the prompt of its third image
    (of its second when it has two), what the demo samples it with."""
    from data.annotations import load_records
    from data.synthetic.identity_score import load_identities
    prompts = {rec["id"]: rec["prompt"] for rec in load_records(root)}
    out = []
    for key, ident in sorted(load_identities(root).items()):
        if len(ident["ids"]) >= 2:
            ident = {**ident, "prompt": prompts[ident["ids"][min(2, len(ident["ids"]) - 1)]]}
            out.append((key, [root / "images" / f"{i}.png" for i in ident["ids"]], ident))
    return out


def reference_image(path: Path, background: str = "keep"):
    """A held-out image as a reference, prepared as training prepared references: with
    background "white", the figure on white through its mask (data.synthetic writes the mask of
    images/N.png to masks/N.png)."""
    from common.images import open_image
    from data.dataset import figure_on_white
    image = open_image(path, "reference")
    return figure_on_white(image, path.parent.parent / "masks" / path.name) if background == "white" else image


def sample_heldout(sd, model, heldout: list, args) -> tuple[list, list]:
    """`args.samples` images per held-out identity from its two reference images and its prompt
    (--prompt), with reference and text guidance (--ref-guidance, --guidance). With `model` None, the
    base alone from the same prompts and seeds: what the samples look like without references."""
    from retrinet import generate
    res, ref_res = resolutions()
    images, identities = [], []
    for i, (key, paths, ident) in enumerate(heldout):
        prompt = ident["prompt"] if args.prompt == "scene" else ""
        conditioning = dict(model=model, references=[reference_image(p, args.ref_background) for p in paths[:2]],
                            concepts=["figure"], ref_guidance=args.ref_guidance, ref_size=ref_res) if model else {}
        out, _ = generate(sd, prompt, num=args.samples, steps=args.sample_steps, guidance=args.guidance,
                          sampler=args.sampler, seed=args.seed + i, height=res, width=res, **conditioning)
        images += list(out.numpy())
        identities += [ident] * args.samples
        print(f"\rsampling held-out identities{'' if model else ' (base alone)'}: {i + 1}/{len(heldout)}",
              end="\n" if i + 1 == len(heldout) else "",
              file=sys.stderr, flush=True)
    return images, identities


def reference_effect(sd, model, heldout_root: Path, timesteps=(300, 500, 700), n: int = 48,
                     seed: int = 0, ref_background: str = "keep") -> dict:
    """Does the denoiser use its references? The RMSE of its x_0 prediction on held-out images (no
    prompt) at a few noise levels, with the image's own references, with another image's references
    (mismatched) and with the learned null reference. Retrieval shows as own < mismatched ~ null;
    this reads learning long before the colour scores leave chance."""
    import torch
    from data.dataset import RetriBooruDataset, collate
    from training.objective import Conditioning
    res, ref_res = resolutions()
    ds = RetriBooruDataset(heldout_root, resolution=res, k=2, prompt_drop=1.0, ref_resolution=ref_res,
                           ref_background=ref_background)
    batch = collate([ds[i] for i in range(min(n, len(ds)))])
    x0, refs, b = batch["image"], batch["refs"], batch["image"].shape[0]
    text = Conditioning(sd)
    context = text([""] * b)
    ref_context = text([c for cs in batch["concepts"] for c in cs]).unflatten(0, (b, 2))
    # mismatched: the references of the next image in the batch that shows another identity
    from data.synthetic.identity_score import load_identities
    identity = {i: key for key, ident in load_identities(heldout_root).items() for i in ident["ids"]}
    keys = [identity[i] for i in batch["id"]]
    mismatched = refs[[next((i + j) % b for j in range(1, b) if keys[(i + j) % b] != keys[i]) for i in range(b)]]
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=g)
            tt = torch.full((b,), t)
            x_t = sd.schedule.add_noise(x0, noise, tt)
            acp = float(sd.schedule.alphas_cumprod[t])
            row = {}
            for name, r, drop in [("own", refs, False), ("mismatched", mismatched, False), ("null", refs, True)]:
                if drop and not model.config.null_reference:
                    continue
                eps = sd.schedule.to_eps(model(x_t, tt, context, r, ref_context, batch["ref_mask"],
                                               ref_drop=torch.full((b,), drop) if model.config.null_reference
                                               else None), x_t, tt)
                row[name] = round(float((eps - noise).pow(2).mean()) ** 0.5 * ((1 - acp) / acp) ** 0.5, 4)
            out[str(t)] = row
    return out


def heldout_grid(heldout: list, images: list, per: int, cell: int = 72, ref_background: str = "keep"):
    """One row per held-out identity: its two references (as the model saw them), then its samples."""
    from PIL import Image, ImageDraw
    cols, pad = 2 + per, 4
    grid = Image.new("RGB", (cols * (cell + pad) + pad, len(heldout) * (cell + pad) + pad + 14), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(["ref 1", "ref 2"] + [f"sample {s + 1}" for s in range(per)]):
        draw.text((pad + j * (cell + pad), 2), label, fill="black")
    for r, (_, paths, _) in enumerate(heldout):
        row = [reference_image(p, ref_background) for p in paths[:2]] + [Image.fromarray(a) for a in images[r * per:(r + 1) * per]]
        for j, im in enumerate(row):
            grid.paste(im.resize((cell, cell), Image.NEAREST), (pad + j * (cell + pad), 14 + pad + r * (cell + pad)))
    return grid


class Stop:
    """SIGTERM / SIGINT outside training: the demo stops at once (`Stopped`), with status 128 + the
    signal number. While train.py runs, experiments.child.run_child passes the signals on instead:
    train.py saves a checkpoint at its next step boundary and exits, and the demo then stops without
    sampling, same status."""

    def __init__(self):
        self.signal, self.phase = None, "before training"

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name

    def __call__(self, signum, frame):
        self.signal = self.signal or signum
        raise Stopped(signal.Signals(signum).name)


class Stopped(Exception):
    """The demo was stopped by a signal outside training."""


def main(argv=None) -> int:
    args = parse_args(argv)
    stop = Stop()
    previous = {sig: signal.signal(sig, stop) for sig in SIGNALS}
    try:
        return run_demo(args, stop)
    except Stopped as e:
        print(f"demo: stopped by {e} {stop.phase}; no report. Run the same command again to go on (training "
              f"resumes from its last checkpoint)", file=sys.stderr)
        return 128 + stop.signal
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_demo(args: argparse.Namespace, stop: Stop) -> int:
    out = Path(args.out).resolve()
    run = out / "run"
    from training.checkpoints import checkpoint_dirs, read_state
    if args.sample_only and not checkpoint_dirs(run):  # before anything is written
        print(f"demo: --sample-only: no checkpoint in {run / 'checkpoints'}; run the demo without it first",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    from data.synthetic.identity_score import score

    scene = args.backgrounds == "scene"
    train_root, heldout_root = make_datasets(
        out, args.identities, args.images_per_identity, args.heldout, args.size, args.seed,
        f"generating {{name}}: {{n}} identities x {{per}} images, {args.backgrounds} backgrounds",
        backgrounds="mixed" if scene else args.backgrounds, figure_scale=tuple(args.figure_scale), hats=args.hats,
        scene=scene)

    t_train = time.perf_counter()
    command = run_command(out, args)
    if args.sample_only:
        print(f"demo: --sample-only: sampling the last checkpoint of {run}", file=sys.stderr)
    else:
        status, signalled = run_child(command, notice="demo: {signal} received; train.py saves at its next step "
                                                      "and stops")
        if signalled:  # train.py saved at its step boundary: no sampling on a stopped run
            stop.signal = signalled
            saved = checkpoint_dirs(run)
            where = f"its checkpoint {saved[-1]}" if saved else f"no checkpoint yet in {run / 'checkpoints'}"
            print(f"demo: stopped by {stop.name} during training (train.py status {status}; {where}); no report. "
                  f"Run the same command again to resume training, then sample and report", file=sys.stderr)
            return 128 + stop.signal
        if status == 2:  # its checks (the run's own were made before the data): --train-args, or --out in use
            print(f"demo: train.py refused to start (status 2; its error above says why): fix --train-args as it "
                  f"says, or wait for the run it names in {run} to end", file=sys.stderr)
            return 2
        if status != 0:
            print(f"demo: training failed (status {status}); see {run}", file=sys.stderr)
            return status
    train_minutes = (time.perf_counter() - t_train) / 60
    stop.phase = "after training, while sampling and scoring"
    ckpt = checkpoint_dirs(run)[-1]
    state = read_state(ckpt)
    if args.sample_only:  # the training time of the run, from its earlier report
        train_minutes = training_minutes(out)

    heldout = heldout_references(heldout_root)
    from training.presets import load_run
    sd, model, model_file = load_run(run, ckpt, raw=args.raw_weights)
    images, identities = sample_heldout(sd, model, heldout, args)
    import numpy as np
    np.savez_compressed(out / "samples.npz", images=np.stack(images), identities=[i["key"] for i in identities])
    result = score(images, identities, seed=args.seed)
    # The base alone (the run's starting point, without references) from the same prompts and seeds.
    from diffusion.sd15 import load_configs, load_sd15
    base = load_sd15(run / "base.safetensors", configs=load_configs(run / "base-config.json"))
    base_images, _ = sample_heldout(base, None, heldout, args)
    base_result = score(base_images, identities, seed=args.seed)
    heldout_grid(heldout, base_images, args.samples, ref_background=args.ref_background).save(out / "base-samples.png")
    effect = reference_effect(sd, model, heldout_root, seed=args.seed, ref_background=args.ref_background)
    heldout_grid(heldout, images, args.samples, ref_background=args.ref_background).save(out / "heldout-samples.png")
    # The scorer's ceiling: the same score on the held-out identities' other (real) images, fitted
    # to the sampling resolution as training fits them.
    res = resolutions()[0]
    real = [real_image(p) for _, paths, _ in heldout for p in paths[2:]]
    ceiling = score(real, [i for _, paths, i in heldout for _ in paths[2:]], seed=args.seed)
    train_ids = heldout_references(train_root)
    seen = {(i["hair_color"], i["top"], i["bottom"]) for _, _, i in train_ids}
    overlap = sum((i["hair_color"], i["top"], i["bottom"]) in seen for _, _, i in heldout)
    saved_args = json.loads(state["args"])
    context = dict(steps=state["step"], train_minutes=train_minutes, total_minutes=(time.perf_counter() - start) / 60,
                   training_identities=len(train_ids), heldout=len(heldout), overlap=overlap, checkpoint=ckpt,
                   model_file=model_file, ema=saved_args.get("ema", 0.0), snr_gamma=saved_args.get("snr_gamma", 0.0),
                   lr=saved_args.get("lr"), added_lr_scale=saved_args.get("added_lr_scale", 1.0), resolution=res)
    write_report(out, args, result, ceiling, effect, context, base_result)
    print((out / "report.md").read_text(), file=sys.stderr)
    print(out)
    return 0


def training_minutes(out: Path) -> float:
    """The training time of an earlier demo in `out`, from its report.json (NaN when none)."""
    try:
        return float(json.loads((out / "report.json").read_text())["training_minutes"])
    except (OSError, ValueError, KeyError, TypeError):
        return float("nan")


SCORES = (("identification (best of the held-out identities)", "identification"),
          ("exact (all visible colours right)", "exact"), ("hair colour", "hair"), ("top colour", "top"),
          ("bottom colour", "bottom"))


def write_report(out: Path, args, result: dict, ceiling: dict, effect: dict, c: dict, base: dict) -> None:
    """report.json and report.md: the scores of the samples with their chance rates and p-values,
    the base alone's scores (`base`: no references, same prompts), the scorer's ceiling on real
    images, the reference effect and the run's settings."""
    from data.synthetic.identity_score import significance_line

    def chance(k):
        return result["chance_identification"] if k == "identification" else result[f"null_{k}"]

    report = {"generated": {k: result[k] for _, k in SCORES}, "chance": {k: chance(k) for _, k in SCORES},
              "p_value": {k: result[f"p_{k}"] for _, k in SCORES},
              "counts": {k: [result[f"{k}_count"], result["n"] if k in ("identification", "exact")
                             else result[f"{k}_shown"]] for _, k in SCORES},
              "chance_derangement": {k: result[f"chance_{k}"] for _, k in SCORES[1:]},
              "real_images": {k: ceiling[k] for _, k in SCORES}, "significance": significance_line(result),
              "base_alone": {k: base[k] for _, k in SCORES},
              "samples": result["n"], "heldout_identities": c["heldout"],
              "training_identities": c["training_identities"], "heldout_colour_triples_seen_in_training": c["overlap"],
              "steps": c["steps"], "training_minutes": round(c["train_minutes"], 2),
              "total_minutes": round(c["total_minutes"], 2), "ema": c["ema"], "snr_gamma": c["snr_gamma"], "lr": c["lr"],
              "added_lr_scale": c["added_lr_scale"],
              "backgrounds": args.backgrounds, "ref_background": args.ref_background, "hats": args.hats,
              "figure_scale": list(args.figure_scale), "reference_effect_x0_rmse": effect,
              "checkpoint": str(c["checkpoint"]), "model_file": str(c["model_file"]),
              "sampling": {"sampler": args.sampler, "steps": args.sample_steps, "prompt": args.prompt,
                           "guidance": args.guidance, "ref_guidance": args.ref_guidance, "samples": args.samples}}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    rows = "\n".join(f"| {name} | {result[k]:.1%} ({report['counts'][k][0]}/{report['counts'][k][1]}) | "
                     f"{chance(k):.1%} | {result[f'p_{k}']:.2g} | {base[k]:.1%} | {ceiling[k]:.1%} |"
                     for name, k in SCORES)
    effect_rows = "\n".join(f"| {t} | {r['own']} | {r['mismatched']} | {r.get('null', '-')} |" for t, r in effect.items())
    sampler = {"ddim": "DDIM", "dpmpp_2m": "DPM++ 2M"}.get(args.sampler, args.sampler)
    recipe = [f"weight average with decay {c['ema']}" if c["ema"] else "",
              f"min-SNR-{c['snr_gamma']:g} loss weights" if c["snr_gamma"] else "",
              f"RetriNet's modules at {c['added_lr_scale']:g}x the learning rate" if c["added_lr_scale"] != 1 else ""]
    averaged = "".join(f", {r}" for r in recipe if r)
    (out / "report.md").write_text(f"""# RetriNet demo report

{significance_line(result)}.

Tiny preset fine-tuned from its pre-trained stack for {c['steps']} steps ({c['train_minutes']:.1f} min{averaged}) on {c['training_identities']} synthetic identities ({args.backgrounds} backgrounds, figures
{args.figure_scale[0]:.0%}-{args.figure_scale[1]:.0%} of the image high{"" if args.hats else ", no hats"}; references {"on white" if args.ref_background == "white" else "as they are"});
sampled {args.samples} images for each of {c['heldout']} identities it never saw, from two reference images,
{"with the prompt of one of its other images (the scene, not the identity)" if args.prompt == "scene" else "without a prompt"}
({sampler} {args.sample_steps}, reference guidance {args.ref_guidance}, text guidance {args.guidance}). "Base alone": the
pre-trained base from the same prompts and seeds, without references (base-samples.png). Scores
(data.synthetic.identity_score): identification, the fraction of samples whose colours match their own identity
best among the {c['heldout']} held-out ones (chance 1/{c['heldout']}); the fraction of samples whose dominant
colours equal the reference identity's. Chance: the same scores against every other held-out identity;
p: one-sided binomial p-value against chance (samples of one identity share references, so read it as
a guide); real images: the scorer on the held-out identities' own other images at {c['resolution']} px,
its ceiling (at this size the hair is one or two pixel rows{", and often under a hat" if args.hats else ""}).

| score | generated | chance | p | base alone | real images |
|---|---|---|---|---|---|
{rows}

Do the references count? RMSE of the one-step x_0 prediction on held-out images (no prompt) with their
own references, with another identity's, and with the null reference (lower is better; retrieval shows
as own < mismatched):

| t | own | mismatched | null |
|---|---|---|---|
{effect_rows}

{c['overlap']} of the {c['heldout']} held-out colour triples also occur among the training identities.
Samples: heldout-samples.png (references, then samples) and samples.npz; training log: run/log.jsonl;
validation grids: run/samples/; checkpoints: run/checkpoints/ (sampled: {Path(c['model_file']).name}).
""")


if __name__ == "__main__":
    sys.exit(main())
