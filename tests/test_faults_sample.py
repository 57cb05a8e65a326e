"""Fault injection on sampling, data and evaluation: every bad input is one line naming the file /
key / option / value, status 2 before any model is built and 1 after, and nothing written before
is lost.

1. Images of every PIL mode become RGB by one rule (common.images.to_rgb: 16-bit scaled, alpha over
   white, palette transparency through RGBA) or are refused by name, in sample.py, the loader, the
   validator and the build's hash.
2. NaN / inf options and weights holding NaN are refused.
3. The sampler's step limit on the schedule, the VAE's downscale and configs that do not fit are
   checked before loading.
4. A full disk or a read-only --out leaves no partial file (tests run as root, where chmod does not
   stop writes: the file system is simulated by patching open / os.open for one folder).
5. Empty datasets, unknown devices, --retrinet naming a folder.

Models are the tiny preset's (pixel space, 16 px, 2 steps): each sample.py call takes ~0.1 s.
"""
import builtins
import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import sample
from common.images import UnsupportedImage, open_image, to_grey, to_rgb
from common.weights import CheckpointError, read_tensors
from diffusion.samplers import SAMPLERS, make_sampler
from diffusion.schedule import NoiseSchedule
from diffusion.sd15 import steps_limit
from helpers import one_error, run_main

# ---- helpers ----------------------------------------------------------------------------------------

_open, _io_open, _os_open = builtins.open, io.open, os.open


def _inside(path, folder: Path) -> bool:
    try:
        return Path(os.path.abspath(os.fsdecode(path))).is_relative_to(folder.resolve())
    except TypeError:  # a file descriptor
        return False


def _writes(mode) -> bool:
    return any(c in str(mode) for c in "wax+")


class _FullFile:
    """A file on a full disk: the first write gets half its bytes out, then ENOSPC, as a real one."""

    def __init__(self, f):
        self._f, self._wrote = f, False

    def write(self, data):
        if not self._wrote:
            self._wrote = True
            self._f.write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fileno(self):  # PIL's encoders would write to the descriptor, past write()
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def full_disk(monkeypatch, folder: Path) -> None:
    """Files opened for writing under `folder` fill the disk at their first write."""
    def fake_open(file, mode="r", *args, **kwargs):
        f = _open(file, mode, *args, **kwargs)
        return _FullFile(f) if _writes(mode) and _inside(file, folder) else f
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)


def read_only(monkeypatch, folder: Path) -> None:
    """`folder` is on a read-only file system: creating, opening for writing, renaming or removing
    anything under it fails with EROFS (os.open serves tempfile, open / io.open PIL and pathlib)."""
    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def fake_open(file, mode="r", *args, **kwargs):
        if _writes(mode) and _inside(file, folder):
            refuse(file)
        return _open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _inside(path, folder):
            refuse(path)
        return _os_open(path, flags, *args, **kwargs)

    def guard(real):
        def fake(*paths, **kwargs):
            for p in paths[:2]:
                if isinstance(p, (str, bytes, os.PathLike)) and _inside(p, folder):
                    refuse(p)
            return real(*paths, **kwargs)
        return fake

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    for name in ("mkdir", "replace", "rename", "unlink", "remove"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))


