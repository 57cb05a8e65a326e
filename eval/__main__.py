r"""Score generated images: the paper's Tab. 3 (VQA, CLIP-I, CLIP-T and their SWDs) per model, and
scatter plots of the per-generation scores.

    python -m eval --manifest gens/manifest.jsonl --vqa gens/vqa_answers.jsonl \
        --clip clip-vit-large-patch14/ --out results/

Writes to --out: table.md, table.csv, results.json (the rows, counts, questions, unreadable images,
cache statistics), per_image.csv, clip-i_clip-t.png and clip-i_vqa.png. CLIP features are cached
under --cache (default OUT/cache) by file content, so adding a model's generations to the manifest
and running again only embeds the new images. The formats are in eval/README.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common.options import PRECISIONS


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", nargs="+", required=True, help="generation manifest(s), JSON lines")
    ap.add_argument("--vqa", nargs="+", default=[], help="VQA answers, JSON lines (without: no VQA columns)")
    ap.add_argument("--questions", nargs="+", default=None,
                    help="the VQA questions to score (default: every question in --vqa)")
    ap.add_argument("--clip", required=True, help="CLIP weights: model.safetensors or its folder "
                                                  "(openai/clip-vit-large-patch14 layout)")
    ap.add_argument("--clip-config", default=None, help="CLIPConfig JSON for weights that are not ViT-L/14 "
                                                        "(default: config.json beside the weights)")
    ap.add_argument("--tokenizer", default=None, help="folder with vocab.json + merges.txt (default: the weights' "
                                                      "folder when it has them, else the bundled CLIP vocabulary)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--cache", default=None, help="embedding cache folder (default: OUT/cache)")
    ap.add_argument("--no-cache", action="store_true", help="embed everything, read and write no cache")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--precision", choices=list(PRECISIONS), default=None,
                    help="default: fp16 on CUDA, fp32 on the CPU")
    ap.add_argument("--batch", type=int, default=32, help="images / texts per encoder call")
    ap.add_argument("--workers", type=int, default=4, help="threads reading and preprocessing images")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from common.weights import CheckpointError, resolve_file
    from .embed import (EmbeddingCache, FeatureExtractor, WeightsHashes, load_scorer_model, load_tokenizer,
                        model_identity)
    from .manifest import ManifestError, read_manifests, read_vqa
    from .score import answer_set, score_generations, summarize, write_outputs

    def fail(msg, code):
        print(f"python -m eval: error: {msg}", file=sys.stderr)
        return code

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return fail(f"--device {args.device}: CUDA is not available here", 2)
    args.precision = args.precision or ("fp16" if args.device.startswith("cuda") else "fp32")
    if args.precision == "fp16" and args.device == "cpu":
        return fail("--precision fp16 is not supported on the CPU; use fp32 or bf16", 2)
    if args.batch < 1 or args.workers < 0:
        return fail(f"--batch ({args.batch}) must be >= 1 and --workers ({args.workers}) >= 0", 2)

    try:
        gens = read_manifests(args.manifest)
        answers = {}
        for path in args.vqa:
            read_vqa(path, answers)
    except ManifestError as e:
        return fail(str(e), 2)
    if not gens:
        return fail(f"no generations in {', '.join(args.manifest)}", 2)
    questions = args.questions or list(dict.fromkeys(q for per_image in answers.values() for q in per_image))
    models = list(dict.fromkeys(g.model for g in gens))
    log(f"{len(gens)} generations of {len(models)} model(s): {', '.join(models)}; {len(questions)} VQA question(s)")

    start = time.perf_counter()
    dtype = getattr(torch, PRECISIONS[args.precision])
    try:
        model = load_scorer_model(args.clip, args.clip_config, device=args.device, dtype=dtype)
        tokenizer, tokenizer_id = load_tokenizer(args.clip, args.tokenizer, model.text_config.max_position_embeddings)
    except (CheckpointError, OSError, ValueError) as e:
        return fail(str(e), 1)
    out = Path(args.out)
    cache, identity = None, None
    if not args.no_cache:   # features are cached per model identity (weights' bytes, configs, tokenizer, dtype)
        cache_dir = Path(args.cache) if args.cache else out / "cache"
        weights_file = resolve_file(args.clip, ["model.safetensors"])
        identity = model_identity(WeightsHashes(cache_dir / "weights_sha256.json")(weights_file), model,
                                  tokenizer_id, dtype)
        cache = EmbeddingCache(cache_dir, identity)
    log(f"loaded CLIP {args.clip} on {args.device} in {args.precision} ({time.perf_counter() - start:.1f} s"
        + ("; no cache)" if cache is None else f"; identity {identity}, {len(cache.entries)} cached features)"))
    extractor = FeatureExtractor(model, tokenizer, cache=cache, batch_size=args.batch, workers=args.workers)

    def progress(what):
        t0 = time.perf_counter()

        def report(done, total):
            rate = done / max(time.perf_counter() - t0, 1e-9)
            end = "\n" if done == total else ""
            print(f"\r{what}: {done}/{total} ({rate:.1f}/s)", end=end, file=sys.stderr, flush=True)
        return report

    images = list(dict.fromkeys([g.image for g in gens] + [r for g in gens for r in g.refs]))
    image_feats = extractor.images(images, progress("images"))
    texts = [g.prompt for g in gens]
    ref_paths = list(dict.fromkeys(r for g in gens for r in g.refs))
    for path in [g.image for g in gens] + ref_paths:
        texts += answer_set(answers, path, questions) or []
    text_feats = extractor.texts(texts, progress("texts"))

    scored = score_generations(gens, image_feats, text_feats, answers, questions)
    rows = summarize(gens, scored)
    info = {"questions": questions,
            "references_without_answers": [r for r in ref_paths if questions and answer_set(answers, r, questions) is None],
            "unreadable": extractor.unreadable, "cache": extractor.stats,
            "clip": {"weights": str(args.clip), "identity": identity, "precision": args.precision,
                     "device": args.device}}
    files = write_outputs(out, rows, scored, info)
    for path, why in extractor.unreadable.items():
        log(f"unreadable: {path}: {why}")
    for r in rows:
        log(f"{r['model']}: {r['scored']}/{r['generations']} scored, {r['with_vqa']} with VQA answers")
    s = extractor.stats
    log(f"images embedded {s['images_embedded']}, from cache {s['images_cached']}; texts embedded "
        f"{s['texts_embedded']}, from cache {s['texts_cached']}")
    log(f"wrote {', '.join(str(f) for f in files.values())}")
    print(files["table.md"].read_text(encoding="utf-8").split("\n\n")[1])   # the table itself, on stdout
    return 0


if __name__ == "__main__":
    sys.exit(main())
