"""Text-to-image with Stable Diffusion v1.5.

    python sample.py --weights v1-5-pruned-emaonly.safetensors --prompt "a watercolor fox" --num 4

`--weights` is SD v1.5's single file or a diffusers folder. Images go to `--out` as PNGs named
`<prompt>-s<seed>-<index>.png`, each carrying its full generation parameters as JSON in the PNG
text chunk "parameters". The same arguments give byte-identical files on the same machine.
Reference-conditioned sampling (`--refs`) arrives with RetriNet (issue 5).
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
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        problems.append(f"--out {out}: cannot write there ({e.strerror or e})")
    return problems


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "image"


def main(argv=None) -> int:
    args = parse_args(argv)
    problems = check_args(args)
    if problems:
        for p in problems:
            print(f"sample.py: error: {p}", file=sys.stderr)
        return 2

    import torch
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from common.weights import CheckpointError
    from diffusion.sd15 import load_configs, load_sd15, text_to_image

    dtype = getattr(torch, PRECISIONS[args.precision])
    start = time.perf_counter()
    try:
        configs = load_configs(args.config) if args.config else None
        sd = load_sd15(args.weights, device=args.device, dtype=dtype, configs=configs)
    except (CheckpointError, ValueError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 1
    print(f"loaded {args.weights} on {args.device} in {args.precision} ({time.perf_counter() - start:.1f} s)",
          file=sys.stderr)

    def progress(step, total):
        end = "\n" if step == total else ""
        print(f"\rsampling {args.num} image(s) with {args.sampler}: step {step}/{total}", end=end, file=sys.stderr,
              flush=True)

    images = text_to_image(sd, args.prompt, args.negative_prompt, num=args.num, steps=args.steps,
                           guidance=args.guidance, sampler=args.sampler, seed=args.seed, height=args.height,
                           width=args.width, progress=progress)
    out = Path(args.out)
    for i, image in enumerate(images):
        params = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                      guidance=args.guidance, sampler=args.sampler, seed=args.seed, index=i, num=args.num,
                      height=args.height, width=args.width, weights=Path(args.weights).name,
                      precision=args.precision, device=args.device)
        info = PngInfo()
        info.add_text("parameters", json.dumps(params, ensure_ascii=False))
        path = out / f"{slug(args.prompt)}-s{args.seed}-{i}.png"
        Image.fromarray(image.numpy()).save(path, pnginfo=info)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
