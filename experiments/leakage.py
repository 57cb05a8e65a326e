"""The paper's leakage benchmark in miniature (Sec. 3.1, Tab. 3.1, Fig. 3 and 9), on synthetic data.

    python -m experiments.leakage --out leakage-output          # make leakage: 3 methods x 2 settings x 3 seeds
    python -m experiments.leakage --out DIR --methods retrinet --seeds 0 --steps 1000

The claim under test: training with the target itself as reference (setting a) leaks the target's
layout and background into the condition encoder, so the model copies its reference and follows the
prompt less; training with another image of the same identity (setting b) does not, and balances
identity and text better. The synthetic generator knows every image's identity, background and pose,
so ground-truth scorers stand beside the paper's CLIP scores:

1. Data (data.synthetic --scene): every image has a background colour from a named palette and arms
   up or down, facing left or right, drawn independently of its identity, and its prompt names them
   and nothing else ("1girl, solo, full body, arms up, facing left, blue background"): the identity
   has to come from the references. A training set and a held-out set of other identities (one data
   seed, --data-seed, for every run).
2. Training: train.py --preset tiny, fine-tuning the shipped tiny SD stack, for each method in setting
   a and in setting b, the same data and number of steps, and each training seed of --seeds; plus
   the experiments' recipe (recipe.TRAIN_RECIPE: a weight average). Each method trains with its own
   defaults (RetriNet's cosine schedule with restarts; the baselines' constant rate, clipping and
   drops of their official scripts). References keep their backgrounds (that is what may leak).
3. Sampling, the paper's settings: for every held-out identity, two of its images that share their
   arms are the references (the baselines take the first), and the prompt asks for the other arms,
   the other facing and a background no reference shows. Text guidance 7; the IP-Adapter at image
   scale 0.5, and again at every scale of --ip-scales (Fig. 3's sweep). The -a and -b samples of one
   seed share identity, prompt, references and initial noise: they are pairs. A base-only row samples
   the shipped base with the prompt alone (no references): the text ceiling.
4. Scores, per sample: CLIP-I (mean cosine to the references it saw), CLIP-T (to the prompt) with the
   tiny stack's CLIP through eval/ (the code that scores SD-size runs); identification
   (data.synthetic.identity_score: its colours match its own identity best among the held-out ones);
   prompt adherence per scene attribute (data.synthetic.scene_score) and whether it copies the
   background of a reference instead; the joint rate (identified AND every scored attribute as the
   prompt asks). A scene attribute whose reader reads real images below 90% is not scored.
5. The paper's directional claims, each as a one-sided paired test on the -a / -b pairs pooled over
   the seeds (eval.stats.paired_permutation_p): (i) -a copies the reference's background more than
   -b; (ii) -b follows the prompt better (prompt background; CLIP-T); (iii) -b balances identity and
   text better (joint rate; CLIP-I x CLIP-T) for RetriNet and the IP-Adapter; (iv) ControlNet's
   identity is worse under -b (identification; CLIP-I).

Writes into --out: data-train/, data-heldout/, runs/<method>-<setting>-s<seed>/ (train.py's output, and
eval-<tag>/ per sampling: images/, samples.npz, samples.png, result.json), base-s<seed>/, table.md /
table.csv / table.json, scatter.png (Fig. 9: CLIP-I against CLIP-T for every sample, -a and -b in two
colours, a panel per method) and fig3-ip-adapter.png (the IP-Adapter -a and -b across --ip-scales for
two reference-prompt pairs). A second invocation reuses every finished run and evaluation (a stopped
run resumes from its last checkpoint); sampling again with other settings recomputes only the
evaluations.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from . import recipe
from .child import run_child, train_problems
from .recipe import make_datasets, real_image, resolutions, train_command

METHODS = ("retrinet", "controlnet", "ip-adapter")
SETTINGS = ("a", "b")
IP_SCALES = (0.25, 0.5, 0.75, 1.0)   # Fig. 3's sweep
DEFAULTS = {**recipe.DEFAULTS, "steps": 500, "guidance": 7.0, "ip_scale": 0.5, "seeds": (0, 1, 2), "data_seed": 0}
SEED_LIMIT = 2 ** 32   # seeds beyond it are beyond torch's generator once multiplied by 1000 (sample_images)
IDENTITY_SCORES = ("identification", "exact", "hair", "top", "bottom")
# The per-sample measures every row reports (means over samples, then mean and spread over seeds).
MEASURES = ("identification", "prompt_background", "prompt_arms", "copies_background", "joint", "clip_i", "clip_t")
LABELS = {"identification": "identification", "prompt_background": "prompt background",
          "prompt_arms": "prompt arms", "copies_background": "copies ref background", "joint": "joint",
          "clip_i": "CLIP-I", "clip_t": "CLIP-T", "clip_product": "CLIP-I x CLIP-T"}


class LeakageError(Exception):
    """A run or an output folder that cannot be used as asked (main prints it in one line, with
    `status`: 1, or 2 when train.py refused to start)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


class Stopped(LeakageError):
    """A training run that did not reach --steps: stopped by a signal (main exits with 128 + its
    number, as a shell does) or failed (status 1)."""

    def __init__(self, message: str, signum: int = 0):
        super().__init__(message)
        self.signum = signum