def snapshot(folder: Path) -> dict:
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny preset's base (U-Net + text encoder in one SD-style file, pixel space) and its
    --config, a RetriNet around it whose references count, and grey references."""
    from helpers import randomize_
    from retrinet import RetriUNet
    from training.presets import build_tiny, save_base
    root = tmp_path_factory.mktemp("tiny")
    sd = build_tiny(0)
    randomize_(sd.unet, seed=6)   # untrained, its zero-initialised output layer would give one image for all
    weights, config = save_base(sd, root)
    model = RetriUNet(sd.unet, heads=1, lock="none")
    randomize_(model.retrinet.zero_convs, seed=7)
    randomize_(model.retrinet.cross_attn, seed=8)
    model.save(root / "retrinet.safetensors")
    grey = (np.arange(20 * 16).reshape(20, 16) * 255 // (20 * 16 - 1)).astype(np.uint8)  # a gradient 0 ... 255
    Image.fromarray(grey, "L").save(root / "ref8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(root / "ref16.png")               # the same in 16 bits
    Image.new("L", (16, 20), 255).save(root / "white.png")
    return dict(root=root, weights=weights, config=config, retrinet=root / "retrinet.safetensors", grey=grey)


def tiny_args(tiny, out, *extra):
    return ["--weights", tiny["weights"], "--config", tiny["config"], "--prompt", "x", "--steps", 2, "--height", 16,
            "--width", 16, "--device", "cpu", "--out", out, *extra]


@pytest.fixture
def junk(tmp_path):
    """A weights file that no loader accepts: a check that passes it was made before loading."""
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"junk")
    return path


@pytest.fixture
def out(tmp_path):
    """An output folder holding an earlier run's files, which no failure may touch."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "x-s0-0.png").write_bytes(b"an earlier image")
    (folder / "notes.txt").write_text("kept")
    return folder


# ---- 1. image modes ---------------------------------------------------------------------------------

GRADIENT = np.arange(0, 65536, 257, dtype=np.int64).reshape(16, 16)   # 0 ... 65535: 8-bit v is 16-bit 257 v
EIGHT = (GRADIENT // 257).astype(np.uint8)


def _save(im: Image.Image, path: Path, fmt: str) -> Path:
    im.save(path, format=fmt)
    return path


@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("I;16B", "TIFF"), ("I", "TIFF")])
def test_sixteen_bit_greyscale_keeps_its_gradient(tmp_path, mode, fmt):
    im = {"I;16": lambda: Image.fromarray(GRADIENT.astype(np.uint16)),
          "I;16B": lambda: Image.frombytes("I;16B", (16, 16), GRADIENT.astype(">u2").tobytes()),
          "I": lambda: Image.fromarray(GRADIENT.astype(np.int32))}[mode]()
    assert im.mode == mode
    path = _save(im, tmp_path / f"g.{fmt.lower()}", fmt)
    with Image.open(path) as check:
        assert check.mode.startswith("I")                 # what PIL would have clipped to white
    rgb = np.asarray(open_image(path))
    assert rgb.shape == (16, 16, 3) and (rgb == EIGHT[..., None]).all()
    assert np.asarray(to_grey(Image.open(path))).tolist() == EIGHT.tolist()   # masks alike


def test_wide_integers_and_floats_outside_their_range_are_refused_by_name(tmp_path):
    wide = _save(Image.fromarray(np.full((4, 4), 70000, np.int32)), tmp_path / "wide.tif", "TIFF")
    with pytest.raises(UnsupportedImage, match=r"reference .*wide\.tif: mode I with values 70000 \.\.\. 70000; "
                                               r"expected 16-bit"):
        open_image(wide, "reference")
    ok = _save(Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)), tmp_path / "f.tif", "TIFF")
    assert np.asarray(open_image(ok))[..., 0].ravel().tolist() == [round(v * 255) for v in np.linspace(0, 1, 16)]
    hot = _save(Image.fromarray(np.full((4, 4), 2.5, np.float32)), tmp_path / "hot.tif", "TIFF")
    with pytest.raises(UnsupportedImage, match=r"image .*hot\.tif: mode F \(32-bit float\) with values 2\.5 \.\.\. "
                                               r"2\.5; expected greyscale in \[0, 1\]"):
        open_image(hot)
    nan = Image.fromarray(np.full((4, 4), np.nan, np.float32))
    with pytest.raises(UnsupportedImage, match="non-finite"):
        to_rgb(nan, "x")


