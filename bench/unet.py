"""Benchmark: SD v1.5 U-Net, ours vs diffusers' UNet2DConditionModel, same random weights, one run.

    .venv/bin/python bench/unet.py                 # CPU fp32, batch 1, 32x32 latents: speed, and peak
                                                   #   memory of forward+backward (fresh processes)
    .venv/bin/python bench/unet.py --device cuda   # + CUDA fp16 batch 2 at 48x48 and 64x64, and
                                                   #   peak memory of forward+backward at 48x48
    .venv/bin/python bench/unet.py --device cuda --cuda-only --report bench-gpu.md
                                                   # the CUDA part alone, rows appended to a Markdown table

Both models hold the very same tensors (ours is built on the meta device and takes diffusers'
weights through our one diffusers->LDM table), diffusers runs its default SDPA attention. Runs are
interleaved; medians after warm-up; ratio = ours / diffusers (< 1: ours faster or smaller).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import add_options, parse, reporter  # noqa: E402
from unet import UNet, UNetConfig, diffusers_to_ldm  # noqa: E402

NO_REPORT = reporter(None, "")


def build(device, dtype):
    from diffusers import UNet2DConditionModel  # test-only oracle
    cfg = UNetConfig.sd15()
    torch.manual_seed(0)
    with torch.device(device):  # filled where it runs: 860M parameters take seconds to fill on the CPU
        ref = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).to(dtype)
    with torch.device("meta"):
        ours = UNet(cfg)
    ours.load_state_dict(diffusers_to_ldm(ref.state_dict(), cfg), strict=True, assign=True)
    return ours, ref


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_pair(fn_ours, fn_ref, device, warmup, repeats):
    with torch.inference_mode():
        for _ in range(warmup):
            fn_ours(), fn_ref()
        t_ours, t_ref = [], []
        for _ in range(repeats):
            for fn, acc in ((fn_ours, t_ours), (fn_ref, t_ref)):
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                acc.append(time.perf_counter() - t)
    return statistics.median(t_ours), statistics.median(t_ref)


def speed(ours, ref, device, dtype, batch, size, warmup, repeats, report=NO_REPORT):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, size, size, generator=g).to(device, dtype)
    t = torch.full((batch,), 500, device=device)
    ctx = torch.randn(batch, 77, 768, generator=g).to(device, dtype)
    with torch.inference_mode():
        a, b = ours(x, t, ctx).float(), ref(x, t, ctx).sample.float()
        err = ((a - b).abs().max() / b.abs().max()).item()
    m_ours, m_ref = time_pair(lambda: ours(x, t, ctx), lambda: ref(x, t, ctx).sample, device, warmup, repeats)
    name = f"{device} {str(dtype).replace('torch.', '')} batch {batch} {size}x{size}"
    print(f"{name:32s} ours {m_ours * 1e3:9.1f} ms  diffusers {m_ref * 1e3:9.1f} ms  ratio {m_ours / m_ref:.3f}  "
          f"(rel diff {err:.1e})", flush=True)
    report(f"speed, {name}, median of {repeats}", f"{m_ours * 1e3:.1f} ms", f"diffusers {m_ref * 1e3:.1f} ms",
           f"{m_ours / m_ref:.3f}")
    report(f"max relative error vs diffusers, {name}", "", "", f"{err:.1e}")


def peak_memory(ours, ref, device, dtype, batch, size, report=NO_REPORT):
    """Peak CUDA memory of one forward+backward (training step without the optimizer)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 4, size, size, generator=g).to(device, dtype)
    t = torch.full((batch,), 500, device=device)
    ctx = torch.randn(batch, 77, 768, generator=g).to(device, dtype)
    for ckpt in (False, True):
        ours.gradient_checkpointing = ckpt
        if ckpt:
            ref.enable_gradient_checkpointing()
        else:
            ref.disable_gradient_checkpointing()
        peaks = []
        for fn in (lambda: ours(x, t, ctx), lambda: ref(x, t, ctx).sample):
            ours.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn().float().square().mean().backward()
            torch.cuda.synchronize()
            peaks.append((torch.cuda.max_memory_allocated() - base) / 2**30)
        print(f"peak fwd+bwd {device} {str(dtype).replace('torch.', '')} batch {batch} {size}x{size} "
              f"checkpointing {'on ' if ckpt else 'off'}: ours {peaks[0]:.2f} GiB  diffusers {peaks[1]:.2f} GiB  "
              f"ratio {peaks[0] / peaks[1]:.3f}", flush=True)
        report(f"peak memory fwd+bwd, {device} {str(dtype).replace('torch.', '')} batch {batch} {size}x{size}, "
               f"checkpointing {'on' if ckpt else 'off'}", f"{peaks[0]:.2f} GiB", f"diffusers {peaks[1]:.2f} GiB",
               f"{peaks[0] / peaks[1]:.3f}")
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)