def parse_args(argv=None) -> argparse.Namespace:
    from diffusion import SAMPLERS
    ap = argparse.ArgumentParser(prog="python -m experiments.leakage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (reused: finished runs are not trained again)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULTS["seeds"]),
                    help="training seeds: every method and setting trains once per seed (default %(default)s)")
    ap.add_argument("--steps", type=int, default=DEFAULTS["steps"],
                    help="training steps of every run (default %(default)s: the whole default grid fits in 75 "
                         "minutes on a 2-core CPU; BENCHMARKS.md)")
    ap.add_argument("--identities", type=int, default=DEFAULTS["identities"], help="training identities")
    ap.add_argument("--images-per-identity", type=int, default=DEFAULTS["images_per_identity"])
    ap.add_argument("--heldout", type=int, default=DEFAULTS["heldout"], help="identities never trained on")
    ap.add_argument("--size", type=int, default=DEFAULTS["size"], help="side of the generated images")
    ap.add_argument("--data-seed", type=int, default=DEFAULTS["data_seed"], help="seed of both datasets")
    ap.add_argument("--samples", type=int, default=DEFAULTS["samples"], help="samples per held-out identity")
    ap.add_argument("--sample-steps", type=int, default=DEFAULTS["sample_steps"])
    ap.add_argument("--sampler", choices=list(SAMPLERS), default=DEFAULTS["sampler"])
    ap.add_argument("--guidance", type=float, default=DEFAULTS["guidance"],
                    help="text guidance of every method (default %(default)s, the paper's)")
    ap.add_argument("--ip-scale", type=float, default=DEFAULTS["ip_scale"],
                    help="the IP-Adapter's image scale of the table and the claims (default %(default)s, the paper's)")
    ap.add_argument("--ip-scales", type=float, nargs="*", default=list(IP_SCALES),
                    help="the IP-Adapter's scale sweep (Fig. 3; default %(default)s; none: no sweep)")
    ap.add_argument("--base", action=argparse.BooleanOptionalAction, default=True,
                    help="sample the shipped base with the prompt alone (the text ceiling row)")
    ap.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                    help="extra train.py arguments for every run (everything after this flag)")
    args = ap.parse_args(argv)
    for name in ("steps", "identities", "heldout", "samples", "sample_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.heldout < 2:
        ap.error(f"--heldout must be >= 2 (identification picks among the held-out identities), got {args.heldout}")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        ap.error(f"--seeds must be distinct and >= 0, got {' '.join(map(str, args.seeds))}")
    for name, value in [("guidance", args.guidance), ("ip-scale", args.ip_scale), *(("ip-scales", s) for s in args.ip_scales)]:
        if not (math.isfinite(value) and value >= 0):
            ap.error(f"--{name} must be a finite number >= 0, got {value}")
    args.methods, args.settings = list(dict.fromkeys(args.methods)), list(dict.fromkeys(args.settings))
    problems = later_problems(args)
    if problems:
        ap.error("; ".join(problems))
    return args


def later_problems(args: argparse.Namespace) -> list[str]:
    """What would stop the benchmark after it has begun writing, found before: sampling steps beyond
    the sampler's limit, seeds beyond torch's generator (a sample's seed is 1000 x the training
    seed + its entry), data the synthetic generator refuses (its minimum size), an --out that is a
    file, and what train.py would refuse in each method's command (its --train-args; a --batch-size
    above the training samples)."""
    from data.synthetic.generator import _check_args as generator_check
    from diffusion.sd15 import steps_limit
    from training.presets import tiny_configs
    limit = steps_limit(args.sampler, tiny_configs()["schedule"].num_train_timesteps)
    if args.sample_steps > limit:
        return [f"--sample-steps must be <= {limit} (the {args.sampler} sampler's limit on the tiny stack's "
                f"schedule), got {args.sample_steps}"]
    if max(args.seeds) >= SEED_LIMIT or args.data_seed >= SEED_LIMIT:
        return [f"--seeds and --data-seed must be < 2^32, got {' '.join(map(str, args.seeds))} and {args.data_seed}"]
    try:
        generator_check(args.identities, args.images_per_identity, args.size, args.data_seed, 0.0, 0.0,
                        figure_scale=DEFAULTS["figure_scale"])
    except ValueError as e:
        return [f"--{e}".replace("--seed ", "--data-seed ")]
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        return [f"--out {args.out} is a file, expected a folder"]
    problems = []
    setting, seed = args.settings[0], args.seeds[0]
    for method in args.methods:
        run = out / "runs" / run_name(method, setting, seed)
        problems += train_problems(run_command(run, method, setting, seed, out / "data-train", args, resume=True),
                                   args.identities * args.images_per_identity,
                                   f"--identities {args.identities} x --images-per-identity {args.images_per_identity}")
    return list(dict.fromkeys(problems))


# ----------------------------------------------------------------------------------------------
# Data and training
# ----------------------------------------------------------------------------------------------

def make_data(out: Path, args) -> tuple[Path, Path]:
    """The training and held-out scene datasets (generated once; other seeds, other identities)."""
    settings = {k: getattr(args, k) for k in ("identities", "images_per_identity", "heldout", "size", "data_seed")}
    saved = out / "data.json"
    if saved.is_file():
        made = read_record(saved, lambda r: True)
        if made is None:   # then nothing says what data-train/ and data-heldout/ are
            raise LeakageError(f"{saved}: cannot read it (truncated or corrupt), so the data in {out} cannot be "
                               f"checked against these arguments; delete it with data-train/ and data-heldout/ (they "
                               f"are made again from the arguments), or use another --out")
        if made != settings:
            made = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in made.items())
            raise LeakageError(f"{out} holds data made with {made}; use another --out for other data")
    roots = make_datasets(out, args.identities, args.images_per_identity, args.heldout, args.size, args.data_seed,
                          "leakage: generating {name}: {n} identities x {per} scene images",
                          figure_scale=DEFAULTS["figure_scale"], hats=False, scene=True)
    write_record(saved, settings)
    return roots


