"""The validation grid train.py writes every --val-every steps: held-out references and samples."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageDraw

from common.images import open_image
from data.annotations import read_annotations
from data.dataset import figure_on_white
from diffusion.sd15 import StableDiffusion
from retrinet import ReferenceUNet, generate


def validation_records(root: Path, count: int) -> list[dict]:
    """The first `count` samples of an annotations.jsonl that have references, in file order."""
    records = [rec for _, rec in read_annotations(root)]
    by_id = {r["id"]: r for r in records}
    return [r for r in records if any(s in by_id and s != r["id"] for s in r["similar"])][:count]


@torch.no_grad()
def sample_grid(sd: StableDiffusion, model: ReferenceUNet, root: Path, records: list[dict], *, k: int, size: int,
                ref_size: int, steps: int, guidance: float, ref_guidance: float | None, seed: int,
                ref_background: str = "keep", skip: Callable[[dict, str], None] | None = None) -> Image.Image | None:
    """One row per record: its K references (figure on white through their masks when
    `ref_background` is "white", as training saw them), a sample without a prompt and one with the
    record's prompt (fixed seeds, DDIM), then the target itself. A record whose target, reference
    or mask cannot be read (the loader skips such samples too) is left out, and `skip(record,
    reason)` told, the reason naming the file; None when no record is left."""
    by_id = {r["id"]: r for _, r in read_annotations(root)}
    was_training = model.training
    model.eval()
    rows = []
    try:
        for i, rec in enumerate(records):
            try:
                ref_ids = [s for s in rec["similar"] if s in by_id and s != rec["id"]][:k]
                refs = [open_image(root / by_id[s]["image"], "reference") for s in ref_ids]
                if ref_background == "white":
                    refs = [figure_on_white(im, root / by_id[s]["mask"]) for im, s in zip(refs, ref_ids)]
                target = open_image(root / rec["image"], "target").resize((size, size), Image.BILINEAR)
            except ValueError as e:  # open_image / the mask: one line naming the file
                if skip is not None:
                    skip(rec, str(e))
                continue
            row = [im.resize((size, size), Image.BILINEAR) for im in refs]
            row += [Image.new("RGB", (size, size), "white")] * (k - len(refs))
            for prompt in ("", rec["prompt"]):
                images, _ = generate(sd, prompt, model=model, references=refs, concepts=["figure"], num=1,
                                     steps=steps, guidance=guidance, ref_guidance=ref_guidance, sampler="ddim",
                                     seed=seed + i, height=size, width=size, ref_size=ref_size)
                row.append(Image.fromarray(images[0].numpy()))
            row.append(target)
            rows.append(row)
    finally:
        model.train(was_training)
    if not rows:
        return None
    cell, pad = max(size, 64), 4
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * (cell + pad) + pad, len(rows) * (cell + pad) + pad + 14), "white")
    draw = ImageDraw.Draw(grid)
    labels = [f"ref {j + 1}" for j in range(k)] + ["no prompt", "prompt", "target"]
    for j, label in enumerate(labels):
        draw.text((pad + j * (cell + pad), 2), label, fill="black")
    for r, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im.resize((cell, cell), Image.NEAREST), (pad + j * (cell + pad), 14 + pad + r * (cell + pad)))
    return grid
