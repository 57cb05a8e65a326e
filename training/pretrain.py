"""The tiny SD v1.5 + CLIP stack, pre-trained from scratch on synthetic scenes (`make base`).

The paper fine-tunes a pre-trained Stable Diffusion v1.5 whose text encoder is CLIP's. The tiny
preset's miniature of that stack is made here, in two stages, as the originals were made:

1. **CLIP** (`train_clip`): a text tower and an image tower (clip.CLIPModel at `tiny_clip_configs`)
   learn a joint embedding from image-prompt pairs with CLIP's symmetric InfoNCE loss. Our prompts
   can be partial or empty, so two prompts of a batch may both fit one image: every pair whose
   prompt names nothing the image does not show counts as a positive, the targets spread evenly over
   them (with full prompts this is CLIP's loss exactly).
2. **SD's U-Net** (`train_unet`): text-to-image diffusion with the frozen CLIP text tower as SD's
   text encoder, `empty_prompts` of the prompts emptied for classifier-free guidance, a weight
   average (EMA) kept for sampling.

The data: `draw_scenes` renders data.synthetic's figures with random identities (any hair, top and
bottom colours, styles, artists; no hats) in random scenes (a named background colour, arms, facing),
each described in full by a Danbooru-style prompt (`prompt_of`) of which training drops parts. One
colour combination in ten of (hair, top, bottom) is never drawn for training (`is_held_out`): the
evaluation (`zero_shot` here, training.base_score for the U-Net) draws its images from those.
`pretrain.py` (`make base`) runs both stages and writes the stack's files (`save_clip`,
training.presets.save_base; the token embedding in half precision, HALF_KEYS).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clip import CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig
from data.synthetic import (CLOTH_COLORS, EYE_COLORS, HAIR_COLORS, HAIR_STYLES, OUTLINE_COLORS, SKIN_TONES,
                            Artist, Character, Identity, Outfit, BOTTOM_KINDS, PATTERNS, draw_scene, render)
from diffusion.schedule import NoiseSchedule
from training.objective import lr_at
from retrinet.ip_adapter import clip_pixels
from unet import UNet

RENDER_SIZE = 48              # scenes are drawn at 48 px and resized as the training loader resizes,
FIGURE_SCALE = (0.8, 0.95)    # with figures 80-95% of the image high: the demo's and the leakage benchmark's data
ATTRIBUTES = ("hair", "top", "bottom", "background", "arms", "facing")
# Prompt groups in their fixed order; each is one or two Danbooru tags (underscores as spaces).
GROUPS = ("hair", "eyes", "top", "bottom", "arms", "facing", "background")


# ----------------------------------------------------------------------------------------- data

def is_held_out(hair: str, top: str, bottom: str) -> bool:
    """One (hair, top, bottom) colour combination in ten, fixed by a checksum of its names: never
    drawn for training, so that the evaluation samples combinations the models never saw."""
    return zlib.crc32(f"{hair}|{top}|{bottom}".encode()) % 10 == 0


@dataclass(frozen=True)
class Drawn:
    """What one scene shows: every attribute a prompt can name."""
    hair: str
    style: str
    eyes: str
    top: str
    bottom: str
    kind: str
    background: str
    arms: str
    facing: str


def random_identity(rng: np.random.Generator, held_out: bool) -> Identity:
    """A random identity whose colour triple is (held_out=True) or is not one of `is_held_out`'s."""
    hairs, cloths = list(HAIR_COLORS), list(CLOTH_COLORS)
    while True:
        hair = hairs[rng.integers(len(hairs))]
        top, bottom = rng.choice(len(cloths), 2, replace=False)
        top, bottom = cloths[top], cloths[bottom]
        if is_held_out(hair, top, bottom) == held_out:
            break
    char = Character("c", hair, HAIR_STYLES[rng.integers(len(HAIR_STYLES))],
                     list(EYE_COLORS)[rng.integers(len(EYE_COLORS))],
                     int(rng.choice(len(SKIN_TONES), p=[0.45, 0.4, 0.15])))
    artist = Artist("a", float(rng.choice([0.7, 1.1, 1.6, 2.1])), OUTLINE_COLORS[rng.integers(len(OUTLINE_COLORS))],
                    bool(rng.random() < 0.6))
    outfit = Outfit(0, top, bottom, BOTTOM_KINDS[rng.integers(len(BOTTOM_KINDS))], PATTERNS[rng.integers(len(PATTERNS))],
                    ("none", "ribbon")[rng.integers(2)], cloths[rng.integers(len(cloths))])
    return Identity(char, artist, outfit)


