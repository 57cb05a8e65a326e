"""How well does a text-to-image base draw what its prompts name? The tiny stack's quality scores
(`pretrain.py`, `make base`): samples from full prompts of held-out scenes (colour combinations the
base never saw in training), read by the project's own scorers, against the same scorers on the real
images of those scenes (the ceiling).

* hair, top and bottom colours: data.synthetic.identity_score.dominant_colours;
* background and arms: data.synthetic.scene_score (facing is not scored: its reader is not reliable);
* flatness: the standard deviation of the border pixels (every training image has a flat
  background; noise shows here).
"""
from __future__ import annotations

import numpy as np
import torch

from data.synthetic import identity_score, scene_score
from diffusion.sd15 import text_to_image
from training.pretrain import Drawn, draw_scenes, prompt_of, to_model_pixels


def read_scene(image) -> dict:
    """What the project's scorers read in an image (uint8 (H, W, 3)): hair, top and bottom colours
    (data.synthetic.identity_score), background and arms (data.synthetic.scene_score), and the background's flatness
    (the standard deviation of the border pixels, RGB units)."""
    a = np.asarray(image)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]).astype(np.float32)
    return {**identity_score.dominant_colours(a), "background": scene_score.background(a),
            "arms": scene_score.arms(a), "border_std": float(border.std(0).mean())}


def _agreement(reads: list[dict], shown: list[Drawn]) -> dict:
    """The share of images whose read attribute equals the scene's, per attribute; mean flatness."""
    out = {att: float(np.mean([r[att] == getattr(d, att) for r, d in zip(reads, shown)]))
           for att in ("hair", "top", "bottom", "background", "arms")}
    out["border_std"] = float(np.mean([r["border_std"] for r in reads]))
    return out


@torch.no_grad()
def score_base(sd, n: int = 64, seed: int = 2, guidance: float = 4.0, steps: int = 25, sampler: str = "ddim",
               resolution: int = 24) -> tuple[dict, torch.Tensor]:
    """The base `sd` sampled from full prompts of `n` held-out scenes, one sample each, read by the
    project's scorers; beside the same scorers on the real images at the same resolution (the
    ceiling), and each attribute's ratio sample / real. Returns (scores, uint8 (n, H, W, 3) samples)."""
    images, shown = draw_scenes(n, seed, held_out=True)
    real = to_model_pixels(images, resolution).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    real_reads = [read_scene(im.permute(1, 2, 0).numpy()) for im in real]
    samples = torch.cat([text_to_image(sd, prompt_of(d), num=1, steps=steps, guidance=guidance, sampler=sampler,
                                       seed=seed * 100_000 + i, height=resolution, width=resolution)
                         for i, d in enumerate(shown)])
    sample_reads = [read_scene(im.numpy()) for im in samples]
    real_score, sample_score = _agreement(real_reads, shown), _agreement(sample_reads, shown)
    ratio = {att: sample_score[att] / real_score[att] if real_score[att] else None
             for att in ("hair", "top", "bottom", "background", "arms")}
    return {"n": n, "guidance": guidance, "steps": steps, "sampler": sampler, "samples": sample_score,
            "real": real_score, "ratio": ratio}, samples