def test_alpha_palette_bilevel_cmyk_and_friends(tmp_path):
    # Alpha is composited over white: transparent -> white, opaque -> itself, half -> halfway.
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 40, 0)
    rgba[..., 3] = [[0, 255, 128], [0, 255, 128]]
    for im, fmt in [(Image.fromarray(rgba), "PNG"), (Image.fromarray(np.stack([rgba[..., 0], rgba[..., 3]], -1)), "PNG")]:
        got = np.asarray(open_image(_save(im, tmp_path / f"{im.mode}.png", fmt)))
        want = rgba[0, :, :3].astype(int) if im.mode == "RGBA" else np.repeat(rgba[0, :, :1].astype(int), 3, -1)
        assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == want[1].tolist()
        assert all(abs(int(g) - round((w * 128 + 255 * 127) / 255)) <= 1 for g, w in zip(got[0, 2], want[2]))
    # A palette image with a transparent index: through RGBA, the transparent entry is white (PIL's
    # convert("RGB") would show the entry's own colour, black here).
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    path = _save(p, tmp_path / "p.png", "PNG")
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    assert np.asarray(open_image(path)).tolist() == [[[255, 255, 255], [10, 200, 30]]]
    # Premultiplied alpha, bilevel, CMYK, YCbCr, HSV, LAB: PIL's conversions (LAB through a profile).
    assert np.asarray(to_rgb(Image.new("RGBa", (1, 1), (100, 50, 0, 0)))).tolist() == [[[255, 255, 255]]]
    assert np.asarray(to_rgb(Image.new("La", (1, 1), (100, 255)))).tolist() == [[[100, 100, 100]]]
    bilevel = _save(Image.fromarray(np.array([[0, 1]], bool)), tmp_path / "1.png", "PNG")
    assert np.asarray(open_image(bilevel)).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    cmyk = _save(Image.new("CMYK", (1, 1), (0, 255, 255, 0)), tmp_path / "c.tif", "TIFF")
    assert np.asarray(open_image(cmyk)).tolist() == [[[255, 0, 0]]]
    assert np.asarray(to_rgb(Image.new("HSV", (1, 1), (0, 255, 255)))).tolist() == [[[255, 0, 0]]]
    assert to_rgb(Image.new("YCbCr", (1, 1), (128, 128, 128))).getpixel((0, 0)) == (128, 128, 128)
    from PIL import ImageCms
    srgb_to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lab = ImageCms.applyTransform(Image.new("RGB", (1, 1), (200, 30, 30)), srgb_to_lab)
    assert max(abs(a - b) for a, b in zip(to_rgb(lab).getpixel((0, 0)), (200, 30, 30))) <= 3


def test_sample_reads_a_16_bit_reference_as_its_8_bit_twin(tiny, tmp_path, capsys):
    """sample.py --refs: the 16-bit reference gives the very image its 8-bit twin gives (before, it
    read as white, the image a white reference gives)."""
    images = {}
    for name in ("ref8", "ref16", "white"):
        rc, err = run_main(capsys, sample.main, tiny_args(tiny, tmp_path / name, "--retrinet", tiny["retrinet"], "--refs",
                                                     tiny["root"] / f"{name}.png", "--ref-size", 16))
        assert rc == 0, err
        images[name] = np.asarray(Image.open(tmp_path / name / "x-s0-0.png"))
    assert np.array_equal(images["ref16"], images["ref8"])
    assert not np.array_equal(images["ref8"], images["white"])   # the references count


@pytest.fixture
def synthetic(tmp_path):
    from data.synthetic import generate
    root = tmp_path / "syn"
    generate(root, identities=2, images_per_identity=2, size=32, seed=0, noise_fraction=0.0)
    return root