def draw_scenes(n: int, seed: int, *, held_out: bool = False, progress=None) -> tuple[torch.Tensor, list[Drawn]]:
    """`n` scenes as uint8 (n, 3, RENDER_SIZE, RENDER_SIZE) and what each shows; image i is a function
    of (seed, i, held_out) alone."""
    images = torch.empty(n, 3, RENDER_SIZE, RENDER_SIZE, dtype=torch.uint8)
    shown = []
    for i in range(n):
        rng = np.random.default_rng([seed, int(held_out), i])
        ident, scene = random_identity(rng, held_out), draw_scene(rng)
        rgb, _, _, _ = render(ident, RENDER_SIZE, rng, scene=scene, figure_scale=FIGURE_SCALE)
        images[i] = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)
        ch, of = ident.character, ident.outfit
        shown.append(Drawn(ch.hair_color, ch.hair_style, ch.eye_color, of.top, of.bottom, of.bottom_kind,
                           scene.background, scene.arms, scene.facing))
        if progress and ((i + 1) % 1000 == 0 or i + 1 == n):
            progress(i + 1, n)
    return images, shown


def group_tags(d: Drawn, group: str) -> list[str]:
    """The tags of one prompt group (data.synthetic's tag names)."""
    return {"hair": [d.style, f"{d.hair}_hair"], "eyes": [f"{d.eyes}_eyes"], "top": [f"{d.top}_shirt"],
            "bottom": [f"{d.bottom}_{d.kind}"], "arms": [d.arms], "facing": [d.facing],
            "background": [f"{d.background}_background"]}[group]


def prompt_of(d: Drawn, groups=GROUPS) -> str:
    """The prompt naming `groups` of the scene, in GROUPS order: "1girl, solo, full body, ..." with
    spaces for underscores (as data.synthetic's prompts); no group at all is the empty prompt."""
    groups = [g for g in GROUPS if g in groups]
    if not groups:
        return ""
    tags = ["1girl", "solo", "full_body"] + [t for g in groups for t in group_tags(d, g)]
    return ", ".join(t.replace("_", " ") for t in tags)


def draw_groups(rng: np.random.Generator, *, empty: float, partial: float) -> tuple[str, ...]:
    """Which groups a training prompt names: none with probability `empty`; else, with probability
    `partial`, each group independently with odds 1/2; else all."""
    u = rng.random()
    if u < empty:
        return ()
    if u < empty + partial:
        return tuple(g for g in GROUPS if rng.random() < 0.5)
    return GROUPS


def group_codes(shown: list[Drawn]) -> torch.Tensor:
    """(N, len(GROUPS)) ints: equal in a column when two scenes' tags of that group are equal."""
    seen: dict[tuple, int] = {}
    return torch.tensor([[seen.setdefault((g, *group_tags(d, g)), len(seen)) for g in GROUPS] for d in shown])


def fitting_pairs(codes: torch.Tensor, named: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: [i, j] when prompt j (naming the groups where `named[j]` (B, len(GROUPS)) is True,
    of scene j with `group_codes` row codes[j]) describes scene i: every group it names has scene i's
    tags."""
    return ((codes[:, None, :] == codes[None, :, :]) | ~named[None, :, :]).all(-1)


def to_model_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float [-1, 1] at `size`, resized as the training loader resizes
    (common.images.fit_and_pad: antialiased bilinear)."""
    x = images
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.float().div(127.5).sub(1)


# ----------------------------------------------------------------------------------------- CLIP

def tiny_clip_configs() -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """The tiny CLIP: SD's 77-token text tower and an image tower seeing 32 px in 8 px patches (as
    the tiny preset's IP-Adapter encoder always did), both 64 wide with 2 layers, a 64-dimensional
    joint space. 4 px patches cost 1.5x the step and retrieved no better (BENCHMARKS.md)."""
    text = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          projection_dim=64)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=64)
    return text, vision


def contrastive_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (logits (B images, B texts)) with `positive` (B, B) bool marking every
    fitting pair; the diagonal must be positive. Each direction's target spreads evenly over its
    positives; with the diagonal alone this is CLIP's loss."""
    p = positive.float()
    per_image = -(F.log_softmax(logits, 1) * p / p.sum(1, keepdim=True)).sum(1).mean()
    per_text = -(F.log_softmax(logits, 0) * p / p.sum(0, keepdim=True)).sum(0).mean()
    return (per_image + per_text) / 2


@dataclass
class ClipRecipe:
    steps: int = 3000
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    empty: float = 0.05     # training prompts that name nothing
    partial: float = 0.3    # ... that name a random half of the groups
    pool: int = 20_000      # distinct training scenes


