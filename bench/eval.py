"""Benchmark: scoring speed of `python -m eval` with CLIP ViT-L/14, and what the paper's protocol costs.

    .venv/bin/python bench/eval.py [--images 24] [--texts 32] [--batch 8] [--device cpu] [--precision fp32]
        [--report FILE]   # FILE: the results appended as Markdown table rows (bench/gpu.sh)

Random ViT-L/14 weights (no download; speed does not depend on the values). Generated images are
384 px PNGs written to a temporary folder; "images/s" is the whole path of the command (read, hash,
decode, CLIP preprocessing to 224 px, image tower), "encoder images/s" the image tower alone on
preprocessed pixels, "texts/s" the text tower on VQA-answer-long texts (77 tokens); batches are
timed one by one (image batches interleaved with tower-only ones), the median and the fastest
reported, with this process's CPU share (its CPU time / wall time x threads; on a shared machine,
below 1 means other processes took the cores). The projection
for the protocol (Sec. 3.1: 5000 generations) assumes 50 characters x 2 references, two VQA
questions answered for every generated and reference image (10,200 distinct answers) and 5 prompts,
with an empty cache.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import reporter  # noqa: E402
from clip import CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig, preprocess  # noqa: E402
from common.options import PRECISIONS  # noqa: E402
from eval.embed import FeatureExtractor, encode_images  # noqa: E402

ANSWER = ("The character in the image is a young girl with long blonde hair, wearing headphones and a tie. She "
          "appears to be smiling or posing happily while listening to music through her headphones. Her clothing "
          "consists of a white shirt, black tie, and pigtails.")   # Supp. A.2, Table 4


def write_images(folder: Path, n: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    paths = []
    for i in range(n):
        base = np.stack([np.sin(xx / (9 + c + i) + yy / (13 + 2 * c)) for c in range(3)], -1) * 90 + 128
        arr = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        paths.append(folder / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24, help="timed images (in batches of --batch, after one warm-up batch)")
    ap.add_argument("--texts", type=int, default=32, help="timed texts")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=384, help="generated image size (paper: 384)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=list(PRECISIONS), default=None,
                    help="default: fp16 on CUDA, fp32 on the CPU (as python -m eval)")
    ap.add_argument("--report", metavar="FILE", default=None, help="append the results as Markdown table rows")
    return ap.parse_args(argv)


def main():
    args = parse_args()
    precision = args.precision or ("fp16" if args.device.startswith("cuda") else "fp32")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]

    load_start = os.getloadavg()[0]
    torch.manual_seed(0)
    model = CLIPModel(CLIPTextConfig.vit_l14(), CLIPVisionConfig.vit_l14()).to(args.device, dtype).eval()
    tok = CLIPTokenizer.default()
    ex = FeatureExtractor(model, tok, batch_size=args.batch, workers=args.workers)   # no cache: everything embedded

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    cpu_share = []   # this process's CPU time / (wall time x threads): below 1 = other load took cores

    def timed(fn):
        sync()
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall = time.perf_counter() - t
        cpu_share.append((time.process_time() - c) / (wall * torch.get_num_threads()))
        return wall

    # Each batch is timed on its own and the median batch reported: this shared VM's load drifts.
    reps = max(1, args.images // args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), (reps + 1) * args.batch, args.size)
        chunks = [paths[i * args.batch:(i + 1) * args.batch] for i in range(reps + 1)]
        ex.images(chunks[0])                                # warm-up: allocator, kernels, thread pool
        ex.texts([f"{i} {ANSWER}" for i in range(args.batch)])
        pixels = preprocess([Image.open(p).convert("RGB") for p in chunks[0]])
        t_images, t_encoder = [], []
        for chunk in chunks[1:]:    # interleaved, so drifting machine load hits both alike
            t_images.append(timed(lambda: ex.images(chunk)))   # new files each time: nothing cached
            t_encoder.append(timed(lambda: encode_images(model, pixels)))
    assert ex.stats["images_cached"] == 0
    text_reps = max(1, args.texts // args.batch)
    texts = [[f"answer {r} {i}: {ANSWER}" for i in range(args.batch)] for r in range(text_reps)]
    t_texts = [timed(lambda: ex.texts(t)) for t in texts]

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"CLIP ViT-L/14 (random weights), {args.device} ({name}), {precision}, batch {args.batch}, "
          f"{args.workers} reader threads, torch {torch.__version__}; load average at start / end "
          f"{load_start:.2f} / {os.getloadavg()[0]:.2f}; CPU share of the timed runs "
          f"{min(cpu_share):.2f}-{max(cpu_share):.2f} (1 = all {torch.get_num_threads()} threads busy)")
    n_img, n_txt = 5000 + 100, 2 * (5000 + 100) + 5
    report = reporter(args.report, "bench/eval.py")
    setup = f"{args.device} {precision}, batch {args.batch}"
    rates = {}
    for label, times, unit in [(f"images ({args.size} px PNG: read, hash, decode, preprocess, encode)", t_images,
                                "images"),
                               ("image tower alone (preprocessed pixels)", t_encoder, "images"),
                               ("texts (77-token VQA answers, text tower)", t_texts, "texts")]:
        median, best = args.batch / statistics.median(times), args.batch / min(times)
        rates[label] = (median, best)
        print(f"{label:<66} {median:7.2f} {unit}/s median, {best:7.2f} fastest of {len(times)} batches")
        report(f"{label}, {setup}, median of {len(times)} batches", f"{median:.2f} {unit}/s", "", "")
    (img_med, img_best), _, (txt_med, txt_best) = rates.values()
    for what, img, txt in [("median", img_med, txt_med), ("fastest", img_best, txt_best)]:
        total = n_img / img + n_txt / txt
        print(f"projected for the 5000-image protocol from the {what} rates ({n_img} images, {n_txt} texts, empty "
              f"cache): {n_img / img / 60:.1f} min images + {n_txt / txt / 60:.1f} min texts = {total / 3600:.2f} h; "
              f"without VQA answers {(n_img / img + 5 / txt) / 3600:.2f} h")
        if what == "median":
            report(f"5000-image protocol projected from the median rates, {setup}", f"{total / 3600:.2f} h "
                   f"({(n_img / img + 5 / txt) / 3600:.2f} h without VQA)", "", "")


if __name__ == "__main__":
    main()