def test_loader_and_validator_convert_16_bit_and_name_refused_modes(synthetic, capsys):
    from data import validate as V
    from data.annotations import load_records
    from data.dataset import RetriBooruDataset
    records = load_records(synthetic)
    rec, other = records[0], records[1]
    grey = np.asarray(Image.open(synthetic / rec["image"]).convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(synthetic / rec["image"])           # 16-bit image
    mask = np.asarray(Image.open(synthetic / rec["mask"]).convert("L"))
    Image.fromarray(mask.astype(np.uint16) * 257).save(synthetic / rec["mask"])            # 16-bit mask
    ds = RetriBooruDataset(synthetic, resolution=32, strict=True)
    assert np.array_equal(np.asarray(ds._open(rec)), np.repeat(grey[..., None], 3, -1))   # not white
    from data.dataset import _load_mask
    assert np.array_equal(np.asarray(_load_mask(synthetic / rec["mask"], ds._open(rec))), mask)
    assert ds[0] is not None
    assert V.validate(synthetic) == []                                                    # converts: clean

    size = Image.open(synthetic / other["image"]).size
    Image.fromarray(np.full(size[::-1], 3.0, np.float32)).save(synthetic / other["image"], format="TIFF")
    problems = V.validate(synthetic)
    assert any(f"sample {other['id']}: image {other['image']}: mode F (32-bit float)" in p for p in problems), problems
    capsys.readouterr()
    assert V.main([str(synthetic)]) == 1
    assert f"image {other['image']}: mode F" in capsys.readouterr().out
    with pytest.raises(ValueError, match=rf"{other['image']}: mode F"):
        RetriBooruDataset(synthetic, resolution=32, strict=True)._open(other)


def test_build_hashes_16_bit_images_as_the_loader_sees_them(tmp_path):
    """Two different 16-bit pictures: before, both hashed as white and were taken for copies."""
    from data import build as B
    from helpers import row, write_dataset
    kw = write_dataset(tmp_path, [row(1), row(2)])
    images = Path(kw["metadata"]).parent.parent / "images"
    for i in (1, 2):
        noise = np.random.default_rng(i).integers(0, 65536, (8, 8)).astype(np.uint16)
        Image.fromarray(noise).save(images / f"{i}.png")
    stats = B.build(**kw)
    assert stats["links"]["removed"]["near_duplicate"] == 0 and stats["kept_samples"] == 2


# ---- 2. non-finite numbers --------------------------------------------------------------------------

@pytest.mark.parametrize("option,value", [("--guidance", "nan"), ("--guidance", "inf"), ("--ref-guidance", "-inf"),
                                          ("--ip-scale", "nan")])
def test_non_finite_options_are_refused_before_loading(junk, out, capsys, option, value):
    before = snapshot(out)
    rc, err = run_main(capsys, sample.main, ["--weights", junk, "--prompt", "x", "--out", out, "--device", "cpu",
                                        f"{option}={value}"])
    assert rc == 2 and "Traceback" not in err
    # The only problem, but for --ref-guidance / --ip-scale without --retrinet, which is one more.
    assert err.splitlines()[0] == f"sample.py: error: {option} {value}: expected a finite number"
    assert all(line.startswith("sample.py: error: ") for line in err.splitlines())
    assert len(err.splitlines()) == (1 if option == "--guidance" else 2)
    assert snapshot(out) == before


def test_protocol_refuses_non_finite_guidance(junk, tmp_path, capsys):
    from eval import protocol
    Image.new("RGB", (8, 8)).save(tmp_path / "r.png")
    (tmp_path / "c.jsonl").write_text('{"id": "c1", "refs": ["r.png"]}\n')
    (tmp_path / "p.txt").write_text("a prompt\n")
    rc, err = run_main(capsys, protocol.main, ["--characters", tmp_path / "c.jsonl", "--prompts", tmp_path / "p.txt",
                                          "--weights", junk, "--out", tmp_path / "o", "--device", "cpu",
                                          "--guidance", "inf"])
    assert rc == 2
    assert one_error(err, "python -m eval.protocol: error: ") == \
        "python -m eval.protocol: error: --guidance inf: expected a finite number"


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_weights_holding_nan_or_inf_fail_after_the_checks_naming_file_and_key(tiny, tmp_path, out, capsys, poison):
    state = load_file(tiny["weights"])
    key = sorted(k for k in state if k.startswith("model.diffusion_model."))[3]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = poison
    bad = tmp_path / "poisoned.safetensors"
    save_file(state, bad)
    before = snapshot(out)
    rc, err = run_main(capsys, sample.main, tiny_args(tiny, out) + ["--weights", bad])
    assert rc == 1
    what = "NaN" if poison != poison else "infinite"
    assert one_error(err) == (f"sample.py: error: {bad}: tensor {key} holds {what} values (a diverged or corrupt "
                              f"checkpoint); refusing to load it")
    assert snapshot(out) == before


def test_weights_that_overflow_the_loading_dtype_are_refused(tmp_path):
    save_file({"a": torch.ones(3), "b": torch.tensor([1.0, 1e6])}, tmp_path / "w.safetensors")
    assert read_tensors(tmp_path / "w.safetensors", dtype=torch.bfloat16)["b"].dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match=r"w\.safetensors: tensor b overflows float16"):
        read_tensors(tmp_path / "w.safetensors", dtype=torch.float16)


