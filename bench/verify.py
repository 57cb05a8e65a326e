"""Verify on your own weights: every part this repository loads, run beside diffusers / transformers
loading the very same files, on fixed seeded inputs. One table; exit 0 only when every row passes.

    .venv/bin/python -m bench.verify --weights v1-5-pruned-emaonly.safetensors   # or the diffusers folder
    .venv/bin/python -m bench.verify --weights SD --controlnet control_sd15_canny.safetensors \\
        --ip-adapter ip-adapter_sd15.safetensors --image-encoder IP-Adapter/models/image_encoder \\
        --clip clip-vit-large-patch14 --device cuda --precision fp16
    .venv/bin/python -m bench.verify --machine     # versions, GPU, fused kernels, recommended settings

Rows; error = max |ours - theirs| / max |theirs|:
  tokenizer            ids of a few prompts, ours against transformers' CLIPTokenizer built from the
                       folder's tokenizer/ (the bundled vocabulary for a single file); must be equal
  text encoder         the last hidden state of a real prompt and of the empty one
  U-Net t=999, t=261   eps of seeded latents, two timesteps, the oracle's context of the prompts
  VAE encode, decode   the posterior mean of a seeded image; the image of seeded latents
  text-to-image S      --steps (10) steps of sampler S at guidance 7.5: the final latents
  ControlNet           its 13 residuals for a seeded hint; the U-Net's eps with them
  image encoder        IP-Adapter's image embedding of seeded pixels
  IP-Adapter U-Net     the U-Net's eps with the adapter at scale 1
  CLIP text, image     the projected features of --clip

Theirs come from the files through the oracles' own code (bench/oracles.py, which the parity tests
share): diffusers' converters for the LDM single file and the official ControlNet file, from_pretrained
for diffusers and transformers folders, diffusers' IP-Adapter loader. The oracles are test-only
dependencies (requirements-dev.txt), imported by this command and the tests alone. The configs of an
SD single file are SD v1.5's unless --config (train.py's and sample.py's JSON) says otherwise; a
diffusers folder carries its own. A pixel-space base (a tiny run's `"vae": "pixel"`) is refused before
anything loads (status 2): every row compares against diffusers' SD pipeline and its parts, which need a VAE.

Memory: every model is loaded on the CPU (about 24 GB in fp32 with every file given) and each pair
runs on --device for its rows only (at most about 12 GB in fp32: the IP-Adapter's two U-Nets and
image encoders).

Thresholds: fp32 1e-4 for every row. fp16 (CUDA only) 1e-2 for one pass and 3e-2 for a sampling
run: each fp16 op rounds at 2^-11 relative, different kernels round differently through ~100
layers, and a guided sampling run compounds ten such passes. Chosen from that arithmetic, not yet
measured on a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.oracles import (SAMPLERS, diffusers_controlnet, diffusers_ip_adapter, diffusers_pipeline, hf_tokenizer,
                           single_file_parts)

THRESHOLDS = {"fp32": {"pass": 1e-4, "sampling": 1e-4}, "fp16": {"pass": 1e-2, "sampling": 3e-2}}
PROMPTS = ["a photograph of an astronaut riding a horse", ""]
TOKENIZER_PROMPTS = PROMPTS + ["A girl, blue hair, school uniform; smiling!! (masterpiece) 1girl",
                               "naïve café — 東京 🙂", " ".join(["long"] * 90)]
TIMESTEPS = (999, 261)
GUIDANCE = 7.5
SEED = 0


@dataclass
class Row:
    part: str
    error: float
    threshold: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.threshold


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs|, in float64; NaN when the shapes differ."""
    if ours.shape != theirs.shape:
        return float("nan")
    ours, theirs = ours.detach().double().cpu(), theirs.detach().double().cpu()
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30)).item()


def worst(pairs) -> float:
    """The largest rel_err over (ours, theirs) pairs."""
    return max(rel_err(a, b) for a, b in pairs)