def read_record(path: Path, valid, redo: str | None = None) -> dict | None:
    """The JSON object in `path` when there is one and `valid(it)`; else None. A file that is not
    such an object (truncated by a kill, corrupt) is named in one line saying that `redo` happens
    again (silently when `redo` is None)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if isinstance(record, dict) and valid(record):
            return record
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    if redo:
        print(f"leakage: {path}: cannot read it (truncated or corrupt); {redo}", file=sys.stderr, flush=True)
    return None


def write_record(path: Path, record: dict, **options) -> None:
    """`record` as JSON into `path`, written under a temporary name and renamed: a kill leaves the
    old file or the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, **options))
    os.replace(tmp, path)


def run_name(method: str, setting: str, seed: int) -> str:
    return f"{method}-{setting}-s{seed}"


def schedule_options(method: str, steps: int) -> list[str]:
    """A cosine schedule restarts once per run (its period is the run's length); a constant one
    (the baselines' official scripts) takes no period."""
    from retrinet import METHODS as CLASSES
    schedule = CLASSES[method].training_defaults.get("schedule", "cosine-restarts")
    return ["--restart-every", str(steps)] if schedule == "cosine-restarts" else []


def train_run(run: Path, method: str, setting: str, seed: int, train_root: Path, args) -> dict:
    """Train one run to --steps (resuming a stopped one); {"minutes": wall time of all its training}."""
    done = run / "done.json"
    record = read_record(done, lambda r: isinstance(r["steps"], int) and math.isfinite(r["minutes"]),
                         f"{run.name} is taken as not finished: training it (again, from its last checkpoint)")
    if record is not None:
        if record["steps"] == args.steps:
            print(f"leakage: {run.name}: trained ({args.steps} steps, {record['minutes']:.1f} min), reused",
                  file=sys.stderr, flush=True)
            return record
        raise LeakageError(f"{run} was trained for {record['steps']} steps, not --steps {args.steps}; "
                           f"use another --out or the same --steps")
    from training.checkpoints import checkpoint_dirs
    resume = bool(checkpoint_dirs(run))
    command = run_command(run, method, setting, seed, train_root, args, resume)
    print(f"leakage: {run.name}: training {args.steps} steps{' (resuming)' if resume else ''}", file=sys.stderr, flush=True)
    wall = run / "wall.json"   # training minutes of earlier, stopped invocations
    earlier = read_record(wall, lambda r: math.isfinite(r["minutes"]),
                          "its earlier training time counts as 0") if resume else None
    before = earlier["minutes"] if earlier else 0.0
    start = time.perf_counter()
    status, signalled = run_child(command)
    if status == 2 and not signalled:   # refused before writing anything: running it again would be refused too
        raise LeakageError(f"training {run.name}: train.py refused to start (status 2; its error above says why): "
                           f"fix --train-args as it says, or wait for the run it names in {run} to end", status=2)
    minutes = before + (time.perf_counter() - start) / 60
    run.mkdir(parents=True, exist_ok=True)
    write_record(wall, {"minutes": minutes})
    saved = checkpoint_dirs(run)
    reached = int(saved[-1].name[5:]) if saved else 0
    if signalled or status != 0 or reached != args.steps:
        # train.py exits 0 after a signal, having saved its step: the run is stopped, not finished
        why = f"by {signal.Signals(signalled).name}" if signalled else f"train.py status {status}"
        raise Stopped(f"training {run.name} stopped at step {reached} of {args.steps} ({why}); its checkpoints are "
                      f"in {run / 'checkpoints'}: run the same command again to resume", signalled)
    record = {"steps": args.steps, "minutes": round(minutes, 2)}
    write_record(done, record)
    return record


