"""What the demo and the leakage benchmark share: their data, the training recipe they add to train.py's
tiny preset, and how held-out images are read at the sampling resolution."""
from __future__ import annotations

import sys
from pathlib import Path

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"
# What every run adds to train.py's tiny preset, chosen by the measurements in BENCHMARKS.md ("make demo:
# learning per CPU-minute"): a weight average. An experiment's --train-args come after it, so they override it.
TRAIN_RECIPE = ["--ema", "0.995"]
DEFAULTS = dict(identities=96, images_per_identity=8, heldout=16, size=48, figure_scale=(0.8, 0.95), samples=4,
                sample_steps=25, sampler="ddim")
HELDOUT_IMAGES = 4      # images per held-out identity (with the scenes' two arm states, two of four share theirs)
HELDOUT_SEED = 1000     # the held-out set's seed is the training set's plus this: other identities


def make_datasets(out: Path, identities: int, images_per_identity: int, heldout: int, size: int, seed: int,
                  message: str, **options) -> tuple[Path, Path]:
    """out/data-train and out/data-heldout (data.synthetic.generate, clean images only; `options` go to
    it), each generated unless it is there already. `message` is printed before generating one, with
    {name}, {n} and {per} filled in (folder name, identities, images per identity)."""
    from data.synthetic import generate
    roots = (out / "data-train", out / "data-heldout")
    for root, n, per, s in [(roots[0], identities, images_per_identity, seed),
                            (roots[1], heldout, HELDOUT_IMAGES, seed + HELDOUT_SEED)]:
        if not (root / "annotations.jsonl").is_file():
            print(message.format(name=root.name, n=n, per=per), file=sys.stderr, flush=True)
            generate(root, identities=n, images_per_identity=per, size=size, seed=s, noise_fraction=0.0, **options)
    return roots


def train_command(*options: str, resume: bool, train_args: list[str]) -> list[str]:
    """train.py --preset tiny with `options`, then TRAIN_RECIPE, --resume when asked, and `train_args`.
    train.py runs as its own process, as a user would run it (an entry point imports no other)."""
    return [sys.executable, str(TRAIN_PY), "--preset", "tiny", *options, *TRAIN_RECIPE,
            *(["--resume"] if resume else []), *train_args]


def resolutions() -> tuple[int, int]:
    """The tiny preset's sampling resolution and reference resolution."""
    from training.presets import PRESETS
    return PRESETS["tiny"]["resolution"], PRESETS["tiny"]["ref_resolution"]


def real_image(path: Path):
    """A held-out image at the sampling resolution, fitted as training fits it (float (3, H, W) in
    [-1, 1]): what the scorers read on real images, their ceiling."""
    from common.images import fit_and_pad, open_image
    return fit_and_pad(open_image(path), resolutions()[0])[0]
