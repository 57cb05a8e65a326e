"""Text-to-image with Stable Diffusion v1.5.

    python sample.py --weights v1-5-pruned-emaonly.safetensors --prompt "a watercolor fox" --num 4

    python sample.py --weights sd15.safetensors --retrinet retrinet.safetensors \
        --refs face.png outfit.png --concepts face clothes --prompt "1girl, on a beach"

`--weights` is SD v1.5's single file or a diffusers folder. Images go to `--out` as PNGs named
`<prompt>-s<seed>-<index>.png`, each carrying its full generation parameters as JSON in the PNG
text chunk "parameters". The same arguments give byte-identical files on the same machine.
With `--retrinet` (a checkpoint written by train.py for any --method, or an official ControlNet or
IP-Adapter file) the references condition the generation; `--guidance` then drops the text and
keeps the references. `--ref-guidance` adds a separate reference scale for RetriNets trained with
reference dropout; `--ip-scale` weighs an IP-Adapter's image attention, whose `--image-encoder`
(CLIP vision weights) it needs. An IP-Adapter guides as its official pipeline (the negative branch
without the reference image); `--ip-adapter-negative` takes that pipeline's default negative prompt.
The method is read from the file.

Every argument is checked before any model is built (status 2, one line per problem): files,
sizes, the sampler's step limit on the schedule, finite guidance scales, --device, a writable
--out. A failure after that (weights holding NaN, a full disk) is one line and status 1; images
are written under a temporary name and renamed, so no partial file is left.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from common.options import COMPILE_DEFAULT, COMPILE_HELP, CONCEPTS, PRECISIONS, Renamed

MAX_SIDE = 2048   # --height, --width, --ref-size: a mistyped 100000 would ask for tens of GB before failing


def parse_args(argv=None) -> argparse.Namespace:
    from diffusion.samplers import SAMPLERS
    from retrinet import METHODS
    from retrinet.ip_adapter import IP_ADAPTER_NEGATIVE
    ap = argparse.ArgumentParser(prog="sample.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="SD v1.5 single .safetensors file or diffusers folder")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--negative-prompt", default=None, help="default: none (\"\")")
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
    ap.add_argument("--compile", nargs="?", const=COMPILE_DEFAULT, default=None, metavar="BACKEND", help=COMPILE_HELP)
    refs = ap.add_argument_group("references (RetriNet)")
    refs.add_argument("--retrinet", default=None,
                      help="a train.py checkpoint file (retrinet.safetensors, or ema.safetensors: its weight "
                           "average when trained with --ema), or an official ControlNet / IP-Adapter file")
    refs.add_argument("--refs", nargs="+", default=[], help="reference images of one identity")
    refs.add_argument("--concepts", nargs="+", default=[], choices=CONCEPTS,
                      help="concept of each reference (one for all, or one per reference; default figure)")
    refs.add_argument("--method", choices=list(METHODS), default=None,
                      help="what --retrinet holds (default: read from the file)")
    refs.add_argument("--mode", choices=list(METHODS), dest="method", action=Renamed, new="--method",
                      help=argparse.SUPPRESS)
    refs.add_argument("--ref-size", type=int, default=384, help="references are fitted and padded to this square")
    refs.add_argument("--ref-guidance", type=float, default=None,
                      help="separate reference guidance scale (RetriNet trained with reference dropout)")
    refs.add_argument("--ip-scale", type=float, default=None,
                      help="IP-Adapter: weight of the image attention (default 1.0; the paper evaluates 0.5)")
    refs.add_argument("--image-encoder", default=None,
                      help="IP-Adapter: CLIP vision weights (the official image_encoder/ folder, or a tiny run's "
                           "image-encoder/)")
    refs.add_argument("--ip-adapter-negative", action="store_true",
                      help=f"IP-Adapter: the negative prompt of its official pipeline, \"{IP_ADAPTER_NEGATIVE}\" "
                           f"(instead of --negative-prompt)")
    args = ap.parse_args(argv)
    args.negative_prompt_given = args.negative_prompt is not None  # --ip-adapter-negative takes its place
    args.negative_prompt = args.negative_prompt or ""
    return args


def check_args(args: argparse.Namespace) -> list[str]:
    """Every problem with the arguments, found before any model is built; resolves --device and
    --precision."""
    from common.options import compile_problems, default_precision, device_problems, out_problems, resolve_device
    from diffusion.sd15 import sampling_problems
    problems = sampling_problems(weights=args.weights, config=args.config, sampler=args.sampler, height=args.height,
                                 width=args.width, steps=args.steps, num=args.num, seed=args.seed,
                                 floats={"--guidance": args.guidance, "--ref-guidance": args.ref_guidance,
                                         "--ip-scale": args.ip_scale})
    problems += [f"--{name} {value} is too large: expected at most {MAX_SIDE} pixels (SD v1.5 works at 384 to 1024)"
                 for name, value in (("height", args.height), ("width", args.width), ("ref-size", args.ref_size))
                 if value > MAX_SIDE]
    args.device = resolve_device(args.device)
    args.precision = args.precision or default_precision(args.device)
    problems += device_problems(args.device, args.precision)
    problems += compile_problems(args.compile)
    problems += check_references(args)
    problems += negative_prompt_problems(args)
    problems += out_problems(args.out)
    return list(dict.fromkeys(problems))  # a bad --config is found by two checks: say it once


def check_references(args: argparse.Namespace) -> list[str]:
    """Problems with the reference arguments, found without building a model; sets `args.method` to
    the checkpoint's method."""
    from diffusion.sd15 import unet_config_for
    from retrinet import reference_problems
    reference_options = (args.ref_guidance, args.ip_scale, args.image_encoder)
    if not (args.retrinet or args.refs) and all(v is None for v in reference_options):
        return []
    try:
        unet_config = unet_config_for(args.weights, args.config)
    except (OSError, ValueError) as e:
        return [str(e)]
    problems, method = reference_problems(args.retrinet, args.refs, args.concepts, ref_size=args.ref_size,
                                          ref_guidance=args.ref_guidance, method=args.method, unet_config=unet_config,
                                          ip_scale=args.ip_scale, image_encoder=args.image_encoder)
    args.method = args.method or method
    return problems