def run_command(run: Path, method: str, setting: str, seed: int, train_root: Path, args, resume: bool) -> list[str]:
    """train.py's command for one run of the benchmark."""
    return train_command(
        "--method", method, "--setting", setting, "--data", str(train_root), "--out", str(run), "--max-steps",
        str(args.steps), *schedule_options(method, args.steps), "--seed", str(seed), "--log-every", "50",
        "--save-every", str(max(50, min(500, args.steps // 3))), "--keep", "1", resume=resume,
        train_args=args.train_args)


# ----------------------------------------------------------------------------------------------
# The sampling plan: references of one scene, a prompt asking for another
# ----------------------------------------------------------------------------------------------

def sampling_plan(heldout_root: Path, seed: int) -> list[dict]:
    """Per held-out identity: its references (two images sharing their arms), their scenes, and the
    prompt's scene: the other arms, the facing opposite the first reference's, and a background that
    no reference shows (drawn from the rest with the seed)."""
    from data.annotations import load_records
    from data.synthetic import SCENE_ARMS, SCENE_BACKGROUNDS, SCENE_FACING, Scene, scene_prompt
    from data.synthetic.identity_score import load_identities
    from data.synthetic.scene_score import scene_of
    records = {r["id"]: r for r in load_records(heldout_root)}
    rng = np.random.default_rng([seed, 7])
    plan = []
    for key, ident in sorted(load_identities(heldout_root).items()):
        ids = sorted(ident["ids"])
        scenes = {i: scene_of(records[i]["tags"]) for i in ids}
        by_arms = {a: [i for i in ids if scenes[i]["arms"] == a] for a in SCENE_ARMS}
        prefer = list(SCENE_ARMS)[len(plan) % len(SCENE_ARMS)]   # on a tie, alternately, so prompts ask both
        arms = max(SCENE_ARMS, key=lambda a: (len(by_arms[a]), a == prefer))
        if len(by_arms[arms]) < 2:
            raise LeakageError(f"{heldout_root}: identity {key} has no two images with the same arms")
        refs = by_arms[arms][:2]
        shown = {scenes[i]["background"] for i in refs}
        free = [b for b in SCENE_BACKGROUNDS if b not in shown]
        prompt = Scene(background=free[rng.integers(len(free))], arms=next(a for a in SCENE_ARMS if a != arms),
                       facing=next(f for f in SCENE_FACING if f != scenes[refs[0]]["facing"]))
        plan.append({"identity": ident, "references": [heldout_root / records[i]["image"] for i in refs],
                     "reference_scenes": [scenes[i] for i in refs], "prompt_scene": vars(prompt),
                     "prompt": scene_prompt(prompt)})
    return plan


def references_for(method: str | None) -> int:
    """How many of the plan's references a method takes (its training default, as train.py's); the
    base-only row (None) is compared with the first, as the baselines."""
    from retrinet import METHODS as CLASSES
    return CLASSES[method].training_defaults["refs"] if method else 1


# ----------------------------------------------------------------------------------------------
# Sampling and scoring
# ----------------------------------------------------------------------------------------------

def sample_images(sd, model, method: str | None, plan: list[dict], seed: int, args, scale: float | None,
                  name: str) -> np.ndarray:
    """`args.samples` uint8 images per plan entry: the prompt's scene, the method's references (none
    for the base). Entry i samples with seed 1000 * seed + i, so -a and -b share their initial noise."""
    from common.images import open_image
    from retrinet import generate
    res, ref_res = resolutions()
    k = references_for(method)
    images = []
    for i, entry in enumerate(plan):
        options = {}
        if model is not None:
            refs = [open_image(p, "reference") for p in entry["references"][:k]]
            options = dict(model=model, references=refs, concepts=["figure"] * k, ref_size=ref_res)
            if model.image_scale:
                options["ip_scale"] = scale
        out, _ = generate(sd, entry["prompt"], num=args.samples, steps=args.sample_steps, guidance=args.guidance,
                          sampler=args.sampler, seed=1000 * seed + i, height=res, width=res, **options)
        images += list(out.numpy())
        print(f"\rleakage: {name}: sampling {i + 1}/{len(plan)}", end="\n" if i + 1 == len(plan) else "",
              file=sys.stderr, flush=True)
    return np.stack(images)


class ClipScorer:
    """CLIP-I and CLIP-T of image files, with the tiny stack's CLIP, through eval/ (the features,
    the metrics and their per-generation scoring that `python -m eval` uses for SD-size runs)."""

    def __init__(self):
        from eval.embed import FeatureExtractor, load_scorer_model, load_tokenizer
        from training.presets import STACK
        weights = STACK / "clip" / "model.safetensors"
        model = load_scorer_model(weights, STACK / "clip" / "config.json")
        tokenizer, _ = load_tokenizer(weights, None, model.text_config.max_position_embeddings)
        self.extractor = FeatureExtractor(model, tokenizer, batch_size=64, workers=1)

    def __call__(self, images: list[Path], refs: list[list[Path]], prompts: list[str]) -> tuple[list, list]:
        from eval.manifest import Generation
        from eval.score import score_generations
        gens = [Generation(image=Path(im), refs=[Path(r) for r in rs], prompt=p, seed=0, sample=i, model="m",
                           character="") for i, (im, rs, p) in enumerate(zip(images, refs, prompts))]
        feats = self.extractor.images([g.image for g in gens] + [r for g in gens for r in g.refs])
        scored = score_generations(gens, feats, self.extractor.texts(prompts), {}, [])
        if len(scored) != len(gens):
            raise LeakageError(f"CLIP could not read {len(gens) - len(scored)} of the samples: "
                               f"{next(iter(self.extractor.unreadable.items()), '')}")
        return [s.clip_i for s in scored], [s.clip_t for s in scored]


def per_sample(images, plan: list[dict], per: int, k: int, attributes: list[str], seed: int) -> list[dict]:
    """The ground-truth scores of every sample: identified, the scene readings, the prompt's scene
    followed (each scored attribute and all of them), a reference's background copied, and the
    joint (identified and every scored attribute followed)."""
    from data.synthetic.identity_score import score
    from data.synthetic.scene_score import read
    identities = [e["identity"] for e in plan for _ in range(per)]
    identified = score(list(images), identities, seed=seed)["identified"]
    rows = []
    for n, (im, ok) in enumerate(zip(images, identified)):
        entry = plan[n // per]
        reading = read(im, attributes)
        row = {"entry": n // per, "sample": n % per, "identified": bool(ok), "reading": reading}
        for att in attributes:
            row[f"prompt_{att}"] = reading[att] == entry["prompt_scene"][att]
        if "background" in attributes:
            row["copies_background"] = reading["background"] in {s["background"] for s in entry["reference_scenes"][:k]}
        row["prompt_followed"] = all(row[f"prompt_{att}"] for att in attributes)
        row["joint"] = row["identified"] and row["prompt_followed"]
        rows.append(row)
    return rows


def evaluate(folder: Path, sd, model, method: str | None, plan: list[dict], attributes: list[str], seed: int,
             scale: float | None, scorer: ClipScorer, args) -> dict:
    """Sample and score one model (a trained run, or the base when `model` is None) into `folder`,
    or reuse its result.json when made with the same settings. Returns {"settings", "samples": [per
    sample], and the means}."""
    k = references_for(method)
    settings = {"samples": args.samples, "sample_steps": args.sample_steps, "sampler": args.sampler,
                "guidance": args.guidance, "seed": seed, "scale": scale, "attributes": attributes,
                "plan": [[e["prompt"], *(Path(p).name for p in e["references"])] for e in plan]}
    path = folder / "result.json"
    # Unreadable: not evaluated. Said once, when the model is here to evaluate it again (main calls
    # first without it).
    saved = read_record(path, lambda r: isinstance(r["settings"], dict) and isinstance(r["samples"], list),
                        None if sd is None else "sampling and scoring it again")
    if saved is not None and saved["settings"] == settings:
        print(f"leakage: {folder.parent.name}/{folder.name}: evaluated, reused", file=sys.stderr, flush=True)
        return saved
    if sd is None:
        return {}
    images = sample_images(sd, model, method, plan, seed, args, scale, f"{folder.parent.name}/{folder.name}")
    from PIL import Image
    (folder / "images").mkdir(parents=True, exist_ok=True)
    files = []
    for n, a in enumerate(images):
        files.append(folder / "images" / f"{n // args.samples:03d}-{n % args.samples}.png")
        Image.fromarray(a).save(files[-1])
    np.savez_compressed(folder / "samples.npz", images=images,
                        identities=[e["identity"]["key"] for e in plan for _ in range(args.samples)])
    sample_grid(plan, images, args.samples, k if model is not None else 0).save(folder / "samples.png")
    rows = per_sample(images, plan, args.samples, k, attributes, seed)
    clip_i, clip_t = scorer(files, [plan[r["entry"]]["references"][:k] for r in rows],
                            [plan[r["entry"]]["prompt"] for r in rows])
    for r, ci, ct in zip(rows, clip_i, clip_t):
        r.update(clip_i=ci, clip_t=ct, clip_product=ci * ct)
    result = {"settings": settings, "n": len(rows), "samples": rows, **means(rows)}
    write_record(path, result, indent=1)
    return result


def means(rows: list[dict]) -> dict:
    """The mean of every measure over samples; CLIP-I x CLIP-T as the paper's element-wise product:
    the mean of the per-sample products (eval.metrics.swd, Eq. 1 with CLIP-I as similarity and
    CLIP-T as diversity)."""
    from eval.metrics import swd
    out = {m: float(np.mean([r[_key(m)] for r in rows])) for m in MEASURES if _key(m) in rows[0]}
    out["clip_product"] = float(swd([r["clip_i"] for r in rows], [r["clip_t"] for r in rows]).value)
    return out


def _key(measure: str) -> str:
    return "identified" if measure == "identification" else measure


def sample_grid(plan: list[dict], images, per: int, k: int, cell: int = 64):
    """One row per held-out identity: the references the model saw, the prompt, then the samples."""
    from PIL import Image, ImageDraw
    pad, label_w = 4, 150
    cols = k + per
    grid = Image.new("RGB", (label_w + cols * (cell + pad) + pad, len(plan) * (cell + pad) + pad + 14), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate([f"ref {r + 1}" for r in range(k)] + [f"sample {s + 1}" for s in range(per)]):
        draw.text((label_w + pad + j * (cell + pad), 2), text, fill="black")
    for r, entry in enumerate(plan):
        y = 14 + pad + r * (cell + pad)
        _prompt_label(draw, entry["prompt_scene"], 4, y)
        row = [Image.open(p).convert("RGB") for p in entry["references"][:k]]
        row += [Image.fromarray(a) for a in images[r * per:(r + 1) * per]]
        for j, im in enumerate(row):
            grid.paste(im.resize((cell, cell), Image.NEAREST), (label_w + pad + j * (cell + pad), y))
    return grid


def _prompt_label(draw, scene: dict, x: int, y: int) -> None:
    draw.text((x, y + 8), "prompt:", fill="black")
    draw.text((x, y + 22), f"{scene['background']} background", fill="black")
    draw.text((x, y + 36), f"{scene['arms'].replace('_', ' ')}, {scene['facing'].replace('_', ' ')}", fill="black")


# ----------------------------------------------------------------------------------------------
# Scorer ceilings, chance, the tables and the claims
# ----------------------------------------------------------------------------------------------

def real_images(heldout_root: Path, plan: list[dict]) -> tuple[list, list[dict], list[dict]]:
    """Every held-out image at the sampling resolution (fitted as training fits it), its identity and
    its scene."""
    from data.annotations import load_records
    from data.synthetic.scene_score import scene_of
    by_key = {e["identity"]["key"]: e["identity"] for e in plan}
    images, identities, scenes = [], [], []
    for rec in load_records(heldout_root):
        ident = next(i for i in by_key.values() if rec["id"] in i["ids"])
        images.append(real_image(heldout_root / rec["image"]))
        identities.append(ident)
        scenes.append(scene_of(rec["tags"]))
    return images, identities, scenes


def ceilings(heldout_root: Path, plan: list[dict], seed: int) -> dict:
    """Every scorer on the real held-out images: identity scores and each scene reader's accuracy."""
    from data.synthetic.identity_score import score
    from data.synthetic.scene_score import calibrate
    images, identities, scenes = real_images(heldout_root, plan)
    ident = score(images, identities, seed=seed)
    return {**{k: ident[k] for k in IDENTITY_SCORES}, **calibrate(images, scenes), "n": len(images)}


def chance(plan: list[dict], attributes: list[str]) -> dict:
    """What a uniform guess scores: identification 1 / identities; a scene attribute 1 / its choices;
    copying, the share of the backgrounds the first K references show (K = 1 and 2); the joint, their
    product."""
    from data.synthetic.scene_score import CHOICES
    out = {"identification": 1 / len(plan)}
    for att in attributes:
        out[f"prompt_{att}"] = 1 / CHOICES[att]
    if "background" in attributes:
        out["copies_background"] = {f"K={k}": float(np.mean([len({s["background"] for s in e["reference_scenes"][:k]})
                                                                for e in plan])) / CHOICES["background"]
                                    for k in (1, 2)}
    out["joint"] = out["identification"] * float(np.prod([1 / CHOICES[a] for a in attributes]))
    return out


def summary_rows(results: dict) -> list[dict]:
    """One row per (method, setting, scale) over its seeds: each measure's mean over seeds and its
    spread (sample standard deviation of the per-seed means; 0 with one seed)."""
    groups: dict[tuple, list[dict]] = {}
    for (method, setting, seed, scale), r in results.items():
        groups.setdefault((method, setting, scale), []).append(r)
    rows = []
    for (method, setting, scale), rs in groups.items():
        row = {"method": method, "setting": setting, "scale": scale, "seeds": len(rs)}
        for m in (*MEASURES, "clip_product"):
            if m in rs[0]:
                v = np.array([r[m] for r in rs])
                row[m] = float(v.mean())
                row[m + "_sd"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        row["train_minutes"] = float(np.mean([r.get("minutes", 0.0) for r in rs]))
        rows.append(row)
    return rows


# Each of the paper's directional claims: (name, methods, measure, the setting claimed higher).
CLAIMS = [("(i) -a copies the reference's background more", METHODS, "copies_background", "a"),
          ("(ii) -b follows the prompt's background better", METHODS, "prompt_background", "b"),
          ("(ii) -b follows the prompt better (CLIP-T)", METHODS, "clip_t", "b"),
          ("(iii) -b balances identity and text better (joint)", ("retrinet", "ip-adapter"), "joint", "b"),
          ("(iii) -b balances identity and text better (CLIP-I x CLIP-T)", ("retrinet", "ip-adapter"),
           "clip_product", "b"),
          ("(iv) ControlNet's identity is worse under -b (identification)", ("controlnet",), "identified", "a"),
          ("(iv) ControlNet's identity is worse under -b (CLIP-I)", ("controlnet",), "clip_i", "a")]


def claims(results: dict, seeds: list[int], ip_scale: float) -> list[dict]:
    """Each claim tested per method on the -a / -b sample pairs pooled over seeds: the one-sided
    paired permutation p in the claimed direction and in the opposite one, the seeds whose mean
    difference has the claimed sign, and the verdict at 0.05."""
    from eval.stats import paired_permutation_p, verdict
    out = []
    for name, methods, measure, higher in CLAIMS:
        for method in methods:
            scale = ip_scale if method == "ip-adapter" else None
            pairs = [(results.get((method, "a", s, scale)), results.get((method, "b", s, scale))) for s in seeds]
            pairs = [(a, b) for a, b in pairs if a and b]
            if not pairs or not all(measure in x["samples"][0] for a, b in pairs for x in (a, b)):
                continue
            sign = 1.0 if higher == "a" else -1.0
            per_seed = [sign * (np.array([x[measure] for x in a["samples"]], float)
                                - np.array([x[measure] for x in b["samples"]], float)) for a, b in pairs]
            d = np.concatenate(per_seed)
            p, p_opposite = paired_permutation_p(d), paired_permutation_p(-d)
            out.append({"claim": name, "method": method, "measure": measure,
                        "a": float(np.mean([np.mean([x[measure] for x in a["samples"]]) for a, _ in pairs])),
                        "b": float(np.mean([np.mean([x[measure] for x in b["samples"]]) for _, b in pairs])),
                        "seeds_agreeing": int(sum(x.mean() > 0 for x in per_seed)), "seeds": len(pairs),
                        "pairs": int(d.size), "p": p, "p_opposite": p_opposite, "verdict": verdict(p, p_opposite)})
    return out


def _fmt(row: dict, m: str, pct: bool) -> str:
    v, sd = row.get(m), row.get(m + "_sd", 0.0)
    if v is None:
        return "-"
    if pct:
        return f"{v:.1%}" + (f" ± {sd:.1%}" if row.get("seeds", 1) > 1 else "")
    return f"{v:.3f}" + (f" ± {sd:.3f}" if row.get("seeds", 1) > 1 else "")


PERCENT = {"identification", "prompt_background", "prompt_arms", "copies_background", "joint"}


def write_tables(out: Path, results: dict, rows: list[dict], tested: list[dict], chance_row: dict, ceiling: dict,
                 attributes: list[str], dropped: dict, context: dict) -> None:
    """table.json (everything), table.csv (one line per run and sampling) and table.md: the main
    table (Tab. 3.1's shape with the ground truth beside it), the IP-Adapter's scale sweep and the
    claims."""
    measures = [m for m in (*MEASURES, "clip_product") if any(m in r for r in rows)]
    (out / "table.json").write_text(json.dumps({"rows": rows, "claims": tested, "chance": chance_row,
                                                "scorer_on_real_images": ceiling, "scored_scene_attributes": attributes,
                                                "dropped_scene_attributes": dropped, **context}, indent=1))
    with open(out / "table.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "setting", "seed", "scale", *measures, "train_minutes"])
        for (method, setting, seed, scale), r in results.items():
            writer.writerow([method, setting, seed, "" if scale is None else scale,
                             *(r.get(m, "") for m in measures), r.get("minutes", "")])
    head = "| method | setting | " + " | ".join(LABELS[m] for m in measures) + " | train min |"
    rule = "|" + "---|" * (len(measures) + 3)

    def line(row, label):
        return f"| {label} | " + " | ".join(_fmt(row, m, m in PERCENT) for m in measures) + \
               f" | {row['train_minutes']:.1f} |"

    main = [head, rule]
    for row in rows:
        if row["method"] == "base":
            main.append(line(row, "base only (no references) |"))
        elif row["scale"] in (None, context["ip_scale"]):
            name = row["method"] + (f"-{row['scale']:g}" if row["scale"] is not None else "")
            main.append(line(row, f"{name} | -{row['setting']}"))

    def plain(v):
        if isinstance(v, dict):
            return ", ".join(f"{plain(x)} ({k})" for k, x in v.items())
        return "-" if v is None else f"{v:.1%}"
    main.append("| chance | | " + " | ".join(plain(chance_row.get(m)) for m in measures) + " | |")
    main.append("| scorer on real images | | " + " | ".join(
        plain(ceiling.get(m.replace("prompt_", "")) if m in ("identification", "prompt_background", "prompt_arms")
              else None) for m in measures) + " | |")
    sweep = [row for row in rows if row["method"] == "ip-adapter"]
    sweep_lines = []
    if len({r["scale"] for r in sweep}) > 1:
        sweep_lines = ["| scale | setting | " + " | ".join(LABELS[m] for m in measures) + " |",
                       "|" + "---|" * (len(measures) + 2)]
        for row in sorted(sweep, key=lambda r: (r["scale"], r["setting"])):
            sweep_lines.append(f"| {row['scale']:g} | -{row['setting']} | "
                               + " | ".join(_fmt(row, m, m in PERCENT) for m in measures) + " |")
    claim_lines = ["| claim | method | measure | -a | -b | seeds agreeing | p (pooled) | p (opposite) | verdict |",
                   "|---|---|---|---|---|---|---|---|---|"]
    for c in tested:
        pct = c["measure"] in PERCENT | {"identified"}
        f = (lambda v: f"{v:.1%}") if pct else (lambda v: f"{v:.3f}")
        claim_lines.append(f"| {c['claim']} | {c['method']} | {LABELS.get(c['measure'], 'identification')} | "
                           f"{f(c['a'])} | {f(c['b'])} | {c['seeds_agreeing']}/{c['seeds']} | {c['p']:.3g} | "
                           f"{c['p_opposite']:.3g} | {c['verdict']} |")
    not_scored = "; ".join(f"{a} (its reader reads {v:.0%} of real images right, below 90%)" for a, v in dropped.items())
    (out / "table.md").write_text(f"""# Leakage benchmark (miniature of the paper's Tab. 3.1)

{context['heldout']} held-out identities x {context['samples']} samples per run; tiny preset fine-tuned from the shipped
stack, {context['steps']} training steps per run on {context['training_identities']} identities, the same data for every
run, training seeds {', '.join(map(str, context['seeds']))} (mean ± spread over seeds). Sampling: text guidance
{context['guidance']:g}, {context['sampler']} {context['sample_steps']} steps, the IP-Adapter at scale {context['ip_scale']:g}.
Prompts ask for a background, arms and facing the references do not show. Identification: the sample's
colours match its own identity best among the held-out ones. Prompt X: the sample shows the prompt's X.
Copies ref background: it shows a reference's instead (chance depends on how many references a method
takes, K: RetriNet 2, the baselines and the base 1). Joint: identified and every scored attribute as the
prompt asks. CLIP-I / CLIP-T: the tiny stack's CLIP, cosine to the references / the prompt;
CLIP-I x CLIP-T: the paper's element-wise product, the mean over samples of CLIP-I x CLIP-T. Scorer on real images: the scorers on the held-out
images themselves (the ceiling).{' Not scored: ' + not_scored + '.' if dropped else ''}

{chr(10).join(main)}
{chr(10) + '## The IP-Adapter across image scales (Fig. 3)' + chr(10) + chr(10) + chr(10).join(sweep_lines) + chr(10) if sweep_lines else ''}
## The paper's claims

One-sided paired permutation tests on the -a / -b pairs (same seed, identity, prompt, references and
initial noise) pooled over seeds; "reproduced" when p < 0.05 in the claimed direction, "reversed"
when p < 0.05 in the opposite one. Samples of one model share its training, so read p as a guide.

{chr(10).join(claim_lines)}
""")


def plot(out: Path, results: dict, methods: list[str], ip_scale: float) -> None:
    """scatter.png, as the paper's Fig. 9: CLIP-I against CLIP-T for every sample of every seed,
    -a and -b in two colours, one panel per method, side by side."""
    from PIL import Image
    from eval.plots import scatter
    panels = []
    for method in methods:
        scale = ip_scale if method == "ip-adapter" else None
        series = []
        for setting in SETTINGS:
            samples = [x for (m, s, _, sc), r in results.items() if m == method and s == setting and sc == scale
                       for x in r["samples"]]
            if samples:
                series.append((f"-{setting}", [x["clip_t"] for x in samples], [x["clip_i"] for x in samples]))
        if series:
            path = out / f"scatter-{method}.png"
            scatter(path, series, xlabel="CLIP-T", ylabel="CLIP-I", title=method, size=360)
            panels.append(Image.open(path).convert("RGB"))
    if panels:
        sheet = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
        x = 0
        for p in panels:
            sheet.paste(p, (x, 0))
            x += p.width
        sheet.save(out / "scatter.png")


def fig3(out: Path, plan: list[dict], folders: dict, per: int, cell: int = 64) -> None:
    """fig3-ip-adapter.png, as the paper's Fig. 3: for two reference-prompt pairs, the IP-Adapter
    trained -a and -b (first seed), its first sample at each image scale. `folders`:
    {(setting, scale): evaluation folder}."""
    from PIL import Image, ImageDraw
    scales = sorted({s for _, s in folders})
    settings = sorted({s for s, _ in folders})
    pad, label_w = 4, 150
    rows = [(e, s) for e in range(min(2, len(plan))) for s in settings]
    grid = Image.new("RGB", (label_w + (1 + len(scales)) * (cell + pad) + pad, len(rows) * (cell + pad) + pad + 14),
                     "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(["reference"] + [f"scale {s:g}" for s in scales]):
        draw.text((label_w + pad + j * (cell + pad), 2), text, fill="black")
    for r, (e, setting) in enumerate(rows):
        y = 14 + pad + r * (cell + pad)
        _prompt_label(draw, plan[e]["prompt_scene"], 4, y)
        draw.text((100, y + 8), f"-{setting}", fill="black")
        row = [Image.open(plan[e]["references"][0]).convert("RGB")]
        row += [Image.fromarray(np.load(folders[(setting, s)] / "samples.npz")["images"][e * per]) for s in scales]
        for j, im in enumerate(row):
            grid.paste(im.resize((cell, cell), Image.NEAREST), (label_w + pad + j * (cell + pad), y))
    grid.save(out / "fig3-ip-adapter.png")


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run_benchmark(args)
    except LeakageError as e:
        print(f"leakage: error: {e}", file=sys.stderr)
        return 128 + e.signum if isinstance(e, Stopped) and e.signum else e.status


def run_benchmark(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_root, heldout_root = make_data(out, args)
    plan = sampling_plan(heldout_root, args.data_seed)
    ceiling = ceilings(heldout_root, plan, args.data_seed)
    from data.synthetic.scene_score import READERS, reliable
    attributes = reliable({k: ceiling[k] for k in READERS})
    dropped = {k: ceiling[k] for k in READERS if k not in attributes}
    print("leakage: scorers on real held-out images: " + ", ".join(f"{k} {ceiling[k]:.0%}" for k in
          (*IDENTITY_SCORES, *READERS)) + (f"; not scored: {', '.join(dropped)}" if dropped else ""), file=sys.stderr)
    from training.presets import load_run, load_tiny_stack
    scorer = ClipScorer()
    results = {}   # (method, setting, seed, scale) -> evaluation (+ training minutes)
    fig3_folders = {}
    for method in args.methods:
        for setting in args.settings:
            for seed in args.seeds:
                run = out / "runs" / run_name(method, setting, seed)
                record = train_run(run, method, setting, seed, train_root, args)
                sd = model = None
                scales = [None]
                if method == "ip-adapter":
                    scales = list(dict.fromkeys([args.ip_scale, *args.ip_scales]))
                for scale in scales:
                    folder = run / ("eval" if scale is None else f"eval-ip{scale:g}")
                    result = evaluate(folder, sd, model, method, plan, attributes, seed, scale, scorer, args)
                    if not result:   # not evaluated with these settings yet: load the run once
                        sd, model, _ = load_run(run)
                        result = evaluate(folder, sd, model, method, plan, attributes, seed, scale, scorer, args)
                    results[(method, setting, seed, scale)] = {**result, **means(result["samples"]), **record}
                    if method == "ip-adapter" and seed == args.seeds[0]:
                        fig3_folders[(setting, scale)] = folder
    if args.base:
        base_sd = None
        for seed in args.seeds:
            folder = out / f"base-s{seed}"
            result = evaluate(folder, None, None, None, plan, attributes, seed, None, scorer, args)
            if not result:
                base_sd = base_sd or load_tiny_stack()
                result = evaluate(folder, base_sd, None, None, plan, attributes, seed, None, scorer, args)
            results[("base", "", seed, None)] = {**result, **means(result["samples"])}
    rows = summary_rows(results)
    tested = claims(results, args.seeds, args.ip_scale)
    from data.synthetic.identity_score import load_identities
    context = {"heldout": len(plan), "samples": args.samples, "steps": args.steps, "seeds": args.seeds,
               "training_identities": len(load_identities(train_root)), "guidance": args.guidance,
               "ip_scale": args.ip_scale, "sampler": args.sampler, "sample_steps": args.sample_steps,
               "total_minutes": round((time.perf_counter() - start) / 60, 2)}
    write_tables(out, results, rows, tested, chance(plan, attributes), ceiling, attributes, dropped, context)
    plot(out, results, args.methods, args.ip_scale)
    if len({s for _, s in fig3_folders}) > 1:
        fig3(out, plan, fig3_folders, args.samples)
    print((out / "table.md").read_text(), file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
