r"""Score generated images: the paper's Tab. 3 (VQA, CLIP-I, CLIP-T and their SWDs) per model, and
scatter plots of the per-generation scores.

    python -m eval --manifest gens/manifest.jsonl --vqa gens/vqa_answers.jsonl \
        --clip clip-vit-large-patch14/ --out results/

Writes to --out: table.md, table.csv, results.json (the rows, counts, questions, unreadable images,
cache statistics), per_image.csv, clip-i_clip-t.png and clip-i_vqa.png. CLIP features are cached
under --cache (default OUT/cache) by file content, so adding a model's generations to the manifest
and running again only embeds the new images. The formats are in eval/README.md.

Arguments are checked first (status 2: --device, --batch, a writable --out and --cache, the
manifests). The results are written into a hidden folder in --out and renamed into place, so a
full disk or a read-only folder leaves an earlier run's results as they were: one line naming the
file, status 1.
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


def write_results(out: Path, write_outputs, *data) -> dict[str, Path]:
    """`write_outputs(folder, *data)` (eval.score) into a hidden staging folder inside `out`, then
    each file renamed into `out`: a full disk or a read-only folder leaves the results of an earlier
    run as they were and no partial file. OSError names the file being written when it failed
    (common.images.WriteError)."""
    import os
    import shutil
    from common.images import WriteError
    stage = out / f".partial-{os.getpid()}"
    try:
        staged = write_outputs(stage, *data)
        for f in staged.values():
            os.replace(f, out / f.name)
    except OSError as e:
        # The file being written: the one the error names, else the last one the writer created
        # (they are written in the order write_outputs returns them).
        failed = Path(e.filename).name if getattr(e, "filename", None) else None
        if failed is None:
            made = [name for name in ("table.md", "table.csv", "results.json", "per_image.csv", "clip-i_clip-t.png",
                                      "clip-i_vqa.png") if (stage / name).exists()]
            failed = made[-1] if made else "table.md"
        raise WriteError(out / failed, e) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {name: out / f.name for name, f in staged.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    from safetensors import SafetensorError

    from common.options import default_precision, device_problems, out_problems, resolve_device, torch_dtype
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

    args.device = resolve_device(args.device)
    args.precision = args.precision or default_precision(args.device)
    problems = device_problems(args.device, args.precision)
    if args.batch < 1 or args.workers < 0:
        problems.append(f"--batch ({args.batch}) must be >= 1 and --workers ({args.workers}) >= 0")
    problems += out_problems(args.out)
    if not args.no_cache and args.cache:
        problems += out_problems(args.cache, "--cache")
    if problems:
        for p in problems:
            fail(p, 2)
        return 2

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
    dtype = torch_dtype(args.precision)
    try:
        model = load_scorer_model(args.clip, args.clip_config, device=args.device, dtype=dtype)
        tokenizer, tokenizer_id = load_tokenizer(args.clip, args.tokenizer, model.text_config.max_position_embeddings)
    except (CheckpointError, OSError, ValueError) as e:
        return fail(str(e), 1)
    out = Path(args.out)
    cache, identity = None, None
    cache_dir = Path(args.cache) if args.cache else out / "cache"
    if not args.no_cache:   # features are cached per model identity (weights' bytes, configs, tokenizer, dtype)
        weights_file = resolve_file(args.clip, ["model.safetensors"])
        try:
            identity = model_identity(WeightsHashes(cache_dir / "weights_sha256.json")(weights_file), model,
                                      tokenizer_id, dtype)
        except OSError as e:
            return fail(f"--cache {cache_dir}: cannot write {cache_dir / 'weights_sha256.json'} "
                        f"({e.strerror or e}); free space or pass --no-cache", 1)
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
    texts = [g.prompt for g in gens]
    ref_paths = list(dict.fromkeys(r for g in gens for r in g.refs))
    for path in [g.image for g in gens] + ref_paths:
        texts += answer_set(answers, path, questions) or []
    try:  # the cache is flushed as features come: a full disk shows here
        image_feats = extractor.images(images, progress("images"))
        text_feats = extractor.texts(texts, progress("texts"))
    except (OSError, SafetensorError) as e:
        return fail(f"--cache {cache_dir}: cannot write the embedding cache ({getattr(e, 'strerror', None) or e}); "
                    f"free space or pass --no-cache", 1)

    scored = score_generations(gens, image_feats, text_feats, answers, questions)
    rows = summarize(gens, scored)
    info = {"questions": questions,
            "references_without_answers": [r for r in ref_paths if questions and answer_set(answers, r, questions) is None],
            "unreadable": extractor.unreadable, "cache": extractor.stats,
            "clip": {"weights": str(args.clip), "identity": identity, "precision": args.precision,
                     "device": args.device}}
    try:
        files = write_results(out, write_outputs, rows, scored, info)
    except OSError as e:
        return fail(f"{e}; the results already in {out} are as they were", 1)
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
