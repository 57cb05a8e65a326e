"""The training objective (paper Eq. 3 as docs/design.md section 5 defines it), the per-sample
randomness behind it, and the learning-rate schedule.

Randomness that shapes a sample's loss (its timestep, noise and reference dropout) is drawn from a
generator seeded by (seed, epoch, dataset index), like the loader's own augmentations. A sample's
loss therefore does not depend on which process or micro-batch it lands in: N processes equal one
process with the same global batch, and a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from diffusion.schedule import NoiseSchedule
from diffusion.sd15 import StableDiffusion


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample's timestep, noise and reference dropout in one epoch."""
    state = np.random.SeedSequence([seed, epoch, index, 7]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class Conditioning:
    """Prompt and concept-text embeddings from the frozen text encoder; the three concept texts
    ("figure", "face", "clothes") are embedded once."""

    def __init__(self, sd: StableDiffusion):
        self.sd, self.cache = sd, {}

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = sorted({t for t in texts if t not in self.cache})
        if missing and len(self.cache) < 64:
            for t, e in zip(missing, self.sd.encode_prompts(missing)):
                self.cache[t] = e
        if all(t in self.cache for t in texts):
            return torch.stack([self.cache[t] for t in texts])
        return self.sd.encode_prompts(texts)


def diffusion_loss(model, sd: StableDiffusion, schedule: NoiseSchedule, text: Conditioning, batch: dict,
                   *, epoch: int, seed: int, face_weight: float, ref_drop: float) -> torch.Tensor:
    """Eq. 3 as docs/design.md section 5 defines it, per sample then averaged over the batch:
        L_i = sum_pixels valid * (1 + face_weight * face) * mean_c (eps - eps_theta)^2 / sum_pixels valid
    with the masks area-resized to latent resolution. A v-prediction schedule (the tiny preset) puts
    its target v in place of eps (`NoiseSchedule.target`). Runs under the caller's autocast."""
    device = sd.device
    gens = [sample_generator(seed, epoch, int(i)) for i in batch["index"]]
    b, k = batch["refs"].shape[:2]
    images = batch["image"].to(device, non_blocking=True)
    refs = batch["refs"].to(device, non_blocking=True)
    with torch.no_grad():
        target, ref_post = sd.vae.encode(images), sd.vae.encode(refs.flatten(0, 1))
        shape, ref_shape = target.mean.shape[1:], (k, *ref_post.mean.shape[1:])
        t = torch.cat([torch.randint(0, schedule.num_train_timesteps, (1,), generator=g) for g in gens]).to(device)
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        drop = torch.cat([torch.rand(1, generator=g) for g in gens]).to(device) < ref_drop
        # Posterior samples (PixelSpace's posterior has std 0: its "latents" are exactly the pixels).
        vae_noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        ref_noise = torch.stack([torch.randn(ref_shape, generator=g) for g in gens]).to(device)
        x0 = (target.mean.float() + target.std.float() * vae_noise) * sd.latent_scale
        ref_latents = (ref_post.mean.float().unflatten(0, (b, k))
                       + ref_post.std.float().unflatten(0, (b, k)) * ref_noise) * sd.latent_scale
        x_t = schedule.add_noise(x0, noise, t)
        context = text(batch["prompt"])
        ref_context = text([c for cs in batch["concepts"] for c in cs]).unflatten(0, (b, k))
    null = getattr(getattr(model, "module", model).config, "null_reference", False)
    out = model(x_t, t, context, ref_latents, ref_context, batch["ref_mask"].to(device),
                ref_drop=drop if null else None)
    size = x0.shape[-2:]
    valid = F.interpolate(batch["valid"].to(device).float(), size=size, mode="area")
    face = F.interpolate(batch["face"].to(device).float(), size=size, mode="area")
    err = (out.float() - schedule.target(x0, noise, t)).pow(2).mean(dim=1, keepdim=True)
    per_sample = (err * valid * (1 + face_weight * face)).sum((1, 2, 3)) / valid.sum((1, 2, 3)).clamp_min(1e-6)
    return per_sample.mean()


def lr_at(step: int, *, lr: float, warmup: int, restart_every: int, min_lr: float = 0.0) -> float:
    """Linear warm-up, then a cosine from `lr` to `min_lr` restarted every `restart_every` steps
    at the full rate (Supp. A.4: restarts "without decay")."""
    if step < warmup:
        return lr * (step + 1) / warmup
    phase = ((step - warmup) % restart_every) / restart_every
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * phase))
