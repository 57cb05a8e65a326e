"""Benchmark: SD v1.5's text encoder (CLIP ViT-L/14) forward, ours vs transformers, same weights.

    .venv/bin/python bench/clip_text.py [--batch 8] [--repeats 20] [--device cpu] [--dtype fp32]

Prints the median time of each and the ratio ours / transformers (< 1 means ours is faster).
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
from clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402
from common.options import PRECISIONS  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(PRECISIONS), default="fp32")
    args = ap.parse_args()
    import transformers  # test-only oracle, imported here and nowhere in runtime code

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    hf_cfg = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                         num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu")
    hf = transformers.CLIPTextModel(hf_cfg).eval()
    ours = CLIPTextModel(CLIPTextConfig.vit_l14()).eval()
    ours.load_state_dict({"text_model." + k: v for k, v in hf.state_dict().items()}, strict=True)
    hf.to(args.device, dtype)
    ours.to(args.device, dtype)

    prompts = ["a photograph of an astronaut riding a horse, highly detailed, 8k"] * args.batch
    ids = CLIPTokenizer.default()(prompts).to(args.device)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    run_ours = lambda: ours(ids)  # noqa: E731
    run_hf = lambda: hf(input_ids=ids).last_hidden_state  # noqa: E731
    with torch.inference_mode():
        err = ((run_ours().float() - run_hf().float()).abs().max() / run_hf().float().abs().max()).item()
        for _ in range(args.warmup):
            run_ours(), run_hf()
        t_ours, t_hf = [], []
        for _ in range(args.repeats):
            t_ours.append(timed(run_ours))
            t_hf.append(timed(run_hf))
    m_ours, m_hf = statistics.median(t_ours), statistics.median(t_hf)
    print(f"CLIP ViT-L/14 text encoder, batch {args.batch} x 77 tokens, {args.device} {args.dtype}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print(f"ours         median {m_ours * 1e3:8.2f} ms")
    print(f"transformers median {m_hf * 1e3:8.2f} ms")
    print(f"ratio ours/transformers = {m_ours / m_hf:.3f}   (relative output difference {err:.2e})")


if __name__ == "__main__":
    main()