def negative_prompt_problems(args: argparse.Namespace) -> list[str]:
    """--ip-adapter-negative: for an IP-Adapter checkpoint (after `check_references`), in place of
    --negative-prompt; sets `args.negative_prompt` to the official pipeline's."""
    from retrinet.ip_adapter import IP_ADAPTER_NEGATIVE
    if not args.ip_adapter_negative:
        return []
    problems = []
    if args.negative_prompt_given:
        problems.append("--ip-adapter-negative is a negative prompt (the IP-Adapter pipeline's): leave out "
                        "--negative-prompt")
    if not args.retrinet:
        problems.append("--ip-adapter-negative applies to IP-Adapter checkpoints: give one with --retrinet and --refs")
    elif args.method is not None and args.method != "ip-adapter":  # None: the checkpoint's problem is told
        problems.append(f"--ip-adapter-negative applies to IP-Adapter checkpoints, not a {args.method} "
                        f"({args.retrinet})")
    if not problems:
        args.negative_prompt = IP_ADAPTER_NEGATIVE
    return problems


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "image"


def load_sd(args: argparse.Namespace):
    """SD v1.5 from --weights (and --config) on --device in --precision."""
    from common.options import torch_dtype
    from diffusion.sd15 import load_configs, load_sd15
    return load_sd15(args.weights, device=args.device, dtype=torch_dtype(args.precision),
                     configs=load_configs(args.config) if args.config else None)


def load_reference_model(args: argparse.Namespace, sd):
    """The --retrinet model around `sd`'s U-Net (with --image-encoder for an IP-Adapter), in eval mode."""
    import retrinet
    from clip import load_image_encoder
    encoder = (load_image_encoder(args.image_encoder, device=sd.device, dtype=sd.dtype)
               if args.image_encoder else None)
    return retrinet.load_reference_model(args.retrinet, sd.unet, image_encoder=encoder).eval()


def generate(args: argparse.Namespace, sd, model=None, progress=None) -> list[tuple]:
    """One batch of `args.num` images: a list of (uint8 tensor (H, W, 3), the parameters its PNG records)."""
    from common.images import open_image
    from retrinet import generate, png_parameters
    references = [open_image(p, "reference") for p in args.refs] if model is not None else []
    images, params = generate(sd, args.prompt, model=model, references=references, concepts=args.concepts,
                              negative_prompt=args.negative_prompt, num=args.num, steps=args.steps,
                              guidance=args.guidance, ref_guidance=args.ref_guidance, sampler=args.sampler,
                              seed=args.seed, height=args.height, width=args.width, ref_size=args.ref_size,
                              ip_scale=args.ip_scale, progress=progress)
    return [(image, png_parameters(p, weights=args.weights, precision=args.precision, device=args.device,
                                   checkpoint=args.retrinet, reference_files=args.refs,
                                   image_encoder=args.image_encoder))
            for image, p in zip(images, params)]


def main(argv=None) -> int:
    args = parse_args(argv)
    problems = check_args(args)
    if problems:
        for p in problems:
            print(f"sample.py: error: {p}", file=sys.stderr)
        return 2

    import torch
    from common.weights import CheckpointError

    start = time.perf_counter()
    try:
        sd = load_sd(args)
    except (CheckpointError, ValueError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        print(f"sample.py: error: out of memory on {args.device} loading {args.weights} in {args.precision}",
              file=sys.stderr)
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
    if args.compile:  # the denoiser runs every step: compiled in place (its weights and their names stay)
        (model if model is not None else sd.unet).compile(backend=args.compile, fullgraph=True)
    from common.images import save_png
    out = Path(args.out)
    try:
        images = generate(args, sd, model, progress)
    except torch.OutOfMemoryError:
        print(f"\nsample.py: error: out of memory on {args.device} generating {args.num} image(s) of "
              f"{args.width}x{args.height}; use a smaller --num, --width or --height", file=sys.stderr)
        return 1
    except ValueError as e:   # a reference that changed since the checks
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 1
    for image, params in images:
        path = out / f"{slug(args.prompt)}-s{args.seed}-{params['index']}.png"
        try:
            save_png(image, params, path)  # atomic: a failed write leaves no file, an older one as it was
        except OSError as e:  # a full disk, a folder made read-only since the checks
            print(f"sample.py: error: {e}", file=sys.stderr)
            return 1
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