def once_cosine(step: int, steps: int, lr: float, warmup: int) -> float:
    """The learning rate at `step`: training.objective.lr_at's warm-up and cosine, run once over `steps`."""
    return lr_at(step, lr=lr, warmup=warmup, restart_every=max(1, steps - warmup))


def train_clip(recipe: ClipRecipe, seed: int, log=print) -> CLIPModel:
    """Stage 1: the tiny CLIP from scratch."""
    torch.manual_seed(seed)
    text_cfg, vision_cfg = tiny_clip_configs()
    model = CLIPModel(text_cfg, vision_cfg)
    tok = CLIPTokenizer.default()
    images, shown = draw_scenes(recipe.pool, seed, progress=lambda i, n: log(f"clip: drew {i}/{n} scenes"))
    pixels = clip_pixels(to_model_pixels(images, RENDER_SIZE), vision_cfg.image_size)
    codes = group_codes(shown)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    rng = np.random.default_rng([seed, 100])
    start = time.perf_counter()
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = once_cosine(step, recipe.steps, recipe.lr, recipe.warmup)
        idx = rng.choice(len(shown), recipe.batch, replace=False)
        groups = [draw_groups(rng, empty=recipe.empty, partial=recipe.partial) for _ in idx]
        batch = [shown[i] for i in idx]
        positive = fitting_pairs(codes[idx], torch.tensor([[g in gs for g in GROUPS] for gs in groups]))
        logits = model(tok([prompt_of(d, g) for d, g in zip(batch, groups)]), pixels[idx])
        loss = contrastive_loss(logits, positive)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's bound on the temperature
        if (step + 1) % 100 == 0 or step + 1 == recipe.steps:
            log(f"clip: step {step + 1}/{recipe.steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - start:.0f}s)")
    return model.eval()


@torch.no_grad()
def zero_shot(model: CLIPModel, n: int = 512, seed: int = 1) -> dict:
    """Zero-shot retrieval on `n` held-out scenes (colour combinations never trained on):
    per attribute, the share of images whose best-fitting prompt among the prompts that differ from
    its own full prompt only in that attribute names the right value (chance 1 / values); and
    image retrieval: for each full prompt, is its own image the best-fitting of the `n`
    (chance 1 / n)?"""
    tok = CLIPTokenizer.default()
    images, shown = draw_scenes(n, seed, held_out=True)
    img = F.normalize(model.encode_image(clip_pixels(to_model_pixels(images, RENDER_SIZE),
                                                     model.vision_config.image_size)), dim=-1)
    values = {"hair": list(HAIR_COLORS), "top": list(CLOTH_COLORS), "bottom": list(CLOTH_COLORS),
              "background": ["blue", "green", "purple", "grey"], "arms": ["arms_up", "arms_down"],
              "facing": ["facing_right", "facing_left"]}
    def embed(prompts: list[str]) -> torch.Tensor:
        return F.normalize(torch.cat([model.encode_text(tok(prompts[i:i + 1024]))
                                      for i in range(0, len(prompts), 1024)]), dim=-1)

    out = {}
    for att, options in values.items():
        # (n, options): image i against its own full prompt with `att` set to each option.
        txt = embed([prompt_of(dataclasses.replace(d, **{att: v})) for d in shown for v in options])
        sims = (txt.view(n, len(options), -1) @ img[:, :, None]).squeeze(-1)
        right = sum(options[j] == getattr(d, att) for j, d in zip(sims.argmax(1).tolist(), shown))
        out[att] = {"accuracy": right / n, "chance": 1 / len(options)}
    txt = embed([prompt_of(d) for d in shown])
    hits = (txt @ img.T).argmax(1) == torch.arange(n)
    out["prompt_to_image"] = {"accuracy": hits.float().mean().item(), "chance": 1 / n}
    hits = (img @ txt.T).argmax(1) == torch.arange(n)
    out["image_to_prompt"] = {"accuracy": hits.float().mean().item(), "chance": 1 / n}
    return out


# ----------------------------------------------------------------------------------------- U-Net

@dataclass
class UNetRecipe:
    steps: int = 16000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.999
    empty: float = 0.1      # prompts emptied for classifier-free guidance (SD v1.5 dropped 10%)
    partial: float = 0.3    # prompts naming a random half of the groups
    pool: int = 40_000      # distinct training scenes
    resolution: int = 24


