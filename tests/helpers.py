"""Shared test utilities (plain functions and constants; the shared fixtures are in conftest.py):
random weights for every parameter, a relative-error measure, the small models' configs, train.py
and sample.py runs, RetriNet's inputs, data/build.py's tiny inputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

import train
from bench.oracles import bundled_hf_tokenizer, diffusers_pipeline, diffusers_unet, diffusers_vae
from training.checkpoints import model_file
from unet import UNet, UNetConfig
from vae import VAEConfig


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter fresh random values, including those initialised to 0 or 1, so that a
    weight loaded into the wrong place (or left at its initial value) changes the output.

    Norm scales are drawn around 1, biases and 1-D vectors around 0, matrices with std 1/sqrt(fan_in)
    so activations stay O(1) through deep stacks.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() == 0:
                p.copy_(2.0 + 0.5 * r)
            elif p.dim() == 1 and leaf == "weight":  # LayerNorm / GroupNorm scale
                p.copy_(1.0 + 0.2 * r)
            elif p.dim() == 1:
                p.copy_(0.1 * r)
            else:
                fan_in = p[0].numel()
                p.copy_(r * fan_in ** -0.5)
    return module


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def bench_module(name: str):
    """The script bench/<name>.py as a module (bench/ is scripts, not a package the tests import)."""
    import importlib.util
    import sys
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# Small and odd: 3 channel widths, attention at two levels, 4 heads of width 8/16/24, context 48.
SMALL_UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=(2, 4),
                        num_res_blocks=2, channel_mult=(1, 2, 3, 4), num_heads=4, transformer_depth=1, context_dim=48)


# ---- the small SD (random weights; downscale 8 as SD's): sample.py, train.py --preset sd15, bench.verify

ROOT = Path(__file__).resolve().parents[1]
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu")
UNET = UNetConfig(model_channels=32, attention_resolutions=(1, 2), num_res_blocks=1, channel_mult=(1, 2), num_heads=2,
                  context_dim=32)
VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)  # downscale 8, as SD's


def small_sd_pipeline(sd, hf_text, sampler, folder):
    """diffusers' pipeline over twins of the small SD's parts (`hf_text` its text encoder), the bundled
    vocabulary written under `folder`."""
    return diffusers_pipeline(sampler, sd.schedule, vae=diffusers_vae(sd.vae, VAE), text_encoder=hf_text,
                              tokenizer=bundled_hf_tokenizer(folder / "tok"), unet=diffusers_unet(sd.unet, UNET))


def run_sample(*args):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


# ---- train.py runs: the tiny preset at 16 px (8-px references), a fraction of a second per step

FAST = ["--preset", "tiny", "--resolution", "16", "--ref-resolution", "8", "--batch-size", "4", "--warmup", "2",
        "--log-every", "1", "--val-count", "1", "--val-steps", "2", "--seed", "3"]


def run(data, out, *extra) -> int:
    return train.main(["--data", str(data), "--out", str(out), *FAST, *map(str, extra)])


def losses(out) -> list[float]:
    return [json.loads(l)["loss"] for l in (Path(out) / "log.jsonl").read_text().splitlines()]


def weights(out, step) -> dict:
    """The model weights a run saved at `step` (not the `weights` fixture: the small SD's files)."""
    return load_file(model_file(Path(out) / "checkpoints" / f"step-{step:06d}"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def torchrun(*args, timeout=300, script=ROOT / "train.py", launch=()):
    """`script` (train.py) with `args` under torchrun (two processes on this machine, the options
    `launch` added); asserts that it exits 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *launch,
           str(script), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def sd15_args(data, out, weights_and_config, *extra):
    w, c = weights_and_config
    return ["--preset", "sd15", "--weights", str(w), "--config", str(c), "--data", str(data), "--out", str(out),
            "--resolution", "32", "--batch-size", "2", "--grad-accum", "1", "--workers", "0", "--log-every", "1",
            "--val-count", "1", "--val-steps", "2", *map(str, extra)]


# ---- RetriNet on a small U-Net

RETRI_CFG = UNetConfig(model_channels=32, attention_resolutions=(1, 2), num_res_blocks=1, channel_mult=(1, 2, 2),
                       num_heads=4, context_dim=24)


def random_unet(seed=0):
    return randomize_(UNet(RETRI_CFG).eval(), seed=seed)


def retrinet_inputs(b=2, k=3, ref_hw=(8, 12), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 16, 8, generator=g)
    t = torch.tensor([17, 640][:b])
    ctx = torch.randn(b, 5, 24, generator=g)
    refs = torch.randn(b, k, 4, *ref_hw, generator=g)
    ref_ctx = torch.randn(b, k, 3, 24, generator=g)
    return x, t, ctx, refs, ref_ctx


def trained_like(model, seed=2):
    """Randomise RetriNet's own layers (the zero convs too), as training would move them."""
    randomize_(model.retrinet.cross_attn, seed=seed)
    randomize_(model.retrinet.zero_convs, seed=seed + 1)
    return model


# ---- data/build.py's inputs: 8x8 noise PNGs and their metadata

CLOTH = ["school_uniform", "serafuku", "skirt"]
UNIFORM = ["1girl", "school_uniform", "skirt", "smile"]


def row(id, answer="red and white", char="alice", artist="art1", tags=UNIFORM, *,
        chars=None, artists=None, image=True, mask=True, box=True, identity=None, pic=None):
    """One input image; its picture is picture(pic), picture(id) by default (pic=another id: a
    byte-identical re-upload of that image)."""
    return dict(id=id, answer=answer, chars=[char] if chars is None else chars,
                artists=[artist] if artists is None else artists, tags=list(tags),
                image=image, mask=mask, box=box, identity=identity, pic=id if pic is None else pic)


def picture(seed, size=8):
    """A noise picture of its own per seed: any two are ~64 of the 128 hash bits apart (a flat
    picture would not do: every flat picture has the same difference hash)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def write_dataset(tmp_path, rows):
    """Write the inputs; return the build() keyword arguments."""
    ds = tmp_path / "ds"
    (ds / "meta").mkdir(parents=True)
    (ds / "images").mkdir()
    masks = tmp_path / "masks"
    masks.mkdir()
    meta, vqa, boxes, truth = [], [], [], []
    for r in rows:
        i = r["id"]
        meta.append({"id": i, "image": f"images/{i}.png", "width": 8, "height": 8,
                     "general_tags": r["tags"], "character_tags": r["chars"],
                     "artist_tags": r["artists"]})
        if r["image"]:
            picture(r["pic"]).save(ds / "images" / f"{i}.png")
        if r["mask"]:
            Image.new("L", (8, 8), 255).save(masks / f"{i}.png")
        if r["answer"] is not None:
            vqa.append({"id": i, "question": "What are the top two colors of the character's "
                        "clothes?", "answer": r["answer"]})
        if r["box"]:
            boxes.append({"id": i, "face_bbox": [1, 1, 5, 4]})
        if r["identity"] is not None:
            truth.append({"id": i, "identity": r["identity"]})

    def dump(path, objs):
        path.write_text("".join(json.dumps(o) + "\n" for o in objs))
        return path

    kw = dict(metadata=dump(ds / "meta" / "metadata.jsonl", meta),
              vqa=dump(tmp_path / "vqa_answers.jsonl", vqa),
              cloth_tags=tmp_path / "cloth_tags.txt",
              masks=masks, boxes=dump(tmp_path / "face_boxes.jsonl", boxes),
              out=tmp_path / "out")
    kw["cloth_tags"].write_text("\n".join(CLOTH) + "\n")
    if truth:
        kw["truth"] = dump(tmp_path / "identities.jsonl", truth)
    return kw


def one_error(err: str, prefix: str = "sample.py: error: ") -> str:
    """The one error line of a run's stderr (no traceback, nothing else said to be an error)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), err
    return lines[0]


def run_main(capsys, main, argv):
    """Run a command's main() in-process; (status, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err
