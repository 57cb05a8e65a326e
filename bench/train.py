"""Benchmark: whole training steps of train.py (data loading, VAE and text encoding, the method's
forward and backward, AdamW), timed through the same functions the training loop calls.

    .venv/bin/python bench/train.py [--method controlnet] [--precision bf16]   # tiny preset, CPU: steps/s
    .venv/bin/python bench/train.py --preset sd15 --device cuda [--method ip-adapter] [--lock decoder]
        # SD v1.5 size with random weights (none can be downloaded here), batch 1, fp16 autocast +
        # GradScaler, gradient checkpointing; RetriNet at 384 px with K = 2, the baselines at 256 px
        # with one reference (the paper's Supp. A.3; IP-Adapter with a random ViT-H/14 image encoder):
        # samples/s, peak memory, parameter counts, and the achieved fraction of the GPU's peak
        # (FLOPs counted by torch's FlopCounterMode)
    .venv/bin/python bench/train.py --preset sd15 --device cuda --report bench-gpu.md [--estimate "14.2 GiB"]
        # the same, also appended as Markdown table rows; --estimate (bench/memory.py's) goes beside
        # the measured peak

No reference implementation of RetriNet training exists to take a ratio against; the U-Net's own
ratio to diffusers is bench/unet.py's. This script reports absolute throughput and, on a GPU, the
fraction of peak that sets its ceiling.
"""
import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import reporter  # noqa: E402
from data.dataset import RetriBooruDataset  # noqa: E402
from data.stream import BatchStream  # noqa: E402
from data.synthetic import generate  # noqa: E402
from retrinet import LOCKS, METHODS  # noqa: E402
from training.args import check_args, parse_args as train_args  # noqa: E402
from training.build import build, make_optimizer, random_sd15  # noqa: E402
from training.objective import Conditioning, diffusion_loss  # noqa: E402
from training.presets import PRESETS  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "V100": 125.0}  # dense fp16 tensor-core peaks


