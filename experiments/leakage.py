"""The paper's leakage benchmark in miniature (Sec. 3.1, Tab. 3.1, Fig. 3 and 9), on synthetic data.

    python -m experiments.leakage --out leakage-output          # make leakage: 3 methods x 2 settings
    python -m experiments.leakage --out DIR --methods retrinet --steps 3000

The claim under test: training with the target itself as reference (setting a) leaks the target's
layout and background into the condition encoder, so the model copies its reference and follows the
prompt less; training with another image of the same identity (setting b) does not. Here the
synthetic generator knows every image's identity, background and pose, so ground-truth scorers
replace the paper's CLIP scores:

1. Data (data.synthetic --scene): every image has a background colour from a named palette and arms
   up or down, facing left or right, all drawn independently of its identity, and its prompt names
   them and nothing else ("1girl, solo, full body, arms up, facing left, blue background"): the
   identity has to come from the references. A training set and a held-out set of other identities.
2. Training: train.py --preset tiny for each method (RetriNet, ControlNet, IP-Adapter) in setting a
   and in setting b, on the same data with the same seed and number of steps, plus the experiments'
   recipe (recipe.TRAIN_RECIPE: a weight average). References keep their backgrounds (that is what
   may leak).
3. Sampling: for every held-out identity, two of its images that share their arms are the
   references (the baselines take the first), and the prompt asks for the other arms, the other
   facing and a background that no reference shows. Text guidance, the same for every method.
4. Scores (data.synthetic.identity_score, data.synthetic.scene_score), each against chance and
   beside the scorer's accuracy on real held-out images (its ceiling): identity retrieval
   (identification among the held-out identities, exact colours, hair / top / bottom); prompt
   adherence (the fraction of samples with the prompt's background, arms, facing); copying (the
   fraction with a reference's instead). A scene attribute whose reader reads real images below 90% is not scored.

Writes into --out: data-train/, data-heldout/, runs/<method>-<setting>/ (train.py's output, and
samples.npz, samples.png and result.json of its evaluation), table.md / table.csv / table.json and
scatter.png (identity against prompt adherence, setting a and b in two colours, as Fig. 9). A second
invocation reuses every finished run and evaluation (a stopped run resumes from its last
checkpoint); sampling again with other settings recomputes only the evaluations.
"""
from __future__ import annotations

import argparse
import csv
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np

from . import recipe
from .child import run_child
from .recipe import make_datasets, real_image, resolutions, train_command

METHODS = ("retrinet", "controlnet", "ip-adapter")
SETTINGS = ("a", "b")
DEFAULTS = {**recipe.DEFAULTS, "steps": 1200, "guidance": 3.0, "seed": 0}
IDENTITY_SCORES = ("identification", "exact", "hair", "top", "bottom")


class LeakageError(Exception):
    """A run or an output folder that cannot be used as asked (main prints it in one line, status 1)."""


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
    ap.add_argument("--steps", type=int, default=DEFAULTS["steps"],
                    help="training steps of every run (default %(default)s: the whole grid took 78 minutes on a "
                         "2-core CPU; BENCHMARKS.md)")
    ap.add_argument("--identities", type=int, default=DEFAULTS["identities"], help="training identities")
    ap.add_argument("--images-per-identity", type=int, default=DEFAULTS["images_per_identity"])
    ap.add_argument("--heldout", type=int, default=DEFAULTS["heldout"], help="identities never trained on")
    ap.add_argument("--size", type=int, default=DEFAULTS["size"], help="side of the generated images")
    ap.add_argument("--samples", type=int, default=DEFAULTS["samples"], help="samples per held-out identity")
    ap.add_argument("--sample-steps", type=int, default=DEFAULTS["sample_steps"])
    ap.add_argument("--sampler", choices=list(SAMPLERS), default=DEFAULTS["sampler"])
    ap.add_argument("--guidance", type=float, default=DEFAULTS["guidance"], help="text guidance of every method")
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                    help="extra train.py arguments for every run (everything after this flag)")
    args = ap.parse_args(argv)
    for name in ("steps", "identities", "heldout", "samples", "sample_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.heldout < 2:
        ap.error(f"--heldout must be >= 2 (identification picks among the held-out identities), got {args.heldout}")
    return args


# ----------------------------------------------------------------------------------------------
# Data and training
# ----------------------------------------------------------------------------------------------

def make_data(out: Path, args) -> tuple[Path, Path]:
    """The training and held-out scene datasets (generated once; other seeds, other identities)."""
    settings = {k: getattr(args, k) for k in ("identities", "images_per_identity", "heldout", "size", "seed")}
    saved = out / "data.json"
    if saved.is_file() and json.loads(saved.read_text()) != settings:
        made = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in json.loads(saved.read_text()).items())
        raise LeakageError(f"{out} holds data made with {made}; use another --out for other data or seeds")
    roots = make_datasets(out, args.identities, args.images_per_identity, args.heldout, args.size, args.seed,
                          "leakage: generating {name}: {n} identities x {per} scene images",
                          figure_scale=DEFAULTS["figure_scale"], hats=False, scene=True)
    saved.write_text(json.dumps(settings))
    return roots


