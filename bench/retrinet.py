"""Benchmark: one RetriUNet training step (forward + backward) at SD v1.5 size, 384 px (48x48
latents), batch 1, K = 1, 2, 4 references of 384 px. No reference implementation exists to compare
with; the plain SD U-Net step is measured beside it for scale.

    .venv/bin/python bench/retrinet.py                 # CPU fp32, default lock (E + cross-attn + decoder train)
    .venv/bin/python bench/retrinet.py --device cuda   # + CUDA fp16 autocast: time and peak memory,
                                                       #   gradient checkpointing off and on
    .venv/bin/python bench/retrinet.py --device cuda --cuda-only --report bench-gpu.md   # CUDA alone, table rows

On CUDA the reference cross-attention (2304 queries x K*2304 keys) is run with SDPA restricted to
the fused flash / memory-efficient kernels, so a fallback to the math kernel (which materialises the
attention matrix) raises instead of passing silently.
"""
import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import add_options, parse, reporter  # noqa: E402
from retrinet import RetriUNet  # noqa: E402
from unet import UNet, UNetConfig  # noqa: E402


def step_fn(model, k, device, dtype, batch=1, latent=48):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    ctx = torch.randn(batch, 77, 768, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    if k == 0:
        return lambda: model(x, t, ctx).float().square().mean().backward()
    refs = torch.randn(batch, k, 4, latent, latent, generator=g).to(device)
    ref_ctx = torch.randn(batch, k, 77, 768, generator=g).to(device)
    return lambda: model(x, t, ctx, refs, ref_ctx).float().square().mean().backward()


def run(model, k, device, dtype, warmup, repeats):
    fn = step_fn(model, k, device, dtype)
    amp = torch.autocast("cuda", dtype=dtype) if device.startswith("cuda") else nullcontext()
    kernels = nullcontext()
    if device.startswith("cuda"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernels = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
    times = []
    with amp, kernels:
        for i in range(warmup + repeats):
            model.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return statistics.median(times), peak


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--refs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=None)
    add_options(ap, cuda_only=True)
    return parse(ap, argv)


def rows(report, tag, what, sec, peak, repeats):
    """The step time and (CUDA) peak memory of one configuration as table rows."""
    setup = f"{what}, 384 px, batch 1, {tag.strip()}"
    report(f"training step (fwd+bwd), {setup}, median of {repeats}", f"{sec:.3f} s/step")
    if peak is not None:
        report(f"peak memory of that step, {setup}", f"{peak:.2f} GiB")


def main():
    args = parse_args()
    report = reporter(args.report, "bench/retrinet.py")
    print(f"RetriUNet training step, SD v1.5 size, 384 px (48x48 latents), batch 1, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads", flush=True)
    runs = [] if args.cuda_only else [("cpu", torch.float32)]
    for device, dtype in runs + ([(args.device, torch.float16)] if args.device != "cpu" else []):
        torch.manual_seed(0)
        with torch.device(device):  # initialised where it runs: 860M parameters are slow to fill on the CPU
            unet = UNet(UNetConfig.sd15()).train()
            model = RetriUNet(unet).train()
        ckpts = (False, True) if device.startswith("cuda") else (False,)
        warmup, repeats = (1, args.repeats or 2) if device == "cpu" else (3, args.repeats or 10)
        for ckpt in ckpts:
            unet.gradient_checkpointing = model.retrinet.encoder.gradient_checkpointing = ckpt
            plain_params = [p.requires_grad for p in unet.parameters()]
            unet.requires_grad_(True)  # the plain SD step trains the whole U-Net, for scale
            sec, peak = run(unet, 0, device, dtype, warmup, repeats)
            for p, r in zip(unet.parameters(), plain_params):
                p.requires_grad_(r)
            tag = f"{device} {'fp16 autocast' if device != 'cpu' else 'fp32'} checkpointing {'on ' if ckpt else 'off'}"
            print(f"{tag}  SD U-Net alone   {sec:8.3f} s/step" + (f"  peak {peak:6.2f} GiB" if peak else ""), flush=True)
            rows(report, tag, "SD U-Net alone (whole U-Net trainable)", sec, peak, repeats)
            for k in args.refs:
                sec, peak = run(model, k, device, dtype, warmup, repeats)
                print(f"{tag}  RetriUNet K={k}    {sec:8.3f} s/step" + (f"  peak {peak:6.2f} GiB" if peak else ""),
                      flush=True)
                rows(report, tag, f"RetriUNet K={k}", sec, peak, repeats)
        del model, unet


if __name__ == "__main__":
    main()
