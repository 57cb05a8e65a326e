"""Per-generation scores and the per-model table of the paper's Tab. 3, written as Markdown, CSV and
JSON beside the scatter plots.

Columns (one row per model, means over its generations):
    VQA, CLIP-I, CLIP-T                           the metric means
    VQA_CLIP-I, VQA_CLIP-T, CLIP-I_CLIP-T         SWD of the pair, mean_i(a_i * b_i) (Sec. 4, Eq. 1)
each SWD with its Cauchy–Schwarz bound sqrt(mean(a^2) mean(b^2)) beside it (Eq. 2).

A generation counts when its image and all its references could be read; it counts in the VQA
columns (VQA, VQA_CLIP-I, VQA_CLIP-T) only when its image has an answer to every question and at
least one reference has too (references lacking answers are left out of its VQA score). Everything
left out is counted in the report.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .manifest import Generation
from .metrics import clip_i, clip_t, swd, vqa_score
from .plots import scatter

METRICS = ["VQA", "CLIP-I", "CLIP-T"]
PAIRS = {"VQA_CLIP-I": ("CLIP-I", "VQA"), "VQA_CLIP-T": ("CLIP-T", "VQA"), "CLIP-I_CLIP-T": ("CLIP-I", "CLIP-T")}
TABLE = METRICS + list(PAIRS)   # the paper's Tab. 3 columns, in its order
COUNTS = ["generations", "scored", "unreadable", "with_vqa", "without_vqa"]


@dataclass
class Scored:
    gen: Generation
    clip_i: float
    clip_t: float
    vqa: float | None      # None: no answers for the image or for any of its references


def _stack_refs(rows: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged lists of (..., D) tensors -> padded (N, K, ..., D) and mask (N, K)."""
    k = max(len(r) for r in rows)
    like = rows[0][0]
    out = like.new_zeros(len(rows), k, *like.shape)
    mask = torch.zeros(len(rows), k, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.stack(r)
        mask[i, :len(r)] = True
    return out, mask


def answer_set(answers: dict, image: Path, questions: list[str]) -> list[str] | None:
    """The image's answers to `questions`, in order; None unless every question has one."""
    got = answers.get(image, {})
    return [got[q] for q in questions] if questions and all(q in got for q in questions) else None


def score_generations(gens: list[Generation], image_feats: dict, text_feats: dict, answers: dict,
                      questions: list[str]) -> list[Scored]:
    """CLIP-I, CLIP-T and VQA of every generation whose image and references all have features."""
    ok = [g for g in gens if g.image in image_feats and all(r in image_feats for r in g.refs)]
    if not ok:
        return []
    images = torch.stack([image_feats[g.image] for g in ok])
    refs, mask = _stack_refs([[image_feats[r] for r in g.refs] for g in ok])
    ci = clip_i(images, refs, mask).tolist()
    ct = clip_t(images, torch.stack([text_feats[g.prompt] for g in ok])).tolist()
    vqa = [None] * len(ok)
    rows, where = [], []
    for i, g in enumerate(ok):
        own = answer_set(answers, g.image, questions)
        theirs = [a for a in (answer_set(answers, r, questions) for r in g.refs) if a is not None]
        if own is not None and theirs:
            rows.append((own, theirs))
            where.append(i)
    if rows:
        features = lambda texts: torch.stack([text_feats[t] for t in texts])  # noqa: E731  (Q, D)
        own = torch.stack([features(a) for a, _ in rows])
        theirs, ref_mask = _stack_refs([[features(a) for a in t] for _, t in rows])
        for i, v in zip(where, vqa_score(own, theirs, ref_mask).tolist()):
            vqa[i] = v
    return [Scored(g, a, b, c) for g, a, b, c in zip(ok, ci, ct, vqa)]


def summarize(gens: list[Generation], scored: list[Scored]) -> list[dict]:
    """One row per model (in order of first appearance): counts, the Tab. 3 columns, SWD bounds."""
    models = list(dict.fromkeys(g.model for g in gens))
    rows = []
    for m in models:
        mine = [s for s in scored if s.gen.model == m]
        with_vqa = [s for s in mine if s.vqa is not None]
        n_total = sum(g.model == m for g in gens)
        row = {"model": m, "generations": n_total, "scored": len(mine), "unreadable": n_total - len(mine),
               "with_vqa": len(with_vqa), "without_vqa": len(mine) - len(with_vqa)}
        cols = {"CLIP-I": [s.clip_i for s in mine], "CLIP-T": [s.clip_t for s in mine], "VQA": [s.vqa for s in with_vqa]}
        vqa_cols = {"CLIP-I": [s.clip_i for s in with_vqa], "CLIP-T": [s.clip_t for s in with_vqa],
                    "VQA": cols["VQA"]}
        for name in METRICS:
            row[name] = sum(cols[name]) / len(cols[name]) if cols[name] else None
        for name, (a, b) in PAIRS.items():
            source = vqa_cols if "VQA" in (a, b) else cols
            value = swd(source[a], source[b]) if source[a] else None
            row[name] = value.value if value else None
            row[name + " bound"] = value.bound if value else None
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ writing

def _fmt(v, digits=4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(rows: list[dict], info: dict) -> str:
    lines = ["# Evaluation (RetriBooru Tab. 3 columns)", "",
             "| Model | " + " | ".join(f"{c}↑" for c in TABLE) + " |",
             "|---|" + "---:|" * len(TABLE)]
    lines += ["| " + " | ".join([r["model"]] + [_fmt(r[c]) for c in TABLE]) + " |" for r in rows]
    lines += ["", "SWD columns: mean over generations of the product of the two scores; bounds: "
              "sqrt(mean(a²) · mean(b²)) (Cauchy–Schwarz), reached when every generation has the same balance.", "",
              "| Model | generations | scored | unreadable | with VQA | without VQA | "
              + " | ".join(f"{c} ≤" for c in PAIRS) + " |",
              "|---|" + "---:|" * (5 + len(PAIRS))]
    lines += ["| " + " | ".join([r["model"]] + [str(r[c]) for c in COUNTS] + [_fmt(r[c + " bound"]) for c in PAIRS])
              + " |" for r in rows]
    lines += ["", f"VQA questions ({len(info['questions'])}):"] + [f"- {q}" for q in info["questions"]]
    lines += ["", f"References without answers to every question (left out of VQA scores): "
              f"{len(info['references_without_answers'])}"]
    lines += [f"Texts truncated to CLIP's 77 tokens: {info['cache']['texts_truncated']}"]
    if info["unreadable"]:
        lines += ["", f"Unreadable images ({len(info['unreadable'])}; their generations are not scored):"]
        lines += [f"- {p}: {why}" for p, why in info["unreadable"].items()]
    c = info["cache"]
    lines += ["", f"CLIP {info['clip']['weights']} (identity {info['clip']['identity'] or 'none: no cache'}, {info['clip']['precision']}); "
              f"images embedded {c['images_embedded']}, from cache {c['images_cached']}; "
              f"texts embedded {c['texts_embedded']}, from cache {c['texts_cached']}.", ""]
    return "\n".join(lines)


def write_outputs(out: Path, rows: list[dict], scored: list[Scored], info: dict) -> dict[str, Path]:
    """table.md, table.csv, results.json, per_image.csv and the two scatter plots, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in ("table.md", "table.csv", "results.json", "per_image.csv",
                                            "clip-i_clip-t.png", "clip-i_vqa.png")}
    files["table.md"].write_text(markdown(rows, info), encoding="utf-8")
    columns = ["model"] + COUNTS + TABLE + [c + " bound" for c in PAIRS]
    with open(files["table.csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows([[("" if r[c] is None else r[c]) for c in columns] for r in rows])
    json_info = {**info, "unreadable": {str(p): why for p, why in info["unreadable"].items()},
                 "references_without_answers": [str(p) for p in info["references_without_answers"]]}
    files["results.json"].write_text(json.dumps({"models": rows, **json_info}, indent=2, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
    with open(files["per_image.csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "model", "character", "prompt", "seed", "sample", "CLIP-I", "CLIP-T", "VQA"])
        for s in scored:
            g = s.gen
            w.writerow([g.image, g.model, g.character, g.prompt, g.seed, g.sample, s.clip_i, s.clip_t,
                        "" if s.vqa is None else s.vqa])
    models = [r["model"] for r in rows]
    scatter(files["clip-i_clip-t.png"],
            [(m, [s.clip_i for s in scored if s.gen.model == m], [s.clip_t for s in scored if s.gen.model == m])
             for m in models], xlabel="CLIP-I", ylabel="CLIP-T", title="CLIP-I vs CLIP-T per generation")
    with_vqa = [s for s in scored if s.vqa is not None]
    scatter(files["clip-i_vqa.png"],
            [(m, [s.clip_i for s in with_vqa if s.gen.model == m], [s.vqa for s in with_vqa if s.gen.model == m])
             for m in models], xlabel="CLIP-I", ylabel="VQA score", title="CLIP-I vs VQA per generation")
    return files
