"""Identification accuracy against training minutes: every checkpoint of a finished demo run,
sampled and scored as the demo samples and scores its last one.

    python -m experiments.demo --out demo-30 --minutes 30 --train-args --keep 0 --save-every 130
    python bench/demo_curve.py --out demo-30 --every 5 [--demo-args --ref-guidance 3]

Training minutes of a checkpoint are summed from run/log.jsonl (each record's steps over its
samples per second), so the time spent writing checkpoints and validation grids is left out. The
points are checkpoints of one run whose learning-rate cosine spans the whole run: a shorter run
anneals earlier and scores somewhat higher at its end than this run does at the same minute.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def minutes_at(log: Path, batch: int, step: int) -> float:
    """Training minutes up to `step`, from log.jsonl's records (steps over samples per second); a
    step past the last record (a run stopped by its time limit) at the last record's rate."""
    total, last, rate = 0.0, 0, None
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if rec["step"] > step:
            break
        rate = rec.get("samples_per_s") or rate
        if rate:
            total += (rec["step"] - last) * batch / rate / 60
        last = rec["step"]
    return total + ((step - last) * batch / rate / 60 if rate else 0.0)


def main(argv=None) -> int:
    from data.synthetic.identity_score import score
    from experiments import demo
    from training.checkpoints import checkpoint_dirs, read_state
    from training.presets import load_run
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="a demo's --out")
    ap.add_argument("--every", type=int, default=1, help="score every N-th checkpoint")
    ap.add_argument("--demo-args", nargs=argparse.REMAINDER, default=[],
                    help="experiments.demo sampling arguments (--ref-guidance, --sampler, --sample-steps, ...)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    run = out / "run"
    ckpts = checkpoint_dirs(run)
    if not ckpts:
        print(f"demo_curve: no checkpoint in {run / 'checkpoints'}", file=sys.stderr)
        return 2
    demo_args = demo.parse_args(["--out", str(out), *args.demo_args])
    heldout = demo.heldout_references(out / "data-heldout")
    rows = []
    chosen = ckpts[args.every - 1::args.every]
    if ckpts[-1] not in chosen:
        chosen.append(ckpts[-1])
    for ckpt in chosen:
        state = read_state(ckpt)
        saved = json.loads(state["args"])
        step = state["step"]
        minutes = minutes_at(run / "log.jsonl", saved["batch_size"], step)
        sd, model, file = load_run(run, ckpt)
        images, identities = demo.sample_heldout(sd, model, heldout, demo_args)
        r = score(images, identities, seed=demo_args.seed)
        row = {"step": step, "minutes": round(minutes, 2), "model_file": file.name,
               "ref_guidance": demo_args.ref_guidance,
               **{k: r[k] for k in ("identification", "exact", "hair", "top", "bottom")},
               "p_identification": r["p_identification"], "chance_identification": r["chance_identification"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "curve.json").write_text(json.dumps(rows, indent=1))
    print("| step | minutes | identification | exact | hair | top | bottom | p (identification) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['minutes']:.1f} | {r['identification']:.1%} | {r['exact']:.1%} | {r['hair']:.1%} | "
              f"{r['top']:.1%} | {r['bottom']:.1%} | {r['p_identification']:.2g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