def gib(text: str) -> float:
    """'14.2 GiB', '14.2 GB', '900 MiB' or a bare number of GiB -> GiB."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*(GiB|GB|MiB|MB)?", text.strip())
    if not m:
        raise ValueError("not a size")
    scale = {None: 1.0, "GiB": 1.0, "GB": 1e9 / 2**30, "MiB": 1 / 1024, "MB": 1e6 / 2**30}
    return float(m[1]) * scale[m[2]]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", default="retrinet", choices=list(METHODS))
    ap.add_argument("--lock", default=None, choices=LOCKS, help="default: the method's (train.py's)")
    ap.add_argument("--data", default=None, help="RetriBooru root (default: a synthetic one in a temp folder)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--gpu", default="H100", help=f"peak table entry: {', '.join(PEAK_TFLOPS)}")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="tiny preset: autocast dtype")
    ap.add_argument("--report", metavar="FILE", default=None, help="append the results as Markdown table rows")
    ap.add_argument("--estimate", default=None, metavar="SIZE",
                    help="with --report: the estimated peak memory of this configuration (e.g. bench/memory.py's, "
                         "'14.2 GiB'), written beside the measured one")
    a = ap.parse_args(argv)
    if a.estimate is not None:
        try:
            gib(a.estimate)
        except ValueError as e:
            ap.error(f"--estimate {a.estimate!r}: {e}; expected a size such as '14.2 GiB'")
    return a


def main():
    a = parse_args()
    device = torch.device(a.device)
    tmp = tempfile.TemporaryDirectory()
    data = Path(a.data) if a.data else Path(tmp.name) / "syn"
    if not a.data:
        size = 48 if a.preset == "tiny" else 384
        generate(data, identities=16, images_per_identity=4, size=size, seed=0, noise_fraction=0.0)

    if a.preset == "tiny":
        args = train_args(["--preset", "tiny", "--method", a.method, "--data", str(data), "--out", tmp.name,
                           "--device", a.device, "--precision", a.precision])
        assert not check_args(args)
        sd, model = build(args, device, 1, Path(tmp.name))
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")
        scaler = torch.amp.GradScaler(enabled=False)
    else:
        if device.type != "cuda":
            sys.exit(f"bench/train.py: --preset {a.preset} measures the GPU recipe (fp16); use --device cuda")
        # The paper's baselines (one reference) train at 256 px (Supp. A.3), RetriNet at 384.
        size = ["--resolution", "256"] if METHODS[a.method].references == 1 else []
        lock = ["--lock", a.lock] if a.lock else []
        args = train_args(["--preset", a.preset, "--method", a.method, "--weights", "random", "--data", str(data),
                           "--device", a.device,  # make_optimizer: fused AdamW on CUDA
                           "--out", tmp.name, "--precision", "fp16", "--checkpointing", *size, *lock])
        with torch.device(device):
            sd, model = random_sd15(args.method, args.lock)
        amp, scaler = torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")
    params = model.trainable_parameters()
    optimizer = make_optimizer(params, args, 1)
    dataset = RetriBooruDataset(data, resolution=args.resolution, k=args.refs, prompt_drop=args.prompt_drop,
                                ref_resolution=args.ref_resolution)
    stream = BatchStream(dataset, args.batch_size, rank=0, world=1, seed=0, workers=args.workers,
                         pin_memory=device.type == "cuda")
    schedule, text = sd.schedule, Conditioning(sd)

    def step():
        """One training step; returns (samples, whether the fp16 GradScaler skipped its update)."""
        batch, epoch = next(stream)
        with amp:
            loss = diffusion_loss(model, sd, schedule, text, batch, epoch=epoch, seed=0,
                                  face_weight=args.face_weight, ref_drop=0.0)
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return batch["size"], scale is not None and scaler.get_scale() < scale  # lowered: inf / NaN, no update

    for _ in range(a.warmup):
        step()
    for _ in range(20):  # the fp16 scaler starts at 2^16 and halves on each overflow: until it updates
        if not step()[1]:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, samples, skipped = [], 0, 0
    for _ in range(a.steps):
        start = time.perf_counter()
        n, was_skipped = step()
        samples, skipped = samples + n, skipped + was_skipped
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    if skipped:
        print(f"note: the fp16 GradScaler skipped the update of {skipped} of {a.steps} timed steps (overflow): "
              f"those steps ran no AdamW")
    n_all = sum(p.numel() for p in model.parameters()) + sum(p.numel() for m in (sd.vae, sd.text_encoder)
                                                            for p in m.parameters())
    n_train = sum(p.numel() for p in params)
    print(f"preset {a.preset}, method {args.method}, lock {args.lock}, {device}, {args.precision}, {args.resolution} px, K = {args.refs}, "
          f"batch {args.batch_size}, threads {torch.get_num_threads()}")
    print(f"parameters: {n_all / 1e6:.1f} M in all, {n_train / 1e6:.1f} M trainable "
          f"(fp32 weights + grads + AdamW state: {16 * n_train / 2**30:.2f} GiB)")
    print(f"step: median {median * 1e3:.1f} ms over {a.steps} -> {1 / median:.2f} steps/s, "
          f"{args.batch_size / median:.1f} samples/s")
    report = reporter(a.report, "bench/train.py")
    setup = (f"{a.preset} {args.method} lock {args.lock}, {args.resolution} px, K={args.refs}, "
             f"batch {args.batch_size}, "
             + ("fp16 autocast, checkpointing" if a.preset != "tiny" else f"{device} {args.precision}"))
    report(f"training step, {setup}, median of {a.steps}"
           + (f" ({skipped} skipped their update: fp16 overflow)" if skipped else ""),
           f"{args.batch_size / median:.2f} samples/s ({median * 1e3:.1f} ms/step)")
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"peak memory: {peak_gib:.2f} GiB")
        estimate = gib(a.estimate) if a.estimate else None
        report(f"peak memory (allocated), {setup}", f"{peak_gib:.2f} GiB",
               f"estimate {estimate:.2f} GiB" if estimate else "",
               f"{peak_gib / estimate:.3f}" if estimate else "")
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        peak = PEAK_TFLOPS.get(a.gpu, float("nan")) * 1e12
        print(f"FLOPs per step: {flops / 1e12:.2f} T -> {flops / median / 1e12:.1f} TFLOP/s achieved, "
              f"{flops / median / peak:.1%} of the {a.gpu}'s {peak / 1e12:.0f} TFLOP/s fp16 peak")
        report(f"achieved fp16 throughput, {setup}", f"{flops / median / 1e12:.1f} TFLOP/s",
               f"{a.gpu} peak {peak / 1e12:.0f} TFLOP/s", f"{flops / median / peak:.1%}")


if __name__ == "__main__":
    main()
