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
from retrinet import ReferenceUNet


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


def snr_weight(schedule: NoiseSchedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting
    Strategy", 2023): the x_0-error weight min(SNR_t, gamma), SNR_t = acp_t / (1 - acp_t), written for
    the prediction's own error, which is SNR_t (eps) or SNR_t + 1 (v) times the x_0 error. Low-noise
    timesteps, whose small details would otherwise dominate the gradient, are weighted down."""
    acp = schedule.alphas_cumprod.to(t.device)[t].double()
    snr = acp / (1 - acp)
    return (snr.clamp(max=gamma) / (snr + 1 if schedule.prediction == "v_prediction" else snr)).float()


def diffusion_loss(model: ReferenceUNet, sd: StableDiffusion, schedule: NoiseSchedule, text: Conditioning,
                   batch: dict, *, epoch: int, seed: int, face_weight: float, ref_drop: float,
                   snr_gamma: float = 0.0, loss_fn=None, forward=None) -> torch.Tensor:
    """Eq. 3 as docs/design.md section 5 defines it, per sample then averaged over the batch:
        L_i = sum_pixels valid * (1 + face_weight * face) * mean_c (eps - eps_theta)^2 / sum_pixels valid
    with the masks area-resized to latent resolution. A v-prediction schedule (the tiny preset) puts
    its target v in place of eps (`NoiseSchedule.target`). `snr_gamma` > 0 weights each L_i by
    `snr_weight` (not in the paper; train.py --snr-gamma). How the references enter is the method's
    own (`model.training_inputs`). Runs under the caller's autocast.

    Two halves: `draw_step` (the sample's randomness and the frozen encoders, no gradients) and
    `denoising_loss` (the model and the loss, tensors only: what train.py --compile compiles; pass
    the compiled function as `loss_fn`). `forward` runs the model's forward pass when it is not
    `model` itself (the DistributedDataParallel wrapper of it)."""
    step = draw_step(model, sd, schedule, text, batch, epoch=epoch, seed=seed, face_weight=face_weight,
                     ref_drop=ref_drop, snr_gamma=snr_gamma)
    return (loss_fn or denoising_loss)(forward or model, **step)


@torch.no_grad()
def draw_step(model: ReferenceUNet, sd: StableDiffusion, schedule: NoiseSchedule, text: Conditioning, batch: dict, *, epoch: int,
              seed: int, face_weight: float, ref_drop: float, snr_gamma: float = 0.0) -> dict:
    """The no-gradient half of `diffusion_loss`: each sample's timestep, noise and dropout draw, the
    VAE and text encodings, the noised input x_t, the regression target and the loss weights, and
    the method's inputs; the keyword arguments of `denoising_loss`."""
    device = sd.device
    gens = [sample_generator(seed, epoch, int(i)) for i in batch["index"]]
    images = batch["image"].to(device, non_blocking=True)
    target = sd.vae.encode(images)
    shape = target.mean.shape[1:]
    t = torch.cat([torch.randint(0, schedule.num_train_timesteps, (1,), generator=g) for g in gens]).to(device)
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    u = torch.cat([torch.rand(1, generator=g) for g in gens]).to(device)  # each sample's dropout draw
    # Posterior samples (PixelSpace's posterior has std 0: its "latents" are exactly the pixels).
    vae_noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    x0 = (target.mean.float() + target.std.float() * vae_noise) * sd.latent_scale
    inputs = model.training_inputs(sd, text, batch, gens, u, ref_drop)
    size = x0.shape[-2:]
    valid = F.interpolate(batch["valid"].to(device).float(), size=size, mode="area")
    face = F.interpolate(batch["face"].to(device).float(), size=size, mode="area")
    return dict(x_t=schedule.add_noise(x0, noise, t), t=t, inputs=inputs, target=schedule.target(x0, noise, t),
                valid=valid, face_factor=1 + face_weight * face,
                sample_weight=snr_weight(schedule, t, snr_gamma) if snr_gamma > 0 else None)


def denoising_loss(model, x_t, t, inputs: dict, target, valid, face_factor, sample_weight=None) -> torch.Tensor:
    """The gradient half of `diffusion_loss`: the model's prediction and the masked, face-weighted
    squared error, per sample, then averaged. No Python branch on tensor values, so
    torch.compile(fullgraph=True) takes it whole, forward and backward."""
    out = model(x_t, t, **inputs)
    err = (out.float() - target).pow(2).mean(dim=1, keepdim=True)
    per_sample = (err * valid * face_factor).sum((1, 2, 3)) / valid.sum((1, 2, 3)).clamp_min(1e-6)
    if sample_weight is not None:
        per_sample = per_sample * sample_weight
    return per_sample.mean()


SCHEDULES = ("cosine-restarts", "constant")  # train.py --schedule


def lr_at(step: int, *, lr: float, warmup: int, restart_every: int, min_lr: float = 0.0,
          schedule: str = "cosine-restarts") -> float:
    """The learning rate of update `step` (0-based).

    "cosine-restarts" (RetriNet): linear warm-up, then a cosine from `lr` to `min_lr` restarted every
    `restart_every` steps at the full rate (Supp. A.4: restarts "without decay").
    "constant" (the baselines, as diffusers' train_controlnet.py and IP-Adapter's tutorial_train.py):
    `lr` throughout, after a linear warm-up when `warmup` > 0; exactly diffusers'
    get_scheduler("constant_with_warmup") as those scripts step it, whose first update runs at
    lr * 0 / warmup (the cosine's warm-up starts at lr / warmup); `restart_every` and `min_lr` do not
    apply."""
    if schedule == "constant":
        return lr * (step / warmup) if step < warmup else lr
    if schedule != "cosine-restarts":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup:
        return lr * (step + 1) / warmup
    phase = ((step - warmup) % restart_every) / restart_every
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * phase))
