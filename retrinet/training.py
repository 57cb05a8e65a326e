"""The pieces of RetriNet training that train.py strings together (paper Sec. 5.2, Supp. A.4;
DESIGN.md sections 3-5): the presets, the objective (Eq. 3), per-sample randomness, the learning-rate
schedule, the resumable batch stream, checkpoints and the validation grid.

Randomness that shapes a sample's loss (its timestep, noise and reference dropout) is drawn from a
generator seeded by (seed, epoch, dataset index), like the loader's own augmentations. A sample's
loss therefore does not depend on which process or micro-batch it lands in: N processes equal one
process with the same global batch, and a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler

from clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from data.dataset import RetriBooruDataset, TaskBatchSampler, collate
from diffusion.schedule import NoiseSchedule
from diffusion.sd15 import StableDiffusion, text_to_image
from unet import UNet, UNetConfig
from vae import PixelSpace, PixelSpaceConfig
from .model import RetriUNet
from .sampling import ReferenceDenoiser

# Defaults per preset; a command-line value given explicitly wins. sd15 follows the paper (Sec. 5.2:
# 384 px, batch 1, 8 accumulation steps); its lr and restart period were lost in extraction, so
# they are ControlNet's lr and the ablation length. tiny is calibrated to learn identity colours
# on the synthetic dataset within minutes on two CPU cores.
PRESETS = {
    "sd15": dict(heads=8, resolution=384, batch_size=1, grad_accum=8, lr=1e-5, restart_every=9000, warmup=0,
                 max_steps=9000, val_steps=25, workers=4),
    "tiny": dict(heads=1, resolution=24, ref_resolution=16, batch_size=32, grad_accum=1, lr=1e-3, restart_every=100_000, warmup=50,
                 max_steps=1500, val_steps=25, workers=0),
}


def tiny_configs() -> dict:
    """The tiny preset: SD's architecture shrunk (two down-sampling levels, 32-64 channels, one
    transformer per attention level, 4 GroupNorm groups, a 2-layer 64-wide CLIP text tower),
    diffusing pixels and predicting v.
    Attention heads are 32 wide: narrower heads make the CPU's attention kernels several times
    slower (measured: 8 heads of 4 channels, 0.71 s; 1 head of 32, 0.09 s, same FLOPs)."""
    # 4 GroupNorm groups, not LDM's 32: on 32 channels, 32 groups are an instance norm, which takes
    # each channel's mean over the image away. In RetriNet's norm_kv that mean is a reference's
    # colours, the one thing that passes a near-uniform attention (as it is at the start), so with
    # 32 groups the references did not count (measured after 500 steps: the same x_0 error with
    # real, wrong or null references; with 4 groups they count, and the held-out x_0 error at
    # t = 300 falls from 0.20 to 0.17).
    unet = UNetConfig(in_channels=3, out_channels=3, model_channels=32, attention_resolutions=(4,),
                      num_res_blocks=1, channel_mult=(1, 1, 2), num_heads=2, context_dim=64,
                      use_linear_in_transformer=True, norm_groups=4)
    text = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          projection_dim=64)
    # SD's schedule keeps sqrt(0.0047) of the image at t = 999: in pixel space that leak of the mean
    # colour, absent from the pure noise sampling starts from, casts every sample's colours. beta_end
    # 0.03 leaves sqrt(5.7e-6). So close to pure noise an eps model cannot give x_0 (its error is
    # divided by sqrt(acp_t) < 0.03 for the last 30% of timesteps): the tiny U-Net predicts v.
    schedule = NoiseSchedule(beta_end=0.03, prediction="v_prediction")
    return {"unet": unet, "vae": PixelSpaceConfig(), "text_encoder": text, "schedule": schedule}


def build_tiny(seed: int) -> StableDiffusion:
    """A fresh tiny SD: its U-Net trains from scratch; its random text encoder stays frozen (it only
    has to tell prompts apart)."""
    cfg = tiny_configs()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(cfg["text_encoder"])
        unet = UNet(cfg["unet"])
    return StableDiffusion(unet, PixelSpace(cfg["vae"]), text_encoder, CLIPTokenizer.default(), cfg["schedule"])


def save_base(sd: StableDiffusion, out: Path) -> tuple[Path, Path]:
    """The tiny base as an SD single file (U-Net + text encoder, no VAE) and the `--config` JSON
    that sample.py needs to build it."""
    state = {f"model.diffusion_model.{k}": v for k, v in sd.unet.state_dict().items()}
    state.update({f"cond_stage_model.transformer.{k}": v for k, v in sd.text_encoder.state_dict().items()})
    weights, configs = out / "base.safetensors", out / "base-config.json"
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(weights))
    cfg = tiny_configs()
    configs.write_text(json.dumps({"unet": dataclasses.asdict(cfg["unet"]), "vae": "pixel",
                                   "text_encoder": dataclasses.asdict(cfg["text_encoder"]),
                                   "schedule": dataclasses.asdict(sd.schedule)}, indent=1))
    return weights, configs


def frozen_to(sd: StableDiffusion, model: RetriUNet, dtype: torch.dtype) -> None:
    """Cast every frozen part to `dtype` (half precision under amp): the VAE, the text encoder, SD's
    encoder half, and SD's decoder / E when the lock freezes them. Trainable weights stay fp32."""
    sd.vae.to(dtype)
    sd.text_encoder.to(dtype)
    if model.train_base:
        return
    for part in (sd.unet.time_embed, sd.unet.input_blocks, sd.unet.middle_block):
        part.to(dtype)
    if model.lock != "none":
        sd.unet.output_blocks.to(dtype)
        sd.unet.out.to(dtype)
    if model.lock == "both":
        model.retrinet.encoder.to(dtype)


