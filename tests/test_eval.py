"""Evaluation (paper Sec. 3.1, Sec. 4, Supp. A.2): SWD and its bound, CLIP-I / CLIP-T / VQA equal to
transformers on random weights, `python -m eval` end to end (tables, plots, cache, missing answers,
unreadable images, bad manifests) and the protocol runner with resume."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

import eval.__main__ as eval_cli
from clip import CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig
from clip.tokenizer import write_vocab_files
from eval.embed import FeatureExtractor
from eval.manifest import Generation, read_manifest
from eval.metrics import clip_i, clip_t, cosine, swd, vqa_score
from eval.score import score_generations, summarize
from helpers import randomize_

ROOT = Path(__file__).resolve().parents[1]

# A small, odd-shaped CLIP with CLIP's real vocabulary (so the bundled tokenizer can feed it).
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=24, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407)
VISION = dict(hidden_size=36, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3, image_size=30,
              patch_size=6, projection_dim=24)
Q1 = "Describe the character's facial expressions and hairstyles."
Q2 = "Describe the character's poses, clothing and current actions."


# ---- SWD ----------------------------------------------------------------------------------------

def test_swd_hand_computed():
    # sim = (1, 0.5), div = (0.2, 0.4): mean(sim * div) = (0.2 + 0.2) / 2 = 0.2;
    # bound = sqrt(mean(1, 0.25) * mean(0.04, 0.16)) = sqrt(0.625 * 0.1) = 0.25.
    value, bound = swd(torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([0.2, 0.4], dtype=torch.float64))
    assert value == pytest.approx(0.2, abs=1e-12) and bound == pytest.approx(0.25, abs=1e-12)
    # three generations: (0.7*0.2 + 0.6*0.3 + 0.8*0.1) / 3 = 0.4 / 3; bound sqrt((1.49/3) * (0.14/3))
    value, bound = swd([0.7, 0.6, 0.8], [0.2, 0.3, 0.1])
    assert value == pytest.approx(0.4 / 3, abs=1e-12)
    assert bound == pytest.approx(math.sqrt(1.49 / 3 * 0.14 / 3), abs=1e-12)
    with pytest.raises(ValueError, match="same number"):
        swd([0.1, 0.2], [0.3])


def test_swd_never_exceeds_its_bound_and_reaches_it_when_proportional():
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(1, 60, (1,), generator=g))
        sim = torch.rand(n, generator=g, dtype=torch.float64)
        div = torch.rand(n, generator=g, dtype=torch.float64) * (trial % 3 + 0.1)
        value, bound = swd(sim, div)
        assert value <= bound * (1 + 1e-12)
        if n > 1 and not torch.allclose(div / sim, (div / sim)[0].expand(n)):
            assert value < bound
        c = float(torch.rand(1, generator=g)) * 3 + 0.01
        value, bound = swd(sim, c * sim)   # div proportional to sim: equality
        assert value == pytest.approx(bound, rel=1e-12)


def _features(sim, div):
    """Unit features with cos(image, ref) = sim and cos(image, prompt) = div: image e1, reference
    sim e1 + sqrt(1 - sim^2) e2, prompt div e1 + sqrt(1 - div^2) e3."""
    image = torch.tensor([1.0, 0, 0, 0])
    ref = torch.tensor([sim, math.sqrt(1 - sim ** 2), 0, 0])
    text = torch.tensor([div, 0, math.sqrt(1 - div ** 2), 0])
    return image, ref, text


def test_sec4_example_split_model_scores_lower_than_balanced():
    """Paper Sec. 4: two models with equal mean CLIP-I and CLIP-T; one balanced, one split into halves
    that copy the reference (high CLIP-I, low CLIP-T) or follow the text (the reverse). CLIP-I and
    CLIP-T cannot tell them apart; SWD(CLIP-I, CLIP-T) ranks the split one lower."""
    n = 20
    plan = {"balanced": [(0.7, 0.25)] * n, "split": [(0.9, 0.1)] * (n // 2) + [(0.5, 0.4)] * (n // 2)}
    gens, image_feats, text_feats = [], {}, {}
    for model, pairs in plan.items():
        for i, (sim, div) in enumerate(pairs):
            image, ref, text = _features(sim, div)
            g = Generation(Path(f"/g/{model}/{i}.png"), [Path(f"/r/{model}/{i}.png")], f"{model} {i}", 0, i, model,
                           "c")
            gens.append(g)
            image_feats[g.image], image_feats[g.refs[0]], text_feats[g.prompt] = image, ref, text
    rows = {r["model"]: r for r in summarize(gens, score_generations(gens, image_feats, text_feats, {}, []))}
    b, s = rows["balanced"], rows["split"]
    assert b["CLIP-I"] == pytest.approx(s["CLIP-I"], abs=1e-6) == pytest.approx(0.7, abs=1e-6)
    assert b["CLIP-T"] == pytest.approx(s["CLIP-T"], abs=1e-6) == pytest.approx(0.25, abs=1e-6)
    assert b["CLIP-I_CLIP-T"] == pytest.approx(0.175, abs=1e-6)                 # 0.7 * 0.25
    assert s["CLIP-I_CLIP-T"] == pytest.approx((0.09 + 0.2) / 2, abs=1e-6)      # 0.145
    assert s["CLIP-I_CLIP-T"] < b["CLIP-I_CLIP-T"]
    assert b["CLIP-I_CLIP-T bound"] == pytest.approx(b["CLIP-I_CLIP-T"], abs=1e-6)  # one balance: the bound
    assert s["CLIP-I_CLIP-T"] < s["CLIP-I_CLIP-T bound"]
    assert b["VQA"] is None and b["with_vqa"] == 0 and b["without_vqa"] == n       # no answers given


# ---- metrics on features equal transformers' -------------------------------------------------------

def _hf_clip(seed=21):
    cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)
    cfg._attn_implementation = "eager"
    return randomize_(transformers.CLIPModel(cfg).eval(), seed)


def _ours(hf):
    ours = CLIPModel(CLIPTextConfig.from_hf(TEXT), CLIPVisionConfig.from_hf(VISION)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours


def _image(path, w, h, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (3 + c + seed % 5) + yy / (5 + 2 * c)) for c in range(3)], -1) * 90 + 128
    arr = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


class Oracle:
    """transformers' CLIPModel, CLIPImageProcessor and CLIPTokenizer: the reference features."""

    def __init__(self, hf, tmp):
        self.hf = hf
        self.proc = transformers.CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
        vocab, merges = write_vocab_files(tmp / "tok")
        self.tok = transformers.CLIPTokenizer(str(vocab), str(merges), pad_token="<|endoftext|>", model_max_length=77)

    @torch.no_grad()
    def images(self, paths):
        pixels = self.proc(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt").pixel_values
        return self.hf.get_image_features(pixel_values=pixels).pooler_output

    @torch.no_grad()
    def texts(self, texts):
        ids = self.tok(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return self.hf.get_text_features(input_ids=ids).pooler_output


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return Oracle(_hf_clip(), tmp_path_factory.mktemp("oracle"))


def test_clip_i_clip_t_vqa_equal_transformers(oracle, tmp_path):
    ours = _ours(oracle.hf)
    paths = [_image(tmp_path / f"{i}.png", w, h, i) for i, (w, h) in enumerate([(40, 52), (61, 33), (30, 30),
                                                                                  (97, 45), (50, 77)])]
    texts = ["1girl, solo, smiling, on a beach", "a character in a red dress, sitting on a bench",
             "long " * 90 + "hair"]   # > 75 tokens: truncated alike
    ex = FeatureExtractor(ours, CLIPTokenizer.default(), batch_size=2, workers=2)
    feats = ex.images(paths)
    tfeats = ex.texts(texts)
    ref_img, ref_txt = oracle.images(paths), oracle.texts(texts)
    ours_img = torch.stack([feats[p] for p in paths])
    ours_txt = torch.stack([tfeats[t] for t in texts])
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert rel(ours_img, ref_img) <= 1e-4 and rel(ours_txt, ref_txt) <= 1e-4
    assert ex.stats["texts_truncated"] == 1 and ex.stats["images_embedded"] == 5

    cos = torch.nn.functional.cosine_similarity
    # CLIP-I: images 0, 1 against references (2, 3) and (4, padding)
    got = clip_i(ours_img[:2], torch.stack([ours_img[[2, 3]], ours_img[[4, 4]]]), torch.tensor([[1, 1], [1, 0]]).bool())
    want = torch.stack([(cos(ref_img[0], ref_img[2], dim=0) + cos(ref_img[0], ref_img[3], dim=0)) / 2,
                        cos(ref_img[1], ref_img[4], dim=0)])
    assert torch.allclose(got, want, atol=1e-5)
    # CLIP-T: raw cosines, as transformers' logits_per_image / logit_scale
    got = clip_t(ours_img[:3], ours_txt)
    with torch.no_grad():
        ids = oracle.tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        pixels = oracle.proc(images=[Image.open(p).convert("RGB") for p in paths[:3]], return_tensors="pt").pixel_values
        logits = oracle.hf(input_ids=ids, pixel_values=pixels).logits_per_image
    want = logits.diagonal() / oracle.hf.logit_scale.exp()
    assert torch.allclose(got, want, atol=1e-5)
    # VQA: 1 - cosine of answer features, averaged over the two questions
    a, r = ours_txt[[0, 1]], ours_txt[[1, 2]]     # image answers (Q1, Q2) vs reference answers
    got = vqa_score(a[None], r[None, None])
    ra, rr = ref_txt[[0, 1]], ref_txt[[1, 2]]
    want = 1 - (cos(ra[0], rr[0], dim=0) + cos(ra[1], rr[1], dim=0)) / 2
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    assert vqa_score(a[None], a[None, None]).item() == pytest.approx(0, abs=1e-6)   # same answers: no diversity
    assert torch.allclose(cosine(ours_img, ours_img), torch.ones(5), atol=1e-6)


# ---- python -m eval end to end --------------------------------------------------------------------

def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def clip_folder(oracle, tmp_path_factory):
    """The random CLIP as openai/clip-vit-large-patch14's files: model.safetensors + config.json."""
    folder = tmp_path_factory.mktemp("clip")
    oracle.hf.config.to_json_file(folder / "config.json")
    save_file({k: v.contiguous() for k, v in oracle.hf.state_dict().items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder


def _dataset(root):
    """Two models over two characters (one with two references); m1 has an image without answers,
    m2 an image that is not a PNG, one reference of c2 has no answers."""
    (root / "refs").mkdir(parents=True)
    refs = {"c1": [_image(root / "refs" / "c1.png", 48, 64, 100)],
            "c2": [_image(root / "refs" / "c2a.png", 64, 48, 101), _image(root / "refs" / "c2b.png", 50, 50, 102)]}
    prompts = {"c1": "1girl, smiling, on a beach", "c2": "1girl, sitting on a bench, red dress"}
    gens, seed = [], 200
    for model in ("m1", "m2"):
        (root / model).mkdir()
        for c in ("c1", "c2"):
            for i in range(2):
                p = _image(root / model / f"{c}-{i}.png", 40 + 3 * i, 44, seed)
                seed += 1
                gens.append({"image": f"{model}/{c}-{i}.png", "refs": [f"refs/{r.name}" for r in refs[c]],
                             "prompt": prompts[c], "seed": 0, "sample": i, "model": model, "character": c})
    (root / "m2" / "c2-1.png").write_bytes(b"not a png at all")
    answers = []
    for g in gens:
        if g["image"] != "m1/c2-0.png":
            answers += [{"image": g["image"], "question": Q1, "answer": f"{g['image']} looks happy, long hair"},
                        {"image": g["image"], "question": Q2, "answer": f"{g['image']} is standing, arms raised"}]
    answers += [{"image": "refs/c1.png", "question": Q1, "answer": "calm, short hair"},
                {"image": "refs/c1.png", "question": Q2, "answer": "sitting, school uniform " + "very " * 80},
                {"image": "refs/c2a.png", "question": Q1, "answer": "cheerful, ponytail"},
                {"image": "refs/c2a.png", "question": Q2, "answer": "waving, red dress"},
                {"image": "refs/c2b.png", "question": Q1, "answer": "only one of two questions"}]
    return _write_jsonl(root / "manifest.jsonl", gens), _write_jsonl(root / "vqa.jsonl", answers), gens, answers


def _expected(oracle, root, gens, answers):
    """Each model's Tab. 3 row from transformers' features, computed independently."""
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=0).item()  # noqa: E731
    ans = {}
    for a in answers:
        ans.setdefault(a["image"], {})[a["question"]] = a["answer"]
    full = lambda img: img in ans and Q1 in ans[img] and Q2 in ans[img]  # noqa: E731
    rows = {}
    for model in ("m1", "m2"):
        ci, ct, vq = [], [], []
        for g in gens:
            if g["model"] != model or g["image"] == "m2/c2-1.png":
                continue
            img = oracle.images([root / g["image"]])[0]
            refs = oracle.images([root / r for r in g["refs"]])
            c_i = sum(cos(img, r) for r in refs) / len(refs)
            c_t = cos(img, oracle.texts([g["prompt"]])[0])
            ci.append(c_i)
            ct.append(c_t)
            answered = [r for r in g["refs"] if full(r)]
            if full(g["image"]) and answered:
                mine = oracle.texts([ans[g["image"]][Q1], ans[g["image"]][Q2]])
                d = [1 - (cos(mine[0], t[0]) + cos(mine[1], t[1])) / 2
                     for t in (oracle.texts([ans[r][Q1], ans[r][Q2]]) for r in answered)]
                vq.append((sum(d) / len(d), c_i, c_t))
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        rows[model] = {"CLIP-I": mean(ci), "CLIP-T": mean(ct), "VQA": mean([v for v, _, _ in vq]),
                       "CLIP-I_CLIP-T": mean([a * b for a, b in zip(ci, ct)]),
                       "VQA_CLIP-I": mean([v * a for v, a, _ in vq]), "VQA_CLIP-T": mean([v * b for v, _, b in vq]),
                       "CLIP-I_CLIP-T bound": math.sqrt(mean([a * a for a in ci]) * mean([b * b for b in ct]))}
    return rows


def _read_csv(path):
    with open(path, newline="") as f:
        return {r["model"]: r for r in csv.DictReader(f)}


def _valid_png(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 400 and im.height > 400
        arr = np.asarray(im.convert("RGB"))
    return arr


def test_cli_end_to_end_tables_plots_cache(oracle, clip_folder, tmp_path, capsys):
    root = tmp_path / "gens"
    manifest, vqa, gens, answers = _dataset(root)
    out = tmp_path / "out"
    rc = eval_cli.main(["--manifest", str(manifest), "--vqa", str(vqa), "--clip", str(clip_folder), "--out", str(out),
                        "--batch", "3", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "| m1 |" in captured.out and "VQA_CLIP-I" in captured.out

    rows = _read_csv(out / "table.csv")
    want = _expected(oracle, root, gens, answers)
    for model in ("m1", "m2"):
        for col, value in want[model].items():
            assert float(rows[model][col]) == pytest.approx(value, abs=1e-5), (model, col)
    # accounting: m1 lost one image's VQA (no answers), m2 one whole generation (unreadable)
    assert {k: rows["m1"][k] for k in ("generations", "scored", "unreadable", "with_vqa", "without_vqa")} == \
        dict(generations="4", scored="4", unreadable="0", with_vqa="3", without_vqa="1")
    assert {k: rows["m2"][k] for k in ("generations", "scored", "unreadable", "with_vqa", "without_vqa")} == \
        dict(generations="4", scored="3", unreadable="1", with_vqa="3", without_vqa="0")
    results = json.loads((out / "results.json").read_text())
    bad = str(root / "m2" / "c2-1.png")
    assert list(results["unreadable"]) == [bad] and "cannot decode" in results["unreadable"][bad]
    assert results["references_without_answers"] == [str(root / "refs" / "c2b.png")]
    assert results["questions"] == [Q1, Q2]
    assert results["cache"]["texts_truncated"] == 1
    # 8 generated files (1 unreadable) + 3 references
    assert results["cache"]["images_embedded"] == 10 and results["cache"]["images_cached"] == 0
    md = (out / "table.md").read_text()
    assert bad in md and "| m2 | 4 | 3 | 1 | 3 | 0 |" in md and f"{want['m1']['CLIP-I']:.4f}" in md
    per_image = list(csv.DictReader(open(out / "per_image.csv")))
    assert len(per_image) == 7 and sum(r["VQA"] == "" for r in per_image) == 1
    # plots: valid PNGs with one colour per model (tab10 blue and orange) on a white page
    for name in ("clip-i_clip-t.png", "clip-i_vqa.png"):
        arr = _valid_png(out / name)
        assert (arr == [31, 119, 180]).all(-1).any() and (arr == [255, 127, 14]).all(-1).any()

    # Add a model: only its images and new texts are embedded, the old rows are unchanged.
    (root / "m3").mkdir()
    extra = [{"image": f"m3/c1-{i}.png", "refs": ["refs/c1.png"], "prompt": "1girl, smiling, on a beach", "seed": 1,
              "sample": i, "model": "m3", "character": "c1"} for i in range(2)]
    for i in range(2):
        _image(root / "m3" / f"c1-{i}.png", 44, 40, 300 + i)
    m3 = _write_jsonl(root / "m3.jsonl", extra)
    vqa3 = _write_jsonl(root / "vqa3.jsonl", [{"image": e["image"], "question": q, "answer": f"{e['image']} {q}"}
                                               for e in extra for q in (Q1, Q2)])
    r = subprocess.run([sys.executable, "-m", "eval", "--manifest", str(manifest), str(m3), "--vqa", str(vqa), str(vqa3),
                        "--clip", str(clip_folder), "--out", str(out), "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["cache"]["images_embedded"] == 2 and results["cache"]["images_cached"] == 10
    assert results["cache"]["texts_embedded"] == 4          # the two new images' answers
    assert "images embedded 2, from cache 10" in r.stderr and f"unreadable: {bad}" in r.stderr
    rows2 = _read_csv(out / "table.csv")
    assert [rows2[m] for m in ("m1", "m2")] == [rows["m1"], rows["m2"]] and rows2["m3"]["with_vqa"] == "2"


def test_cli_precision_bf16_is_close_to_fp32(clip_folder, tmp_path, capsys):
    """The reduced-precision path (fp16 on CUDA; bf16 is what runs on the CPU) is cached apart from fp32."""
    root = tmp_path / "gens"
    manifest, vqa, _, _ = _dataset(root)
    outs = {}
    for precision in ("fp32", "bf16"):
        assert eval_cli.main(["--manifest", str(manifest), "--vqa", str(vqa), "--clip", str(clip_folder),
                              "--out", str(tmp_path / precision), "--cache", str(tmp_path / "cache"),
                              "--precision", precision, "--device", "cpu"]) == 0
        outs[precision] = json.loads((tmp_path / precision / "results.json").read_text())
    capsys.readouterr()
    assert outs["bf16"]["cache"]["images_cached"] == 0          # another identity: nothing shared with fp32
    assert outs["bf16"]["clip"]["identity"] != outs["fp32"]["clip"]["identity"]
    for a, b in zip(outs["fp32"]["models"], outs["bf16"]["models"]):
        for col in ("CLIP-I", "CLIP-T", "VQA"):
            assert b[col] == pytest.approx(a[col], abs=0.03)


def test_cli_clip_config_for_a_bare_weights_file(clip_folder, tmp_path, capsys):
    """A weights file with no config.json beside it is taken as ViT-L/14 unless --clip-config says otherwise."""
    root = tmp_path / "gens"
    manifest, vqa, _, _ = _dataset(root)
    (tmp_path / "bare").mkdir()
    weights = tmp_path / "bare" / "small-clip.safetensors"
    weights.symlink_to(clip_folder / "model.safetensors")
    common = ["--manifest", str(manifest), "--vqa", str(vqa), "--clip", str(weights), "--device", "cpu"]
    assert eval_cli.main(common + ["--out", str(tmp_path / "a")]) == 1
    assert "shape mismatches (is the model config the file's?)" in capsys.readouterr().err
    assert eval_cli.main(common + ["--out", str(tmp_path / "b"), "--clip-config", str(clip_folder / "config.json"),
                                   "--no-cache"]) == 0
    assert not (tmp_path / "b" / "cache").exists()
    assert _read_csv(tmp_path / "b" / "table.csv")["m1"]["scored"] == "4"


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.png", "refs": ["r.png"], "prompt": "x", "seed": 0, "sample": 0, "model": "m"',
     r"m\.jsonl:2: malformed JSON"),
    ('{"image": "a.png", "refs": ["r.png"], "prompt": "x", "seed": 0, "sample": 0, "model": "m"}',
     r"m\.jsonl:2: missing field\(s\) character; a line needs image \(a non-empty path string\)"),
    ('{"image": "a.png", "refs": [], "prompt": "x", "seed": 0, "sample": 0, "model": "m", "character": "c"}',
     r"m\.jsonl:2: field 'refs' must be a non-empty list of path strings, got \[\]"),
    ('{"image": "a.png", "refs": ["r.png"], "prompt": "x", "seed": "0", "sample": 0, "model": "m", "character": "c"}',
     r"m\.jsonl:2: field 'seed' must be an integer >= 0, got \"0\""),
    ('{"image": "./g.png", "refs": ["r.png"], "prompt": "x", "seed": 0, "sample": 0, "model": "m", "character": "c"}',
     r"m\.jsonl:2: image ./g.png is already listed at .*m\.jsonl:1"),
    ('["a.png"]', r"m\.jsonl:2: expected a JSON object, got list"),
])
def test_cli_bad_manifest_line(tmp_path, capsys, line, message):
    good = {"image": "g.png", "refs": ["r.png"], "prompt": "x", "seed": 0, "sample": 0, "model": "m", "character": "c"}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(good) + "\n" + line + "\n")
    rc = eval_cli.main(["--manifest", str(manifest), "--clip", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_manifest_paths_are_relative_to_the_manifest(tmp_path):
    (tmp_path / "sub").mkdir()
    m = _write_jsonl(tmp_path / "sub" / "m.jsonl", [{"image": "x/../a.png", "refs": ["/abs/r.png", "../r.png"],
                                                      "prompt": "", "seed": 3, "sample": 1, "model": "m",
                                                      "character": "c", "note": 1}])
    (g,) = read_manifest(m)
    assert g.image == tmp_path / "sub" / "a.png" and g.refs == [Path("/abs/r.png"), tmp_path / "r.png"]
    assert (g.seed, g.sample, g.extra) == (3, 1, {"note": 1})


# ---- the protocol runner --------------------------------------------------------------------------

def test_protocol_runner_grid_manifest_resume(weights, retrinet_ckpt, clip_folder, tmp_path, capsys):
    import sample
    from eval import protocol
    folder, _, _ = weights
    refs = [_image(tmp_path / f"ref{i}.png", w, h, 400 + i) for i, (w, h) in enumerate([(40, 64), (64, 48), (50, 50)])]
    chars = _write_jsonl(tmp_path / "characters.jsonl", [
        {"id": "c1", "refs": ["ref0.png", "ref1.png"], "concepts": ["face", "clothes"]},
        {"id": "c2", "refs": ["ref2.png"]}])
    (tmp_path / "prompts.txt").write_text("# the evaluation prompts\n1girl, on a beach\n\n")
    out = tmp_path / "gens" / "R-test"
    argv = ["--characters", str(chars), "--prompts", str(tmp_path / "prompts.txt"), "--seeds", "2", "--first-seed", "3",
            "--per-seed", "2", "--retrinet", str(retrinet_ckpt), "--weights", str(folder), "--out", str(out),
            "--size", "32", "--ref-size", "32", "--steps", "2", "--device", "cpu"]
    assert protocol.main(argv) == 0
    err = capsys.readouterr().err
    assert "2 characters x 1 prompts x 2 seeds x 2 per seed = 8 images for R-test: 0 of 4 batches already there" in err
    assert "[4/4] c2 prompt 0 seed 4" in err
    gens = read_manifest(out / "manifest.jsonl")
    assert [(g.character, g.seed, g.sample) for g in gens] == [
        ("c1", 3, 0), ("c1", 3, 1), ("c1", 4, 0), ("c1", 4, 1), ("c2", 3, 0), ("c2", 3, 1), ("c2", 4, 0), ("c2", 4, 1)]
    assert all(g.model == "R-test" and g.prompt == "1girl, on a beach" and g.image.is_file() for g in gens)
    assert gens[0].refs == refs[:2] and gens[-1].refs == [refs[2]]
    assert gens[0].extra == {"prompt_index": 0, "concepts": ["face", "clothes"]}
    assert gens[-1].extra["concepts"] == ["figure"]
    meta = json.loads(Image.open(out / "c1" / "p0-s4-1.png").text["parameters"])
    assert meta["seed"] == 4 and meta["index"] == 1 and meta["character"] == "c1" and meta["guidance"] == 7.0
    assert meta["refs"] == ["ref0.png", "ref1.png"] and meta["concepts"] == ["face", "clothes"]

    # The same batch through sample.py: the same pixels.
    assert sample.main(["--weights", str(folder), "--retrinet", str(retrinet_ckpt), "--refs", str(refs[0]),
                        str(refs[1]), "--concepts", "face", "clothes", "--ref-size", "32", "--prompt",
                        "1girl, on a beach", "--seed", "4", "--num", "2", "--steps", "2", "--height", "32",
                        "--width", "32", "--device", "cpu", "--out", str(tmp_path / "sample")]) == 0
    for i in range(2):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "sample" / f"1girl_on_a_beach-s4-{i}.png")),
                              np.asarray(Image.open(out / "c1" / f"p0-s4-{i}.png")))

    # Resume: a lost image regenerates its batch only (same pixels); the rest is left untouched.
    lost = out / "c2" / "p0-s3-1.png"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    pixels = np.asarray(Image.open(lost))
    lost.unlink()
    capsys.readouterr()
    assert protocol.main(argv) == 0
    err = capsys.readouterr().err
    assert "3 of 4 batches already there, 1 to generate" in err and "[1/1] c2 prompt 0 seed 3" in err
    assert np.array_equal(np.asarray(Image.open(lost)), pixels)
    changed = [p for p in out.rglob("*.png") if p.stat().st_mtime_ns != before[p]]
    assert sorted(p.name for p in changed) == ["p0-s3-0.png", "p0-s3-1.png"] and all(p.parent.name == "c2"
                                                                                    for p in changed)
    assert read_manifest(out / "manifest.jsonl") == gens
    assert not list(out.rglob("*.partial*"))
    # Nothing left to do: no model is loaded.
    assert protocol.main(argv) == 0
    assert "4 of 4 batches already there, 0 to generate" in capsys.readouterr().err
    # The manifest is what python -m eval reads.
    assert eval_cli.main(["--manifest", str(out / "manifest.jsonl"), "--clip", str(clip_folder),
                          "--out", str(tmp_path / "scores"), "--device", "cpu"]) == 0
    (row,) = json.loads((tmp_path / "scores" / "results.json").read_text())["models"]
    assert (row["model"], row["scored"], row["with_vqa"], row["VQA"]) == ("R-test", 8, 0, None)


def test_protocol_rejects_bad_characters_before_loading(weights, tmp_path, capsys):
    from eval import protocol
    folder, _, _ = weights
    (tmp_path / "p.txt").write_text("a prompt\n")
    cases = [('{"id": "c 1", "refs": ["r.png"]}', r"characters\.jsonl:1: 'id' must be a string of letters"),
             ('{"id": "c1", "refs": ["r.png", "s.png"], "concepts": ["face", "face", "face"]}',
              r"characters\.jsonl:1: 3 concepts for 2 references"),
             ('{"id": "c1", "refs": ["missing.png"]}', r"characters\.jsonl:1: reference .*missing\.png: cannot read")]
    for line, message in cases:
        (tmp_path / "characters.jsonl").write_text(line + "\n")
        rc = protocol.main(["--characters", str(tmp_path / "characters.jsonl"), "--prompts", str(tmp_path / "p.txt"),
                            "--weights", str(folder), "--out", str(tmp_path / "o"), "--device", "cpu"])
        assert rc == 2
        assert __import__("re").search(message, capsys.readouterr().err)