# ---- 3. checks that used to come after loading --------------------------------------------------------

@pytest.mark.parametrize("T", [20, 1000])
def test_steps_limit_is_each_samplers_real_limit(T):
    schedule = NoiseSchedule(num_train_timesteps=T)
    for name in SAMPLERS:
        limit = steps_limit(name, T)
        s = make_sampler(name, limit, schedule)
        if T == 20:   # runs to the end, finite
            x = torch.ones(1, 1, 2, 2) * s.init_noise_sigma
            g = torch.Generator().manual_seed(0)
            for i, t in enumerate(s.timesteps):
                assert 0 <= int(t) < T
                x = s.step(0.5 * s.scale_model_input(x, i), i, x, generator=g)
            assert torch.isfinite(x).all()
        with pytest.raises(ValueError):
            make_sampler(name, limit + 1, schedule)


def test_steps_beyond_the_schedule_are_refused_before_loading(junk, tiny, tmp_path, out, capsys):
    before = snapshot(out)
    rc, err = run_main(capsys, sample.main, ["--weights", junk, "--prompt", "x", "--out", out, "--device", "cpu",
                                        "--steps", 5000])
    assert rc == 2
    assert one_error(err) == ("sample.py: error: --steps 5000: the pndm sampler takes at most 999 steps on a schedule "
                              "of 1000 training timesteps (SD's)")
    # The tiny preset's --config schedule, shortened to 20 timesteps: the limit is read from it.
    cfg = json.loads(tiny["config"].read_text())
    cfg["schedule"]["num_train_timesteps"] = 20
    short = tmp_path / "short.json"
    short.write_text(json.dumps(cfg))
    for sampler, steps, limit in [("pndm", 20, 19), ("dpmpp_2m", 19, 18), ("euler_a", 25, 19)]:
        rc, err = run_main(capsys, sample.main, tiny_args(tiny, out, "--config", short, "--sampler", sampler,
                                                     "--steps", steps))
        assert rc == 2
        assert one_error(err) == (f"sample.py: error: --steps {steps}: the {sampler} sampler takes at most {limit} "
                                  f"steps on a schedule of 20 training timesteps ({short})")
    assert snapshot(out) == before
    for sampler, limit in [("pndm", 19), ("dpmpp_2m", 18)]:   # at the limit: it runs
        rc, err = run_main(capsys, sample.main, tiny_args(tiny, tmp_path / sampler, "--config", short, "--sampler", sampler,
                                                     "--steps", limit))
        assert rc == 0, err