# -- the command line ---------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.verify", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="SD v1.5: the single file (v1-5-pruned-emaonly.safetensors) or the diffusers "
                                      "folder")
    ap.add_argument("--config", help="JSON with unet / vae / text_encoder configs for a single file that is not SD "
                                     "v1.5's shape (as train.py's and sample.py's --config)")
    ap.add_argument("--controlnet", help="an official ControlNet file (control_sd15_*.safetensors); needs --weights")
    ap.add_argument("--ip-adapter", help="the official IP-Adapter file (ip-adapter_sd15.safetensors); needs "
                                         "--weights and --image-encoder")
    ap.add_argument("--image-encoder", help="the IP-Adapter's image encoder folder (config.json, model.safetensors)")
    ap.add_argument("--clip", help="a transformers CLIP folder (openai/clip-vit-large-patch14)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    ap.add_argument("--precision", choices=list(THRESHOLDS), default="fp32")
    ap.add_argument("--size", type=int, default=512, help="image size in pixels of the U-Net, VAE and sampling "
                                                          "rows (default 512; smaller is quicker on a CPU)")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps of the text-to-image rows")
    ap.add_argument("--machine", action="store_true", help="also report this machine: torch and CUDA, the GPU, "
                                                           "bf16, fused attention kernels, recommended settings")
    return ap.parse_args(argv)


def problems(args) -> list[str]:
    """Everything wrong with the arguments, each in one line, before anything is loaded."""
    from common.options import DEVICE_PATTERN, cuda_problems, resolve_device
    out = []
    if not (args.weights or args.clip or args.machine or args.controlnet or args.ip_adapter):
        out.append("nothing to verify: give --weights (and --controlnet, --ip-adapter), --clip or --machine")
    for flag in ("weights", "config", "controlnet", "ip_adapter", "image_encoder", "clip"):
        path = getattr(args, flag)
        if path and not Path(path).exists():
            out.append(f"--{flag.replace('_', '-')} {path}: no such file or folder")
    for flag in ("controlnet", "ip_adapter"):
        if getattr(args, flag) and not args.weights:
            out.append(f"--{flag.replace('_', '-')} runs on SD's U-Net: give --weights too")
    if bool(args.ip_adapter) != bool(args.image_encoder):
        out.append("--ip-adapter and --image-encoder come together (the adapter reads the encoder's embedding)")
    args.device = resolve_device(args.device)
    if not DEVICE_PATTERN.fullmatch(args.device):
        out.append(f"--device {args.device!r} is unknown; expected cpu, cuda, cuda:N or auto")
    else:
        out += cuda_problems(args.device)
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        out.append("--precision fp16 needs --device cuda (the CPU's fp16 kernels are partial and slow)")
    if args.size < 8 or args.size % 8:
        out.append(f"--size {args.size}: expected a positive multiple of 8 (the VAE's downscale)")
    if args.steps < 1:
        out.append(f"--steps {args.steps}: expected at least 1")
    if args.weights and Path(args.weights).exists() and not (args.config and not Path(args.config).exists()):
        out += base_problems(args)
    return out


def base_problems(args) -> list[str]:
    """What the base's configs (--config's, a diffusers folder's, else SD v1.5's; read without loading any
    weights) say against verifying it: a config that cannot be read, or a pixel-space base (the tiny
    preset's, `"vae": "pixel"`). Every row compares against diffusers' StableDiffusionPipeline and its
    parts, which have no pixel-space counterpart, so such a base is refused rather than half verified."""
    from diffusion.sd15 import model_configs
    from vae import PixelSpaceConfig
    try:
        configs = model_configs(args.weights, args.config)
    except ValueError as e:
        return [str(e)]
    if isinstance(configs["vae"], PixelSpaceConfig):
        return [f"--weights {args.weights}: a pixel-space base (\"vae\": \"pixel\" in {configs['sources']['vae']}, "
                f"as the tiny preset's); bench.verify compares an SD v1.5 base with a VAE against diffusers' "
                f"pipeline, which has no pixel-space counterpart"]
    return []


def import_oracles() -> str | None:
    """None, or the one line saying which oracle is missing and how to install it."""
    try:
        import diffusers
        import transformers
    except ImportError as e:
        return (f"bench.verify compares against diffusers and transformers, and {e.name} is not installed: "
                f"pip install -r requirements-dev.txt")
    for library in (diffusers, transformers):  # their errors only: no progress bars, no dtype advice
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    return None


# -- ours ---------------------------------------------------------------------------------------------

def load_ours(args) -> SimpleNamespace:
    """Our models from the given files, through this repository's loaders, in --precision, on the CPU
    (`compare` moves each pair of models to --device for its rows only)."""
    from clip import load_clip, load_image_encoder
    from diffusion.sd15 import load_configs, load_sd15
    from retrinet import ControlNetUNet, load_ip_adapter
    kw = dict(device="cpu", dtype=dtype_of(args))
    ours = SimpleNamespace(sd=None, controlnet=None, ip_adapter=None, clip=None)
    if args.weights:
        ours.sd = load_sd15(args.weights, configs=load_configs(args.config) if args.config else None, **kw)
    if args.controlnet:
        ours.controlnet = ControlNetUNet.load(args.controlnet, ours.sd.unet).to(**kw).eval()
    if args.ip_adapter:
        encoder = load_image_encoder(args.image_encoder, **kw)
        ours.ip_adapter = load_ip_adapter(args.ip_adapter, ours.sd.unet, image_encoder=encoder).to(**kw).eval()
    if args.clip:
        ours.clip = load_clip(args.clip, **kw)
    return ours


def dtype_of(args) -> torch.dtype:
    return torch.float16 if args.precision == "fp16" else torch.float32


# -- theirs -------------------------------------------------------------------------------------------

def load_theirs(args, ours, scratch: Path) -> SimpleNamespace:
    """The oracles' models from the very same files, in --precision, on the CPU."""
    import copy

    import diffusers
    import transformers
    from safetensors.torch import load_file

    from diffusion.sd15 import model_configs
    dtype = dtype_of(args)
    theirs = SimpleNamespace(unet=None, vae=None, text=None, tokenizer=None, schedule=None, controlnet=None,
                             ip_unet=None, image_encoder=None, clip=None)
    if args.weights:
        w = Path(args.weights)
        configs = model_configs(w, args.config)
        if w.is_dir():
            theirs.unet = diffusers.UNet2DConditionModel.from_pretrained(str(w / "unet"))
            theirs.vae = diffusers.AutoencoderKL.from_pretrained(str(w / "vae"))
            theirs.text = transformers.CLIPTextModel.from_pretrained(str(w / "text_encoder"))
        else:
            theirs.unet, theirs.vae, theirs.text = single_file_parts(w, configs, scratch)
        theirs.tokenizer = hf_tokenizer(args.weights, scratch)
        theirs.schedule = configs["schedule"]
    if args.controlnet:
        theirs.controlnet = diffusers_controlnet(args.controlnet, ours.sd.unet, ours.sd.vae.config)
    if args.ip_adapter:  # a second U-Net (the same weights) carrying the adapter at scale 1
        theirs.ip_unet = diffusers_ip_adapter(copy.deepcopy(theirs.unet), load_file(args.ip_adapter), 1.0)
        theirs.image_encoder = transformers.CLIPVisionModelWithProjection.from_pretrained(args.image_encoder)
    if args.clip:
        theirs.clip = transformers.CLIPModel.from_pretrained(args.clip)
    for name, model in vars(theirs).items():
        if isinstance(model, torch.nn.Module):
            setattr(theirs, name, model.to("cpu", dtype).eval())
    return theirs


# -- the comparisons ----------------------------------------------------------------------------------

def seeded(*shape, low=None) -> torch.Tensor:
    """A seeded standard normal tensor (uniform in [0, 1) when low=0), drawn on the CPU."""
    g = torch.Generator().manual_seed(SEED + sum(shape))
    return torch.rand(*shape, generator=g) if low == 0 else torch.randn(*shape, generator=g)


@contextlib.contextmanager
def on_device(device: str, *models):
    """`models` on `device` for the rows that use them, then back on the CPU: the GPU holds one pair
    of models at a time (with every file given, all of them in fp32 would take about 25 GB)."""
    for m in models:
        m.to(device)
    try:
        yield
    finally:
        for m in models:
            m.to("cpu")
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()


@torch.no_grad()
def compare(args, ours, theirs) -> list[Row]:
    """Every row the given files allow, ours against theirs."""
    dev, dtype = args.device, dtype_of(args)
    limit = THRESHOLDS[args.precision]
    rows: list[Row] = []
    if ours.sd is not None:
        sd = ours.sd
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the long prompt's truncation, which both sides do
            ids = [sd.tokenizer(p)[0].tolist() for p in TOKENIZER_PROMPTS]
        their_ids = theirs.tokenizer(TOKENIZER_PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        differ = sum(a != b for a, b in zip(ids, their_ids))
        rows.append(Row("tokenizer", differ / len(ids), 0.0, f"{len(ids) - differ} of {len(ids)} prompts equal"))

        tokens = sd.tokenizer(PROMPTS).to(dev)
        with on_device(dev, sd.text_encoder, theirs.text):
            context = theirs.text(tokens).last_hidden_state
            rows.append(Row("text encoder", rel_err(sd.text_encoder(tokens), context), limit["pass"],
                            "last hidden state"))

        f = sd.vae.config.downscale
        latents = seeded(2, sd.unet.config.in_channels, args.size // f, args.size // f).to(dev, dtype)
        with on_device(dev, sd.unet, theirs.unet):
            for t in TIMESTEPS:
                tt = torch.full((2,), t, device=dev)
                rows.append(Row(f"U-Net t={t}", rel_err(sd.unet(latents, tt, context),
                                                          theirs.unet(latents, tt, context).sample), limit["pass"],
                                "eps, batch 2"))

        image = (seeded(1, 3, args.size, args.size, low=0) * 2 - 1).to(dev, dtype)
        with on_device(dev, sd.vae, theirs.vae):
            rows.append(Row("VAE encode", rel_err(sd.vae.encode(image).mean,
                                                  theirs.vae.encode(image).latent_dist.mean), limit["pass"],
                            "posterior mean"))
            rows.append(Row("VAE decode", rel_err(sd.vae.decode(latents[:1]), theirs.vae.decode(latents[:1]).sample),
                            limit["pass"], "image"))
        with on_device(dev, sd.text_encoder, sd.unet, sd.vae, theirs.text, theirs.unet, theirs.vae):
            rows += sampling_rows(args, sd, theirs, limit["sampling"])
        if ours.controlnet is not None:
            with on_device(dev, ours.controlnet, theirs.controlnet, theirs.unet):
                rows += controlnet_rows(args, ours.controlnet, theirs, latents, context, limit["pass"])
        if ours.ip_adapter is not None:
            with on_device(dev, ours.ip_adapter, theirs.ip_unet, theirs.image_encoder):
                rows += ip_adapter_rows(args, ours.ip_adapter, theirs, latents, context, limit["pass"])
    if ours.clip is not None:
        with on_device(dev, ours.clip, theirs.clip):
            rows += clip_rows(args, ours.clip, theirs.clip, limit["pass"])
    return rows


def sampling_rows(args, sd, theirs, threshold: float) -> list[Row]:
    """Each sampler's final latents after --steps guided steps, ours against diffusers' pipeline."""
    from diffusion.sd15 import text_to_image
    rows = []
    for name in SAMPLERS:
        pipe = diffusers_pipeline(name, theirs.schedule, vae=theirs.vae, text_encoder=theirs.text,
                                  tokenizer=theirs.tokenizer, unet=theirs.unet)
        want = pipe(PROMPTS[0], num_inference_steps=args.steps, guidance_scale=GUIDANCE, height=args.size,
                    width=args.size, generator=torch.Generator().manual_seed(SEED), output_type="latent").images
        got = text_to_image(sd, PROMPTS[0], steps=args.steps, guidance=GUIDANCE, sampler=name, seed=SEED,
                            height=args.size, width=args.size, decode=False)
        rows.append(Row(f"text-to-image {name}", rel_err(got, want), threshold, f"{args.steps} steps, latents"))
    return rows


def controlnet_rows(args, model, theirs, latents, context, threshold: float) -> list[Row]:
    dev, dtype = latents.device, latents.dtype
    b = latents.shape[0]
    hint = seeded(b, 3, args.size, args.size, low=0).to(dev, dtype)
    t = torch.full((b,), TIMESTEPS[1], device=dev)
    res = model.control(latents, hint, model.control.embed_time(t, b, dtype), context)
    down, mid = theirs.controlnet(latents, t, context, controlnet_cond=hint, return_dict=False)
    eps = theirs.unet(latents, t, context, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid).sample
    return [Row("ControlNet residuals", worst(zip(res, [*down, mid])), threshold, f"all {len(res)}"),
            Row("ControlNet U-Net", rel_err(model(latents, t, context, hint), eps), threshold, "eps with the residuals")]


def ip_adapter_rows(args, model, theirs, latents, context, threshold: float) -> list[Row]:
    cfg = model.image_encoder.config
    pixels = seeded(latents.shape[0], 3, cfg.image_size, cfg.image_size).to(latents.device, latents.dtype)
    embeds = theirs.image_encoder(pixel_values=pixels).image_embeds
    t = torch.full((latents.shape[0],), TIMESTEPS[1], device=latents.device)
    eps = theirs.ip_unet(latents, t, context, added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
    return [Row("image encoder", rel_err(model.image_encoder(pixels), embeds), threshold, "image_embeds"),
            Row("IP-Adapter U-Net", rel_err(model(latents, t, context, embeds), eps), threshold, "eps, scale 1")]


def clip_rows(args, ours, theirs, threshold: float) -> list[Row]:
    from clip import CLIPTokenizer
    folder = Path(args.clip)
    tok = CLIPTokenizer.from_folder(folder) if (folder / "vocab.json").is_file() else CLIPTokenizer.default()
    ids = tok(PROMPTS).to(args.device)
    pixels = seeded(2, 3, ours.vision_config.image_size, ours.vision_config.image_size).to(args.device,
                                                                                             dtype_of(args))
    text, image = theirs.get_text_features(input_ids=ids), theirs.get_image_features(pixel_values=pixels)
    return [Row("CLIP text", rel_err(ours.encode_text(ids), projected(text)), threshold, "projected features"),
            Row("CLIP image", rel_err(ours.encode_image(pixels), projected(image)), threshold, "projected features")]


def projected(out) -> torch.Tensor:
    """transformers' get_*_features: the tensor (4.x), or an output whose pooler_output it is (5.x)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# -- the report ---------------------------------------------------------------------------------------

def table(rows: list[Row]) -> str:
    lines = ["| part | max rel. error | threshold | verdict | compared |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.part} | {r.error:.2e} | {r.threshold:.0e} | {'pass' if r.passed else 'FAIL'} | {r.note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    found = problems(args)
    for p in found:
        print(f"bench.verify: error: {p}", file=sys.stderr)
    if found:
        return 2
    if args.machine:
        from bench.machine import machine_report
        print(machine_report(args.device if args.device.startswith("cuda") else "cuda"), flush=True)
    if not (args.weights or args.clip):
        return 0
    missing = import_oracles()
    if missing:
        print(f"bench.verify: error: {missing}", file=sys.stderr)
        return 2
    if args.precision == "fp32" and args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # TF32 alone would exceed the fp32 bound
        torch.backends.cudnn.allow_tf32 = False
    from common.weights import CheckpointError
    print(f"bench.verify: loading ours and the oracles' in {args.precision} on the CPU (each pair of models runs on "
          f"{args.device} for its rows)", file=sys.stderr, flush=True)
    try:
        ours = load_ours(args)
        with tempfile.TemporaryDirectory() as scratch:
            theirs = load_theirs(args, ours, Path(scratch))
    except (CheckpointError, ValueError, OSError, KeyError, RuntimeError) as e:  # the oracles' loading errors too
        print(f"bench.verify: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    print("bench.verify: comparing", file=sys.stderr, flush=True)
    rows = compare(args, ours, theirs)
    print(table(rows))
    failed = [r.part for r in rows if not r.passed]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} rows pass" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
