"""Text-to-image with Stable Diffusion v1.5.

    python sample.py --weights v1-5-pruned-emaonly.safetensors --prompt "a watercolor fox" --num 4

    python sample.py --weights sd15.safetensors --retrinet retrinet.safetensors \
        --refs face.png outfit.png --concepts face clothes --prompt "1girl, on a beach"

`--weights` is SD v1.5's single file or a diffusers folder. Images go to `--out` as PNGs named
`<prompt>-s<seed>-<index>.png`, each carrying its full generation parameters as JSON in the PNG
text chunk "parameters". The same arguments give byte-identical files on the same machine.
With `--retrinet` (a RetriNet checkpoint, or an official ControlNet file for the baseline) the
references condition the generation; `--guidance` then drops the text and keeps the references.
`--ref-guidance` adds a separate reference scale for RetriNets trained with reference dropout.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def parse_args(argv=None) -> argparse.Namespace:
    from diffusion.samplers import SAMPLERS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="SD v1.5 single .safetensors file or diffusers folder")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--negative-prompt", default="")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale (<= 1: off)")
    ap.add_argument("--sampler", default="pndm", help=f"one of {', '.join(SAMPLERS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num", type=int, default=1, help="images to generate (one batch)")
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--precision", choices=list(PRECISIONS), default=None,
                    help="default: fp16 on CUDA, fp32 on the CPU")
    ap.add_argument("--config", default=None, help="JSON with unet / vae / text_encoder configs for weights that "
                                                   "are not SD v1.5's shape (diffusers folders carry their own)")
    ap.add_argument("--out", default="outputs", help="output folder (created if missing)")
    refs = ap.add_argument_group("references (RetriNet)")
    refs.add_argument("--retrinet", default=None, help="RetriNet checkpoint, or an official ControlNet file")
    refs.add_argument("--refs", nargs="+", default=[], help="reference images of one identity")
    refs.add_argument("--concepts", nargs="+", default=[], choices=["figure", "face", "clothes"],
                      help="concept of each reference (one for all, or one per reference; default figure)")
    refs.add_argument("--mode", choices=["retrinet", "controlnet"], default=None,
                      help="what --retrinet holds (default: read from the file)")
    refs.add_argument("--ref-size", type=int, default=384, help="references are fitted and padded to this square")
    refs.add_argument("--ref-guidance", type=float, default=None,
                      help="separate reference guidance scale (RetriNet trained with reference dropout)")
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
    """Every problem with the arguments, found before any model is built."""
    import torch
    from diffusion.samplers import SAMPLERS
    problems = []
    if not Path(args.weights).exists():
        problems.append(f"--weights {args.weights}: no such file or folder")
    if args.sampler not in SAMPLERS:
        problems.append(f"--sampler {args.sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value <= 0 or value % 8:
            problems.append(f"--{name} {value} must be a positive multiple of 8")
    if args.steps < 1 or args.num < 1:
        problems.append(f"--steps ({args.steps}) and --num ({args.num}) must be at least 1")
    if args.config and not Path(args.config).is_file():
        problems.append(f"--config {args.config}: no such file")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.device}: CUDA is not available here")
    args.precision = args.precision or ("fp16" if args.device.startswith("cuda") else "fp32")
    if args.precision == "fp16" and args.device == "cpu":
        problems.append("--precision fp16 is not supported on the CPU; use fp32 or bf16")
    problems += check_references(args)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        problems.append(f"--out {out}: cannot write there ({e.strerror or e})")
    return problems


def check_references(args: argparse.Namespace) -> list[str]:
    """Problems with the reference arguments, found without building a model: files, concept
    counts, and whether the checkpoint was made for this base U-Net."""
    if not args.retrinet and not args.refs:
        return ["--ref-guidance needs --retrinet and --refs"] if args.ref_guidance is not None else []
    if not args.retrinet or not args.refs:
        return ["--retrinet and --refs go together"]
    problems = []
    from retrinet.sampling import open_reference
    for path in args.refs:
        try:
            open_reference(path)
        except ValueError as e:
            problems.append(str(e))
    n_concepts, n_refs = len(args.concepts), len(args.refs)
    if n_concepts > n_refs:
        problems.append(f"--concepts: {n_concepts} concepts for {n_refs} references")
    elif n_concepts not in (0, 1, n_refs):
        problems.append(f"--concepts: give one concept for all references or one per reference, got {n_concepts} "
                        f"for {n_refs}")
    if args.ref_size <= 0 or args.ref_size % 8:
        problems.append(f"--ref-size {args.ref_size} must be a positive multiple of 8")
    ckpt = Path(args.retrinet)
    if not ckpt.is_file():
        return problems + [f"--retrinet {ckpt}: no such file"]
    try:
        problems += checkpoint_problems(args, ckpt)
    except (OSError, ValueError) as e:
        problems.append(f"--retrinet {ckpt}: {e}")
    return problems


def checkpoint_problems(args: argparse.Namespace, ckpt: Path) -> list[str]:
    """Compare the checkpoint's base U-Net with the one --weights / --config will build."""
    import torch
    from common.weights import read_header
    from diffusion.sd15 import load_configs
    from retrinet import RetriUNet, read_metadata
    from retrinet.model import base_config_mismatch
    from unet import UNet, UNetConfig, config_from_diffusers

    cfg = load_configs(args.config)["unet"] if args.config else None
    unet_json = Path(args.weights) / "unet" / "config.json"
    if cfg is None and unet_json.is_file():
        cfg = config_from_diffusers(json.loads(unet_json.read_text()))
    cfg = cfg or UNetConfig.sd15()
    header = read_header(ckpt)
    if any(k.startswith("retrinet.") or k.startswith("unet.") for k in header) or args.mode == "retrinet":
        meta = read_metadata(ckpt)
        mode = meta.get("mode", "retrinet")
        if args.ref_guidance is not None and not meta.get("null_reference"):
            return [f"--ref-guidance: {ckpt} has no null reference (it was not trained with reference dropout)"]
        diff = base_config_mismatch(meta, cfg)
        if diff:
            return [f"--retrinet {ckpt}: made for another base U-Net (differs in {', '.join(sorted(diff))})"]
    else:
        mode = "controlnet"
        with torch.device("meta"):
            control = RetriUNet(UNet(cfg), mode="controlnet").control
        own = {k: list(v.shape) for k, v in control.state_dict().items()}
        prefix = "control_model." if any(k.startswith("control_model.") for k in header) else ""
        theirs = {k[len(prefix):]: v["shape"] for k, v in header.items() if k.startswith(prefix)}
        if any(theirs.get(k) != shape for k, shape in own.items()):
            return [f"--retrinet {ckpt}: not a ControlNet for this base U-Net (keys or shapes differ)"]
    if args.mode and args.mode != mode:
        return [f"--mode {args.mode}: {ckpt} holds a {mode} checkpoint"]
    args.mode = mode
    if mode == "controlnet" and args.ref_guidance is not None:
        return ["--ref-guidance needs a RetriNet with a null reference, not a ControlNet"]
    if mode == "controlnet" and len(args.refs) != 1:
        return [f"--refs: the ControlNet baseline takes one reference image, got {len(args.refs)}"]
    return []


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "image"