def test_configs_that_fail_after_loading_are_refused_before(junk, tiny, tmp_path, out, capsys):
    before = snapshot(out)
    base = json.loads(tiny["config"].read_text())
    cases = [
        ({"vae": {"ch_mult": [1, 1, 1, 1, 1]}}, ["--height", 24],   # an SD-shaped VAE that downscales by 16
         "--height 24 must be a multiple of 16, the downscale of the VAE ({cfg})"),
        ({**base, "text_encoder": {**base["text_encoder"], "hidden_size": 32}}, [],
         "{cfg}: the U-Net's context_dim 64 differs from the text encoder's hidden_size 32"),
        ({**base, "vae": {"ch": 32, "ch_mult": [1, 1, 2, 2]}}, [],
         "{cfg}: the U-Net takes 3 and gives 3 channels, the VAE has 4"),
        ({**base, "unet": {**base["unet"], "num_heads": "two"}}, [],
         "{cfg}: the unet config cannot be built (TypeError: "),
        ({**base, "schedule": {"num_train_timesteps": 0}}, [],
         "{cfg}: schedule num_train_timesteps must be an integer >= 2, got 0"),
        ([1, 2], [], "{cfg}: expected a JSON object"),
    ]
    for i, (config, extra, message) in enumerate(cases):
        cfg = tmp_path / f"c{i}.json"
        cfg.write_text(json.dumps(config))
        rc, err = run_main(capsys, sample.main, ["--weights", junk, "--config", cfg, "--prompt", "x", "--out", out,
                                            "--device", "cpu", *extra])
        assert rc == 2, (config, err)
        assert one_error(err).startswith("sample.py: error: " + message.format(cfg=cfg)), (config, err)
    rc, err = run_main(capsys, sample.main, ["--weights", junk, "--prompt", "x", "--out", out, "--seed", 2 ** 64])
    assert rc == 2 and one_error(err) == f"sample.py: error: --seed {2 ** 64} must be in [0, 2^64 - 1] (the range " \
                                         f"of torch's generator)"
    assert snapshot(out) == before


# ---- 4. a full disk, a read-only folder ---------------------------------------------------------------

def test_sample_on_a_full_disk_leaves_no_partial_file(tiny, out, capsys, monkeypatch):
    before = snapshot(out)
    full_disk(monkeypatch, out)
    rc, err = run_main(capsys, sample.main, tiny_args(tiny, out))
    monkeypatch.undo()
    assert rc == 1
    assert one_error(err) == f"sample.py: error: {out / 'x-s0-0.png'}: cannot write it (No space left on device)"
    assert snapshot(out) == before   # the earlier x-s0-0.png as it was, no partial file beside it


def test_sample_on_a_read_only_folder(tiny, out, capsys, monkeypatch):
    before = snapshot(out)
    read_only(monkeypatch, out)
    rc, err = run_main(capsys, sample.main, tiny_args(tiny, out))
    monkeypatch.undo()
    assert rc == 2 and one_error(err) == f"sample.py: error: --out {out}: cannot write there (Read-only file system)"
    # Made read-only after the checks: the write fails, one line, status 1.
    def denied(self, fp, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(fp))
    monkeypatch.setattr(Image.Image, "save", denied)
    rc, err = run_main(capsys, sample.main, tiny_args(tiny, out))
    monkeypatch.undo()
    assert rc == 1 and one_error(err) == f"sample.py: error: {out / 'x-s0-0.png'}: cannot write it (Permission denied)"
    assert snapshot(out) == before


CLIP_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=77, projection_dim=24, bos_token_id=49406, eos_token_id=49407,
                 pad_token_id=49407)
CLIP_VISION = dict(hidden_size=36, intermediate_size=40, num_hidden_layers=1, num_attention_heads=3, image_size=30,
                   patch_size=6, projection_dim=24)