def cpu_peak_child(which: str, ckpt: bool) -> None:
    """Run in a fresh process: peak resident memory added by one fp32 forward+backward on the CPU,
    batch 1, 32x32 latents (ru_maxrss after minus before; the weights and their gradients, equal in
    both models, are allocated before the baseline is read)."""
    import resource
    ours, ref = build("cpu", torch.float32)
    model = ours if which == "ours" else ref
    del ours, ref
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    if which == "ours":
        model.gradient_checkpointing = ckpt
    elif ckpt:
        model.enable_gradient_checkpointing()
    model.train()
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = model(x, t, ctx)
    out = out if torch.is_tensor(out) else out.sample
    out.square().mean().backward()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20)


def cpu_peaks(report=NO_REPORT) -> None:
    import subprocess
    for ckpt in (False, True):
        peaks = []
        for which in ("ours", "diffusers"):
            out = subprocess.run([sys.executable, __file__, "--peak-child", which, "on" if ckpt else "off"],
                                 capture_output=True, text=True, check=True).stdout
            peaks.append(float(out.strip().splitlines()[-1]))
        print(f"peak fwd+bwd cpu float32 batch 1 32x32 checkpointing {'on ' if ckpt else 'off'}: "
              f"ours {peaks[0]:.2f} GiB  diffusers {peaks[1]:.2f} GiB  ratio {peaks[0] / peaks[1]:.3f}", flush=True)
        report(f"peak memory fwd+bwd (ru_maxrss), cpu float32 batch 1 32x32, "
               f"checkpointing {'on' if ckpt else 'off'}", f"{peaks[0]:.2f} GiB", f"diffusers {peaks[1]:.2f} GiB",
               f"{peaks[0] / peaks[1]:.3f}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda to add the GPU measurements")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per model (default: cpu 10, cuda 30)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory measurement")
    add_options(ap, cuda_only=True)
    ap.add_argument("--peak-child", nargs=2, metavar=("WHICH", "CKPT"), help=argparse.SUPPRESS)
    return parse(ap, argv)


def main():
    args = parse_args()
    if args.peak_child:
        return cpu_peak_child(args.peak_child[0], args.peak_child[1] == "on")
    import diffusers
    print(f"SD v1.5 U-Net, torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{torch.get_num_threads()} CPU threads", flush=True)

    report = reporter(args.report, "bench/unet.py")
    if not args.cuda_only:
        ours, ref = build("cpu", torch.float32)
        ours.eval(), ref.eval()
        speed(ours, ref, "cpu", torch.float32, 1, 32, args.warmup or 2, args.repeats or 10, report)
        del ours, ref
        if not args.no_memory:
            cpu_peaks(report)

    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}", flush=True)
        ours, ref = build(args.device, torch.float16)
        ours.eval(), ref.eval()
        for size in (48, 64):
            speed(ours, ref, args.device, torch.float16, 2, size, args.warmup or 5, args.repeats or 30, report)
        ours.train(), ref.train()
        peak_memory(ours, ref, args.device, torch.float16, 2, 48, report)


if __name__ == "__main__":
    main()