def tiny_sd(text_encoder: CLIPTextModel, seed: int):
    """A fresh tiny SD (training.presets.tiny_configs' U-Net, pixel space, v-prediction) on the
    given frozen text encoder."""
    from diffusion.sd15 import StableDiffusion
    from training.presets import tiny_configs
    from vae import PixelSpace
    cfg = tiny_configs()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet(cfg["unet"])
    return StableDiffusion(unet, PixelSpace(cfg["vae"]), text_encoder.eval().requires_grad_(False),
                           CLIPTokenizer.default(), cfg["schedule"])


def text_tower(clip: CLIPModel) -> CLIPTextModel:
    """The CLIP's text tower as SD's text encoder (a CLIPTextModel sharing its weights)."""
    text = CLIPTextModel(clip.text_config)
    text.text_model = clip.text_model
    return text


def train_unet(clip: CLIPModel, recipe: UNetRecipe, seed: int, log=print, minutes: float | None = None):
    """Stage 2: the tiny SD's U-Net, text-to-image, on the frozen CLIP text tower. Returns the SD
    with the weight average in its U-Net and the number of steps taken (`minutes` stops early)."""
    from training.ema import EMA
    sd = tiny_sd(text_tower(clip), seed)
    schedule: NoiseSchedule = sd.schedule
    images, shown = draw_scenes(recipe.pool, seed + 1, progress=lambda i, n: log(f"unet: drew {i}/{n} scenes"))
    pixels = to_model_pixels(images, recipe.resolution)
    del images
    params = [p for p in sd.unet.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01)
    ema = EMA(params, recipe.ema)
    rng = np.random.default_rng([seed, 200])
    gen = torch.Generator().manual_seed(seed)
    start, step = time.perf_counter(), 0
    sd.unet.train()
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = once_cosine(step, recipe.steps, recipe.lr, recipe.warmup)
        idx = rng.choice(len(shown), recipe.batch, replace=False)
        prompts = [prompt_of(shown[i], draw_groups(rng, empty=recipe.empty, partial=recipe.partial)) for i in idx]
        with torch.no_grad():
            context = sd.encode_prompts(prompts)
        x0 = pixels[idx]
        t = torch.randint(0, schedule.num_train_timesteps, (len(idx),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        out = sd.unet(schedule.add_noise(x0, noise, t), t, context)
        loss = F.mse_loss(out, schedule.target(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update()
        if (step + 1) % 200 == 0 or step + 1 == recipe.steps:
            log(f"unet: step {step + 1}/{recipe.steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
        if minutes is not None and time.perf_counter() - start > 60 * minutes:
            log(f"unet: stopped at step {step + 1} after {minutes} minutes")
            break
    sd.unet.eval()
    with torch.no_grad():
        for p, s in zip(params, ema.shadow):
            p.copy_(s)
    return sd, step + 1


# ----------------------------------------------------------------------------------------- files

CLIP_DIR, BASE_FILE, BASE_CONFIG, STACK_FILE = "clip", "base.safetensors", "base-config.json", "stack.json"
CLIP_RECORD = "training.json"  # clip/training.json: how the CLIP was trained (kept when a rerun reuses it)
HALF_KEYS = ("token_embedding.weight",)  # 49,408 x 64: stored in half precision to fit the repository


def _shrunk(state: dict) -> dict:
    return {k: (v.half() if k.endswith(HALF_KEYS) else v).detach().contiguous() for k, v in state.items()}


def round_half_keys(module: torch.nn.Module) -> None:
    """Round the weights that `save_clip` / `save_stack` store in half precision, in place, so that
    what is scored is what ships."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(HALF_KEYS):
                p.copy_(p.half().float())


def save_clip(clip: CLIPModel, folder: Path) -> Path:
    """The tiny CLIP in openai/clip-vit-large-patch14's layout: folder/model.safetensors (keys
    text_model.*, vision_model.*, the projections, logit_scale) and a transformers CLIPConfig
    config.json; clip.load_clip reads it, clip.load_image_encoder its image side."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    text, vision = clip.text_config, clip.vision_config
    config = {"projection_dim": text.projection_dim,
              "text_config": {k: v for k, v in dataclasses.asdict(text).items() if k != "projection_dim"},
              "vision_config": {k: v for k, v in dataclasses.asdict(vision).items() if k != "projection_dim"}}
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    save_file(_shrunk(clip.state_dict()), str(folder / "model.safetensors"))
    return folder / "model.safetensors"


def sha256(path: Path) -> str:
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shipped_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    return [folder / CLIP_DIR / "model.safetensors", folder / CLIP_DIR / "config.json", folder / BASE_FILE,
            folder / BASE_CONFIG]