@pytest.fixture(scope="module")
def scoring(tmp_path_factory):
    """A random small CLIP in openai/clip-vit-large-patch14's layout and a manifest of 2 images."""
    from clip import CLIPModel, CLIPTextConfig, CLIPVisionConfig
    root = tmp_path_factory.mktemp("scoring")
    torch.manual_seed(0)
    model = CLIPModel(CLIPTextConfig.from_hf(CLIP_TEXT), CLIPVisionConfig.from_hf(CLIP_VISION))
    (root / "clip").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "clip" / "model.safetensors")
    (root / "clip" / "config.json").write_text(json.dumps({"text_config": CLIP_TEXT, "vision_config": CLIP_VISION,
                                                           "projection_dim": 24}))
    rng = np.random.default_rng(0)
    lines = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"g{i}.png")
        lines.append({"image": f"g{i}.png", "refs": ["ref.png"], "prompt": "1girl", "seed": 0, "sample": i,
                      "model": "m", "character": "c"})
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "ref.png")
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def eval_args(scoring, out, *extra):
    return ["--manifest", scoring / "manifest.jsonl", "--clip", scoring / "clip", "--out", out, "--device", "cpu",
            "--workers", 0, *extra]


def test_eval_on_a_full_or_read_only_out_keeps_the_earlier_results(scoring, tmp_path, capsys, monkeypatch):
    import eval.__main__ as eval_cli
    out = tmp_path / "results"
    rc, err = run_main(capsys, eval_cli.main, eval_args(scoring, out, "--no-cache"))
    assert rc == 0, err
    before = snapshot(out)
    assert {str(p) for p in before} == {"table.md", "table.csv", "results.json", "per_image.csv",
                                        "clip-i_clip-t.png", "clip-i_vqa.png"}
    full_disk(monkeypatch, out)
    rc, err = run_main(capsys, eval_cli.main, eval_args(scoring, out, "--no-cache"))
    monkeypatch.undo()
    assert rc == 1
    assert one_error(err, "python -m eval: error: ") == (
        f"python -m eval: error: {out / 'table.md'}: cannot write it (No space left on device); the results already "
        f"in {out} are as they were")
    assert snapshot(out) == before                                  # no staging folder, no partial file

    read_only(monkeypatch, out)
    rc, err = run_main(capsys, eval_cli.main, eval_args(scoring, out, "--no-cache"))
    monkeypatch.undo()
    assert rc == 2 and one_error(err, "python -m eval: error: ") == \
        f"python -m eval: error: --out {out}: cannot write there (Read-only file system)"
    assert snapshot(out) == before

    cache = tmp_path / "cache"               # the embedding cache on a full disk: one line, status 1
    full_disk(monkeypatch, cache)
    rc, err = run_main(capsys, eval_cli.main, eval_args(scoring, out, "--cache", cache))
    monkeypatch.undo()
    assert rc == 1 and one_error(err, "python -m eval: error: ").startswith(
        f"python -m eval: error: --cache {cache}: cannot write {cache / 'weights_sha256.json'} (No space left on device)")
    assert snapshot(out) == before


def test_protocol_on_a_full_disk_keeps_earlier_batches(tiny, tmp_path, capsys, monkeypatch):
    from eval import protocol
    Image.new("RGB", (8, 8), "red").save(tmp_path / "r.png")
    (tmp_path / "c.jsonl").write_text('{"id": "c1", "refs": ["r.png"]}\n')
    (tmp_path / "p.txt").write_text("a prompt\n")
    gens = tmp_path / "gens"
    argv = ["--characters", tmp_path / "c.jsonl", "--prompts", tmp_path / "p.txt", "--weights", tiny["weights"],
            "--config", tiny["config"], "--out", gens, "--size", 16, "--steps", 2, "--per-seed", 1, "--device", "cpu"]
    rc, err = run_main(capsys, protocol.main, argv + ["--seeds", 1])
    assert rc == 0, err
    before = snapshot(gens)
    full_disk(monkeypatch, gens)
    rc, err = run_main(capsys, protocol.main, argv + ["--seeds", 2])
    monkeypatch.undo()
    assert rc == 1
    assert one_error(err, "python -m eval.protocol: error: ") == (
        f"python -m eval.protocol: error: {gens / 'c1' / 'p0-s1-0.png'}: cannot write it (No space left on device)")
    assert snapshot(gens) == before