def run_name(method: str, setting: str) -> str:
    return f"{method}-{setting}"


def train_run(run: Path, method: str, setting: str, train_root: Path, args) -> dict:
    """Train one run to --steps (resuming a stopped one); {"minutes": wall time of all its training}."""
    done = run / "done.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("steps") == args.steps:
            print(f"leakage: {run.name}: trained ({args.steps} steps, {record['minutes']:.1f} min), reused",
                  file=sys.stderr, flush=True)
            return record
        raise LeakageError(f"{run} was trained for {record.get('steps')} steps, not --steps {args.steps}; "
                           f"use another --out or the same --steps")
    from training.checkpoints import checkpoint_dirs
    resume = bool(checkpoint_dirs(run))
    command = train_command(
        "--method", method, "--setting", setting, "--data", str(train_root), "--out", str(run), "--max-steps",
        str(args.steps), "--restart-every", str(args.steps), "--seed", str(args.seed), "--log-every", "50",
        "--save-every", str(max(50, min(500, args.steps // 3))), "--keep", "1", resume=resume,
        train_args=args.train_args)
    print(f"leakage: {run.name}: training {args.steps} steps{' (resuming)' if resume else ''}", file=sys.stderr, flush=True)
    wall = run / "wall.json"   # training minutes of earlier, stopped invocations
    before = json.loads(wall.read_text())["minutes"] if wall.is_file() and resume else 0.0
    start = time.perf_counter()
    status, signalled = run_child(command)
    minutes = before + (time.perf_counter() - start) / 60
    run.mkdir(parents=True, exist_ok=True)
    wall.write_text(json.dumps({"minutes": minutes}))
    saved = checkpoint_dirs(run)
    reached = int(saved[-1].name[5:]) if saved else 0
    if signalled or status != 0 or reached != args.steps:
        # train.py exits 0 after a signal, having saved its step: the run is stopped, not finished
        why = f"by {signal.Signals(signalled).name}" if signalled else f"train.py status {status}"
        raise Stopped(f"training {run.name} stopped at step {reached} of {args.steps} ({why}); its checkpoints are "
                      f"in {run / 'checkpoints'}: run the same command again to resume", signalled)
    record = {"steps": args.steps, "minutes": round(minutes, 2)}
    done.write_text(json.dumps(record))
    return record


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


def references_for(method: str) -> int:
    """How many of the plan's references a method takes (its training default, as train.py's)."""
    from retrinet import METHODS as CLASSES
    return CLASSES[method].training_defaults["refs"]


# ----------------------------------------------------------------------------------------------
# Sampling and scoring
# ----------------------------------------------------------------------------------------------

def sample_run(run: Path, method: str, plan: list[dict], args) -> np.ndarray:
    """`args.samples` uint8 images per plan entry: the prompt's scene, the method's references."""
    from common.images import open_image
    from retrinet import generate
    from training.presets import load_run
    res, ref_res = resolutions()
    sd, model, _ = load_run(run)
    k = references_for(method)
    images = []
    for i, entry in enumerate(plan):
        refs = [open_image(p, "reference") for p in entry["references"][:k]]
        out, _ = generate(sd, entry["prompt"], model=model, references=refs, concepts=["figure"] * k,
                          num=args.samples, steps=args.sample_steps, guidance=args.guidance, sampler=args.sampler,
                          seed=args.seed + i, height=res, width=res, ref_size=ref_res)
        images += list(out.numpy())
        print(f"\rleakage: {run.name}: sampling {i + 1}/{len(plan)}", end="\n" if i + 1 == len(plan) else "",
              file=sys.stderr, flush=True)
    return np.stack(images)


def scene_scores(images, plan: list[dict], per: int, k: int, attributes: list[str]) -> dict:
    """Prompt adherence and copying per scored scene attribute, with their chance rates: adherence,
    the fraction of samples whose reading is the prompt's; copying, the fraction whose reading is one
    the method's references show (the first k) instead. Chance: a uniform reading."""
    from data.synthetic.scene_score import CHOICES, read
    readings = [read(im, attributes) for im in images]
    out = {}
    for att in attributes:
        wanted = [e["prompt_scene"][att] for e in plan for _ in range(per)]
        shown = [{s[att] for s in e["reference_scenes"][:k]} for e in plan for _ in range(per)]
        got = [r[att] for r in readings]
        out[f"adherence_{att}"] = float(np.mean([g == w for g, w in zip(got, wanted)]))
        out[f"copying_{att}"] = float(np.mean([g in s for g, s in zip(got, shown)]))
        out[f"chance_adherence_{att}"] = 1 / CHOICES[att]
        out[f"chance_copying_{att}"] = float(np.mean([len(s) / CHOICES[att] for s in shown]))
    out["readings"] = readings
    return out


def evaluate_run(run: Path, method: str, plan: list[dict], attributes: list[str], args) -> dict:
    """Sample and score one trained run, or reuse its result.json when made with the same settings."""
    from data.synthetic.identity_score import score
    settings = {"samples": args.samples, "sample_steps": args.sample_steps, "sampler": args.sampler,
                "guidance": args.guidance, "seed": args.seed, "attributes": attributes,
                "plan": [[e["prompt"], *(Path(p).name for p in e["references"])] for e in plan]}
    path = run / "result.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            print(f"leakage: {run.name}: evaluated, reused", file=sys.stderr, flush=True)
            return saved
    images = sample_run(run, method, plan, args)
    np.savez_compressed(run / "samples.npz", images=images,
                        identities=[e["identity"]["key"] for e in plan for _ in range(args.samples)])
    sample_grid(plan, images, args.samples, references_for(method)).save(run / "samples.png")
    identities = [e["identity"] for e in plan for _ in range(args.samples)]
    ident = score(list(images), identities, seed=args.seed)
    scene = scene_scores(images, plan, args.samples, references_for(method), attributes)
    result = {"settings": settings, "n": ident["n"],
              **{k: ident[k] for k in IDENTITY_SCORES}, "chance_identification": ident["chance_identification"],
              **{f"chance_{k}": ident[f"null_{k}"] for k in IDENTITY_SCORES[1:]},
              "p_identification": ident["p_identification"],
              **{k: v for k, v in scene.items() if k != "readings"}}
    path.write_text(json.dumps(result, indent=1))
    return result


def sample_grid(plan: list[dict], images, per: int, k: int, cell: int = 64):
    """One row per held-out identity: the references the method saw, the prompt, then the samples."""
    from PIL import Image, ImageDraw
    pad, label_w = 4, 150
    cols = k + per
    grid = Image.new("RGB", (label_w + cols * (cell + pad) + pad, len(plan) * (cell + pad) + pad + 14), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate([f"ref {r + 1}" for r in range(k)] + [f"sample {s + 1}" for s in range(per)]):
        draw.text((label_w + pad + j * (cell + pad), 2), text, fill="black")
    for r, entry in enumerate(plan):
        y = 14 + pad + r * (cell + pad)
        scene = entry["prompt_scene"]
        draw.text((4, y + 8), "prompt:", fill="black")
        draw.text((4, y + 22), f"{scene['background']} background", fill="black")
        draw.text((4, y + 36), f"{scene['arms'].replace('_', ' ')}, {scene['facing'].replace('_', ' ')}", fill="black")
        row = [Image.open(p).convert("RGB") for p in entry["references"][:k]]
        row += [Image.fromarray(a) for a in images[r * per:(r + 1) * per]]
        for j, im in enumerate(row):
            grid.paste(im.resize((cell, cell), Image.NEAREST), (label_w + pad + j * (cell + pad), y))
    return grid


# ----------------------------------------------------------------------------------------------
# Scorer ceilings and the table
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


COLUMNS = [("identification", "identification"), ("exact", "exact colours"), ("hair", "hair"), ("top", "top"),
           ("bottom", "bottom")]


def table_rows(results: dict, attributes: list[str]) -> list[dict]:
    """One row per run: identity scores, adherence and copying per scene attribute, and their mean."""
    rows = []
    for name, r in results.items():
        method, _, setting = name.rpartition("-")
        row = {"method": method, "setting": setting, "steps": r["steps"], "train_minutes": r["minutes"],
               **{k: r[k] for k, _ in COLUMNS}, "p_identification": r["p_identification"]}
        for att in attributes:
            row[f"adherence_{att}"] = r[f"adherence_{att}"]
            row[f"copying_{att}"] = r[f"copying_{att}"]
            row[f"chance_copying_{att}"] = r[f"chance_copying_{att}"]
        row["adherence"] = float(np.mean([r[f"adherence_{a}"] for a in attributes])) if attributes else float("nan")
        row["copying"] = float(np.mean([r[f"copying_{a}"] for a in attributes])) if attributes else float("nan")
        rows.append(row)
    return rows


def write_table(out: Path, rows: list[dict], chance: dict, ceiling: dict, attributes: list[str],
                dropped: dict, context: dict) -> None:
    """table.json / table.csv / table.md, shaped like Tab. 3.1: a row per method and setting."""
    (out / "table.json").write_text(json.dumps({"rows": rows, "chance": chance, "scorer_on_real_images": ceiling,
                                                "scored_scene_attributes": attributes,
                                                "dropped_scene_attributes": dropped, **context}, indent=1))
    with open(out / "table.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    scene_cols = [(f"adherence_{a}", f"prompt {a}") for a in attributes] + \
                 [(f"copying_{a}", f"copies ref {a}") for a in attributes]
    cols = COLUMNS + scene_cols
    head = "| method | setting | " + " | ".join(label for _, label in cols) + " | p (identification) | train min |"
    rule = "|" + "---|" * (len(cols) + 4)
    def pct(v):
        if isinstance(v, dict):   # a rate per number of references
            return ", ".join(f"{pct(x)} ({k})" for k, x in v.items())
        return "-" if v is None or v != v else f"{v:.1%}"

    lines = [head, rule]
    for row in rows:
        lines.append(f"| {row['method']} | -{row['setting']} | " + " | ".join(pct(row[k]) for k, _ in cols)
                     + f" | {row['p_identification']:.2g} | {row['train_minutes']:.1f} |")
    lines.append("| chance | | " + " | ".join(pct(chance[k]) for k, _ in cols) + " | | |")
    lines.append("| scorer on real images | | " + " | ".join(
        pct(ceiling.get(k, ceiling.get(k.split("_", 1)[-1]))) for k, _ in cols) + " | | |")
    not_scored = "; ".join(f"{a} (its reader reads {v:.0%} of real images right, below 90%)" for a, v in dropped.items())
    (out / "table.md").write_text(f"""# Leakage benchmark (miniature of the paper's Tab. 3.1)

{context['heldout']} held-out identities x {context['samples']} samples per run; tiny preset, {context['steps']} training
steps per run on {context['training_identities']} identities, the same data and seed for every run. Prompts ask for a
background, arms and facing that the references do not show. Identification: the sample's colours match
its own identity best among the held-out ones. Prompt X: the sample shows the prompt's X. Copies ref X:
it shows a reference's X instead. Chance: a uniform guess (identity: against every other held-out
identity; copying: the share of the palette the method's references show, so it depends on how many
it takes, K). Scorer on real images: the same scorers on the held-out images themselves (the ceiling; for
a scene attribute, the reader's accuracy).{' Not scored: ' + not_scored + '.' if dropped else ''}

{chr(10).join(lines)}
""")


def chance_row(results: dict, attributes: list[str]) -> dict:
    """The chance rate of every column (identity: the mean over runs of each run's all-pairs rate).
    Copying's depends on how many references a method takes (K; each row has its own as
    chance_copying_X): {"K=2": rate, "K=1": rate}."""
    first = next(iter(results.values()))
    out = {"identification": first["chance_identification"]}
    for k, _ in COLUMNS[1:]:
        out[k] = float(np.mean([r[f"chance_{k}"] for r in results.values()]))
    for att in attributes:
        out[f"adherence_{att}"] = first[f"chance_adherence_{att}"]
        out[f"copying_{att}"] = {f"K={references_for(name.rpartition('-')[0])}": r[f"chance_copying_{att}"]
                                 for name, r in results.items()}
    return out


def plot(out: Path, rows: list[dict]) -> None:
    """scatter.png: identification against prompt adherence, one point per method, -a and -b in two
    colours (the paper's Fig. 9 plots identity against text scores the same way)."""
    from eval.plots import scatter
    series = [(f"setting {s}", [r["adherence"] for r in rows if r["setting"] == s],
               [r["identification"] for r in rows if r["setting"] == s],
               [r["method"] for r in rows if r["setting"] == s]) for s in SETTINGS]
    scatter(out / "scatter.png", [s for s in series if s[1]], xlabel="prompt adherence (mean over scored scene attributes)",
            ylabel="identification accuracy", title="Identity against prompt adherence, per method and setting")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run_benchmark(args)
    except LeakageError as e:
        print(f"leakage: error: {e}", file=sys.stderr)
        return 128 + e.signum if isinstance(e, Stopped) and e.signum else 1


def run_benchmark(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_root, heldout_root = make_data(out, args)
    plan = sampling_plan(heldout_root, args.seed)
    ceiling = ceilings(heldout_root, plan, args.seed)
    from data.synthetic.scene_score import READERS, reliable
    attributes = reliable({k: ceiling[k] for k in READERS})
    dropped = {k: ceiling[k] for k in READERS if k not in attributes}
    print("leakage: scorers on real held-out images: " + ", ".join(f"{k} {ceiling[k]:.0%}" for k in
          (*IDENTITY_SCORES, *READERS)) + (f"; not scored: {', '.join(dropped)}" if dropped else ""), file=sys.stderr)
    results = {}
    for method in args.methods:
        for setting in args.settings:
            run = out / "runs" / run_name(method, setting)
            record = train_run(run, method, setting, train_root, args)
            results[run.name] = {**evaluate_run(run, method, plan, attributes, args), **record}
    rows = table_rows(results, attributes)
    from data.synthetic.identity_score import load_identities
    context = {"heldout": len(plan), "samples": args.samples, "steps": args.steps,
               "training_identities": len(load_identities(train_root)), "seed": args.seed, "guidance": args.guidance,
               "sampler": args.sampler, "sample_steps": args.sample_steps,
               "total_minutes": round((time.perf_counter() - start) / 60, 2)}
    write_table(out, rows, chance_row(results, attributes), ceiling, attributes, dropped, context)
    plot(out, rows)
    print((out / "table.md").read_text(), file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