# -- objective --------------------------------------------------------------------------------------

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
    """Eq. 3 as DESIGN.md section 5 defines it, per sample then averaged over the batch:
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
    null = getattr(model, "module", model).retrinet.null_reference
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


# -- data ----------------------------------------------------------------------------------------

class _Skip(Sampler):
    """A batch sampler without its first `skip` batches (resuming inside an epoch)."""

    def __init__(self, batches, skip: int):
        self.batches, self.skip = batches, skip

    def __iter__(self):
        return itertools.islice(iter(self.batches), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.skip)


def _ignore_sigint(_worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the training process, which saves and stops at a step boundary."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class BatchStream:
    """Endless micro-batches of this process's shard, epoch after epoch, with a resumable position
    (epoch, batches consumed in it). Shuffling follows DistributedSampler (seed + epoch), so one
    process with a global batch of N x B sees what N processes of B see together."""

    def __init__(self, dataset: RetriBooruDataset, batch_size: int, *, rank: int, world: int, seed: int,
                 workers: int, pin_memory: bool, epoch: int = 0, offset: int = 0):
        self.dataset, self.batch_size, self.rank, self.world, self.seed = dataset, batch_size, rank, world, seed
        self.workers, self.pin_memory = workers, pin_memory
        self.epoch, self.offset = epoch, offset
        self.per_epoch = len(dataset) // world // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"{dataset.root}: {len(dataset)} samples cannot fill one batch of {batch_size} on each "
                             f"of {world} processes")
        self._it = None

    def _start(self):
        self.dataset.set_epoch(self.epoch)
        sampler = DistributedSampler(self.dataset, num_replicas=self.world, rank=self.rank, shuffle=True,
                                     seed=self.seed, drop_last=True)
        sampler.set_epoch(self.epoch)
        if self.dataset.task == "multi":
            batches = TaskBatchSampler(sampler, self.batch_size, seed=self.seed, drop_last=True)
            batches.set_epoch(self.epoch)
        else:
            batches = BatchSampler(sampler, self.batch_size, drop_last=True)
        loader = DataLoader(self.dataset, batch_sampler=_Skip(batches, self.offset), collate_fn=collate,
                            num_workers=self.workers, pin_memory=self.pin_memory, worker_init_fn=_ignore_sigint)
        self._it = iter(loader)

    def __next__(self) -> tuple[dict, int]:
        """The next micro-batch and the epoch it belongs to."""
        if self.offset >= self.per_epoch:
            self.epoch, self.offset, self._it = self.epoch + 1, 0, None
        if self._it is None:
            self._start()
        batch = next(self._it)
        self.offset += 1
        return batch, self.epoch

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}


# -- checkpoints -----------------------------------------------------------------------------------

def checkpoint_dirs(out: Path) -> list[Path]:
    """Finished checkpoints under out/checkpoints, oldest first."""
    root = out / "checkpoints"
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def write_checkpoint(out: Path, step: int, model: RetriUNet, state: dict, keep: int) -> Path:
    """out/checkpoints/step-NNNNNN/{retrinet.safetensors, state.pt}, written under a temporary name
    and renamed, so a crash never leaves a partial checkpoint; only the last `keep` are kept."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save(tmp / "retrinet.safetensors")
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():  # on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def read_state(path: Path) -> dict:
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)


# -- validation grid -------------------------------------------------------------------------------

def validation_records(root: Path, count: int) -> list[dict]:
    """The first `count` samples of an annotations.jsonl that have references, in file order."""
    records = [json.loads(l) for l in (root / "annotations.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]
    by_id = {r["id"]: r for r in records}
    return [r for r in records if any(s in by_id and s != r["id"] for s in r["similar"])][:count]


@torch.no_grad()
def sample_grid(sd: StableDiffusion, model: RetriUNet, root: Path, records: list[dict], *, k: int, size: int,
                ref_size: int, steps: int, guidance: float, ref_guidance: float | None, seed: int,
                ref_background: str = "keep") -> Image.Image:
    """One row per record: its K references (figure on white through their masks when
    `ref_background` is "white", as training saw them), a sample without a prompt and one with the
    record's prompt (fixed seeds, DDIM), then the target itself."""
    from data.dataset import figure_on_white
    from retrinet.sampling import open_reference
    by_id = {r["id"]: r for r in (json.loads(l) for l in (root / "annotations.jsonl").read_text().splitlines() if l)}
    was_training = model.training
    model.eval()
    rows = []
    for i, rec in enumerate(records):
        ref_ids = [s for s in rec["similar"] if s in by_id and s != rec["id"]][:k]
        refs = [open_reference(root / by_id[s]["image"]) for s in ref_ids]
        if ref_background == "white":
            refs = [figure_on_white(im, root / by_id[s]["mask"]) for im, s in zip(refs, ref_ids)]
        denoiser = ReferenceDenoiser(sd, model, refs, ["figure"] * len(refs), ref_size, size, size)
        row = [im.resize((size, size), Image.BILINEAR) for im in refs]
        row += [Image.new("RGB", (size, size), "white")] * (k - len(refs))
        for prompt in ("", rec["prompt"]):
            image = text_to_image(sd, prompt, num=1, steps=steps, guidance=guidance, sampler="ddim", seed=seed + i,
                                  height=size, width=size, denoiser=denoiser, ref_guidance=ref_guidance)
            row.append(Image.fromarray(image[0].numpy()))
        row.append(open_reference(root / rec["image"]).resize((size, size), Image.BILINEAR))
        rows.append(row)
    model.train(was_training)
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