# ---- 5. empty datasets, devices, a folder for --retrinet -------------------------------------------------

def test_validate_calls_an_empty_dataset_an_error(tmp_path, capsys):
    from data import validate as V
    (tmp_path / "annotations.jsonl").write_text("\n")
    assert V.validate(tmp_path) == [f"{tmp_path}: annotations.jsonl holds no samples (an empty dataset is not a "
                                    f"dataset)"]
    rc, err = run_main(capsys, V.main, [tmp_path])
    assert rc == 1 and f"{tmp_path}: 0 samples, 1 problems" in err


def test_build_without_images_is_an_error_naming_the_root(tmp_path, capsys):
    from data import build as B
    from helpers import row, write_dataset
    kw = write_dataset(tmp_path, [row(1), row(2)])
    out = Path(kw["out"])
    out.mkdir()
    (out / "annotations.jsonl").write_text('{"an earlier": "build"}\n')
    before = snapshot(out)
    args = ["--metadata", kw["metadata"], "--vqa", kw["vqa"], "--cloth-tags", kw["cloth_tags"], "--masks", kw["masks"],
            "--boxes", kw["boxes"], "--out", out]
    nowhere = tmp_path / "nowhere"
    rc, err = run_main(capsys, B.main, args + ["--root", nowhere])
    assert rc == 1
    assert one_error(err, "error: ") == (f"error: no sample kept from the 2 images of root {nowhere} (dropped: 2 "
                                         f"no_image); nothing written to {out}")
    Path(kw["metadata"]).write_text("")
    rc, err = run_main(capsys, B.main, args)
    assert rc == 1 and one_error(err, "error: ").startswith(f"error: {kw['metadata']} lists no images (root ")
    assert snapshot(out) == before


def test_build_on_a_full_disk_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    from data import build as B
    from helpers import row, write_dataset
    kw = write_dataset(tmp_path, [row(1), row(2)])
    out = Path(kw["out"])
    out.mkdir()
    (out / "annotations.jsonl").write_text('{"an earlier": "build"}\n')
    before = snapshot(out)
    full_disk(monkeypatch, out)
    rc, err = run_main(capsys, B.main, ["--metadata", kw["metadata"], "--vqa", kw["vqa"], "--cloth-tags", kw["cloth_tags"],
                                   "--masks", kw["masks"], "--boxes", kw["boxes"], "--out", out])
    monkeypatch.undo()
    assert rc == 1
    assert one_error(err, "error: ") == f"error: {out / 'annotations.jsonl'}: cannot write it (No space left on device)"
    assert snapshot(out) == before


def test_unknown_devices_are_refused_up_front(junk, out, scoring, capsys):
    import eval.__main__ as eval_cli
    before = snapshot(out)
    for device in ("tpu", "cuda:x", "gpu"):
        rc, err = run_main(capsys, sample.main, ["--weights", junk, "--prompt", "x", "--out", out, "--device", device])
        assert rc == 2
        assert one_error(err) == f"sample.py: error: --device {device!r} is unknown; expected cpu, cuda, cuda:N or auto"
    rc, err = run_main(capsys, eval_cli.main, eval_args(scoring, out / "scores") + ["--device", "tpu"])
    assert rc == 2 and one_error(err, "python -m eval: error: ") == \
        "python -m eval: error: --device 'tpu' is unknown; expected cpu, cuda, cuda:N or auto"
    assert snapshot(out) == before


def test_retrinet_naming_a_folder(tiny, tmp_path, out, capsys):
    before = snapshot(out)
    rc, err = run_main(capsys, sample.main, tiny_args(tiny, out, "--retrinet", tmp_path, "--refs", tiny["root"] / "ref8.png"))
    assert rc == 2
    assert one_error(err) == (f"sample.py: error: --retrinet {tmp_path}: is a folder, expected a .safetensors file (a "
                              f"checkpoint written by train.py, or an official ControlNet / IP-Adapter file)")
    assert snapshot(out) == before