def load_sd(args: argparse.Namespace):
    """SD v1.5 from --weights (and --config) on --device in --precision."""
    import torch
    from diffusion.sd15 import load_configs, load_sd15
    configs = load_configs(args.config) if args.config else None
    return load_sd15(args.weights, device=args.device, dtype=getattr(torch, PRECISIONS[args.precision]),
                     configs=configs)


def load_reference_model(args: argparse.Namespace, sd):
    """The RetriNet (or ControlNet baseline) of --retrinet around `sd`'s U-Net, in eval mode."""
    from retrinet import RetriUNet
    return (RetriUNet.load(args.retrinet, sd.unet) if args.mode == "retrinet"
            else RetriUNet.load_controlnet(args.retrinet, sd.unet)).eval()


def generate(args: argparse.Namespace, sd, model=None, progress=None) -> list[tuple]:
    """One batch of `args.num` images for `args.prompt` / `args.seed` (with `model`, conditioned on
    `args.refs`): a list of (uint8 tensor (H, W, 3), its generation parameters). The command and
    `python -m eval.protocol` both generate through here. Fills in `args.concepts` (one per reference)."""
    from diffusion.sd15 import text_to_image
    denoiser = None
    if model is not None:
        from retrinet.sampling import ReferenceDenoiser, open_reference
        concepts = args.concepts * len(args.refs) if len(args.concepts) == 1 else args.concepts or ["figure"] * len(args.refs)
        args.concepts = concepts
        denoiser = ReferenceDenoiser(sd, model, [open_reference(p) for p in args.refs], concepts, args.ref_size,
                                     args.height, args.width)
    images = text_to_image(sd, args.prompt, args.negative_prompt, num=args.num, steps=args.steps,
                           guidance=args.guidance, sampler=args.sampler, seed=args.seed, height=args.height,
                           width=args.width, progress=progress, denoiser=denoiser, ref_guidance=args.ref_guidance)
    out = []
    for i, image in enumerate(images):
        params = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                      guidance=args.guidance, sampler=args.sampler, seed=args.seed, index=i, num=args.num,
                      height=args.height, width=args.width, weights=Path(args.weights).name,
                      precision=args.precision, device=args.device)
        if args.retrinet:
            params.update(retrinet=Path(args.retrinet).name, mode=args.mode, refs=[Path(p).name for p in args.refs],
                          concepts=args.concepts, ref_size=args.ref_size, ref_guidance=args.ref_guidance)
        out.append((image, params))
    return out


def save_png(image, params: dict, path: str | Path) -> None:
    """Write a uint8 (H, W, 3) image as PNG with `params` as JSON in the text chunk "parameters"."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", json.dumps(params, ensure_ascii=False))
    Image.fromarray(image.numpy()).save(path, pnginfo=info)


def main(argv=None) -> int:
    args = parse_args(argv)
    problems = check_args(args)
    if problems:
        for p in problems:
            print(f"sample.py: error: {p}", file=sys.stderr)
        return 2

    from common.weights import CheckpointError

    start = time.perf_counter()
    try:
        sd = load_sd(args)
    except (CheckpointError, ValueError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 1
    print(f"loaded {args.weights} on {args.device} in {args.precision} ({time.perf_counter() - start:.1f} s)",
          file=sys.stderr)

    def progress(step, total):
        end = "\n" if step == total else ""
        print(f"\rsampling {args.num} image(s) with {args.sampler}: step {step}/{total}", end=end, file=sys.stderr,
              flush=True)

    model = None
    if args.retrinet:
        try:
            model = load_reference_model(args, sd)
        except (CheckpointError, ValueError) as e:
            print(f"sample.py: error: {e}", file=sys.stderr)
            return 1
    out = Path(args.out)
    for image, params in generate(args, sd, model, progress):
        path = out / f"{slug(args.prompt)}-s{args.seed}-{params['index']}.png"
        save_png(image, params, path)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
