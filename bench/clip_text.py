"""Benchmark: SD v1.5's text encoder (CLIP ViT-L/14) forward, ours vs transformers, same weights.

    .venv/bin/python bench/clip_text.py [--batch 8] [--repeats 20] [--device cpu] [--dtype fp32]
    .venv/bin/python bench/clip_text.py --tower vision [--vision-config h14]   # image tower + projection

Prints the median time of each and the ratio ours / transformers (< 1 means ours is faster).
`--tower vision` times our CLIPVisionModelWithProjection against transformers' (random weights
shared, pixels (batch, 3, 224, 224)): ViT-H/14 is the IP-Adapter's image encoder (exact GELU),
ViT-L/14 the evaluation's image tower (quick_gelu).
Both run under torch.inference_mode with transformers' default (SDPA) attention. Runs are
interleaved so that drifting machine load hits both alike.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import reporter  # noqa: E402
from clip import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,  # noqa: E402
                  CLIPVisionModelWithProjection)
from common.options import PRECISIONS  # noqa: E402

VISION = {"h14": ("ViT-H/14", CLIPVisionConfig.vit_h14), "l14": ("ViT-L/14", CLIPVisionConfig.vit_l14)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(PRECISIONS), default="fp32")
    ap.add_argument("--tower", choices=["text", "vision"], default="text")
    ap.add_argument("--vision-config", choices=list(VISION), default="h14", help="the image tower of --tower vision")
    ap.add_argument("--report", metavar="FILE", default=None, help="append the results as Markdown table rows")
    return ap.parse_args(argv)


def text_models(args, dtype, transformers):
    """Ours and transformers' text encoder with the same random weights, and their forwards."""
    hf_cfg = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                         num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu")
    hf = transformers.CLIPTextModel(hf_cfg).eval()
    ours = CLIPTextModel(CLIPTextConfig.vit_l14()).eval()
    ours.load_state_dict({"text_model." + k: v for k, v in hf.state_dict().items()}, strict=True)
    hf.to(args.device, dtype)
    ours.to(args.device, dtype)

    prompts = ["a photograph of an astronaut riding a horse, highly detailed, 8k"] * args.batch
    ids = CLIPTokenizer.default()(prompts).to(args.device)
    return lambda: ours(ids), lambda: hf(input_ids=ids).last_hidden_state


def vision_models(args, dtype, transformers):
    """Ours and transformers' CLIPVisionModelWithProjection with the same random weights (built on the
    device: a CPU init of ViT-H/14's 632M parameters takes long), and their forwards (image_embeds)."""
    cfg = VISION[args.vision_config][1]()
    with torch.device(args.device):
        hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**vars(cfg))).eval()
        ours = CLIPVisionModelWithProjection(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # same key names
    hf.to(dtype)
    ours.to(dtype)
    pixels = torch.randn(args.batch, 3, cfg.image_size, cfg.image_size,
                         generator=torch.Generator().manual_seed(1)).to(args.device, dtype)
    return lambda: ours(pixels), lambda: hf(pixel_values=pixels).image_embeds


def main():
    args = parse_args()
    import transformers  # test-only oracle, imported here and nowhere in runtime code

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    models = text_models if args.tower == "text" else vision_models
    run_ours, run_hf = models(args, dtype, transformers)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    with torch.inference_mode():
        err = ((run_ours().float() - run_hf().float()).abs().max() / run_hf().float().abs().max()).item()
        for _ in range(args.warmup):
            run_ours(), run_hf()
        t_ours, t_hf = [], []
        for _ in range(args.repeats):
            t_ours.append(timed(run_ours))
            t_hf.append(timed(run_hf))
    m_ours, m_hf = statistics.median(t_ours), statistics.median(t_hf)
    if args.tower == "text":
        what = f"CLIP ViT-L/14 text encoder, batch {args.batch} x 77 tokens"
    else:
        what = f"CLIP {VISION[args.vision_config][0]} image tower with projection, batch {args.batch} x 224x224"
    print(f"{what}, {args.device} {args.dtype}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print(f"ours         median {m_ours * 1e3:8.2f} ms")
    print(f"transformers median {m_hf * 1e3:8.2f} ms")
    print(f"ratio ours/transformers = {m_ours / m_hf:.3f}   (relative output difference {err:.2e})")
    report = reporter(args.report, "bench/clip_text.py")
    name = f"{what}, {args.device} {args.dtype}"
    report(f"speed, {name}, median of {args.repeats}", f"{m_ours * 1e3:.2f} ms", f"transformers {m_hf * 1e3:.2f} ms",
           f"{m_ours / m_hf:.3f}")
    report(f"max relative error vs transformers, {name}", "", "", f"{err:.1e}")


if __name__ == "__main__":
    main()
