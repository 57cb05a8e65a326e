"""Benchmark: SD v1.5 VAE decode at 384x384 (48x48 latents), ours vs diffusers' AutoencoderKL.

    .venv/bin/python bench/vae.py                 # CPU fp32
    .venv/bin/python bench/vae.py --device cuda   # + CUDA fp16
    .venv/bin/python bench/vae.py --device cuda --cuda-only --report bench-gpu.md   # CUDA alone, as table rows

Both models hold the same random tensors (diffusers' weights mapped through our one diffusers->LDM
table); diffusers runs its default SDPA attention. Runs are interleaved; medians after warm-up;
ratio = ours / diffusers (< 1: ours faster).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import add_options, parse, reporter  # noqa: E402
from vae import AutoencoderKL, VAEConfig, diffusers_to_ldm  # noqa: E402


def build(device, dtype):
    from diffusers import AutoencoderKL as HFAutoencoderKL  # test-only oracle
    torch.manual_seed(0)
    ref = HFAutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                          sample_size=512).to(device, dtype).eval()
    cfg = VAEConfig.sd15()
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
    ours.load_state_dict(diffusers_to_ldm(ref.state_dict(), cfg), strict=True, assign=True)
    return ours.eval(), ref


def measure(device, dtype, batch, latent, warmup, repeats, report=reporter(None, "")):
    ours, ref = build(device, dtype)
    z = torch.randn(batch, 4, latent, latent, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    runs = {"ours": lambda: ours.decode(z), "diffusers": lambda: ref.decode(z).sample}
    times = {k: [] for k in runs}
    with torch.inference_mode():
        a, b = runs["ours"]().float(), runs["diffusers"]().float()
        err = ((a - b).abs().max() / b.abs().max()).item()
        for _ in range(warmup):
            for fn in runs.values():
                fn()
        for _ in range(repeats):
            for name, fn in runs.items():
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t)
    m_ours, m_ref = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    name = f"{device} {str(dtype).replace('torch.', '')} batch {batch} {latent * 8}x{latent * 8}"
    print(f"{name:30s} ours {m_ours * 1e3:9.1f} ms  diffusers {m_ref * 1e3:9.1f} ms  ratio {m_ours / m_ref:.3f}  "
          f"(rel diff {err:.1e})", flush=True)
    report(f"decode speed, {name}, median of {repeats}", f"{m_ours * 1e3:.1f} ms", f"diffusers {m_ref * 1e3:.1f} ms",
           f"{m_ours / m_ref:.3f}")
    report(f"decode max relative error vs diffusers, {name}", "", "", f"{err:.1e}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=None)
    add_options(ap, cuda_only=True)
    return parse(ap, argv)


def main():
    args = parse_args()
    report = reporter(args.report, "bench/vae.py")
    import diffusers
    print(f"SD v1.5 VAE decode, torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{torch.get_num_threads()} CPU threads", flush=True)
    if not args.cuda_only:
        measure("cpu", torch.float32, 1, 48, 1, args.repeats or 5, report)
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}", flush=True)
        measure(args.device, torch.float16, 1, 48, 5, args.repeats or 30, report)


if __name__ == "__main__":
    main()
