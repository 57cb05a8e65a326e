"""Fault injection on files a user downloads: every value read from them is type-checked and bounded
before anything is built from it, and a bad one is one line naming the file, the key, the value and
what was expected, with no traceback.

1. A conditioning checkpoint's metadata (SavedModel.read, inspect_checkpoint): the record, its
   method, lock, train_base, the method's config and the base U-Net's config; sample.py refuses
   such a checkpoint before building any model, status 2.
2. A safetensors header (common.weights.read_header): dtype, shape, data offsets that disagree with
   them, gaps and overlaps, metadata that is not strings.
3. A --config file, and a diffusers folder's config.json files: types and upper bounds (a count of
   10^7 would build modules for hours), status 2 from sample.py.
4. bench.verify on a pixel-space base (a tiny run's base.safetensors and base-config.json): refused
   in one line, status 2, as it compares against diffusers' pipeline, which needs a VAE.

The models are the tiny preset's (pixel space, 16 px): each in-process sample.py call takes ~0.1 s.
"""
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import sample
from common.weights import CheckpointError, FieldError, read_header, read_metadata
from diffusion.sd15 import load_configs, model_configs
from retrinet import inspect_checkpoint, load_reference_model
from retrinet.model import reference_widths
from unet import UNetConfig, config_from_diffusers
from helpers import one_error, run_main

ROOT = Path(__file__).resolve().parents[1]


# ---- helpers ----------------------------------------------------------------------------------------



def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny run's base (pixel space: base.safetensors, base-config.json), a RetriNet checkpoint
    around it, its tensors and metadata, and a reference image."""
    from retrinet import RetriUNet
    from training.presets import build_tiny, save_base
    root = tmp_path_factory.mktemp("untrusted")
    sd = build_tiny(0)
    weights, config = save_base(sd, root)
    RetriUNet(sd.unet, heads=2, lock="none").save(root / "retrinet.safetensors")
    with safe_open(str(root / "retrinet.safetensors"), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    Image.fromarray(np.full((16, 16), 128, np.uint8), "L").save(root / "ref.png")
    return dict(root=root, weights=weights, config=config, retrinet=root / "retrinet.safetensors", meta=meta,
                state=state, info=json.loads(meta["retrinet"]), unet=sd.unet)


@pytest.fixture
def out(tmp_path):
    """An output folder holding an earlier run's file, which no failure may touch."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "x-s0-0.png").write_bytes(b"an earlier image")
    return folder


def sample_args(tiny, out, checkpoint, *extra):
    return ["--weights", tiny["weights"], "--config", tiny["config"], "--prompt", "x", "--steps", 2, "--height", 16,
            "--width", 16, "--device", "cpu", "--out", out, "--retrinet", checkpoint, "--refs",
            tiny["root"] / "ref.png", "--ref-size", 16, *extra]


def with_record(tiny, path: Path, record) -> Path:
    """The tiny RetriNet checkpoint written again with `record` as its metadata entry: a JSON value,
    or a str written as it is (not JSON)."""
    text = record if isinstance(record, str) else json.dumps(record)
    save_file(tiny["state"], str(path), metadata={**tiny["meta"], "retrinet": text})
    return path


def edited(info: dict, where: str, key: str, value=None, drop: bool = False) -> dict:
    """A copy of the metadata record with `key` of its part `where` ("" for the record itself,
    "config", "unet_config") set to `value`, or removed."""
    record = json.loads(json.dumps(info))
    part = record if not where else record[where]
    if drop:
        del part[key]
    else:
        part[key] = value
    return record


# ---- 1. a checkpoint's metadata -------------------------------------------------------------------------

def metadata_cases(info: dict, widths: str) -> list[tuple[object, str]]:
    """(record, the error after "FILE: ") for each fault."""
    heads = f"an integer >= 1 that divides {widths} (the widths it splits: the base U-Net's channels)"
    return [
        ([info], "its 'retrinet' metadata is [{'method': 'retrinet', "),
        ("{not json", "its 'retrinet' metadata is not valid JSON (Expecting property name enclosed in double quotes "
                      "at character 1); expected the JSON object train.py writes"),
        (edited(info, "", "config", [2, False]),
         "bad retrinet config in its metadata: 'config' is [2, False]; expected a JSON object"),
        (edited(info, "", "method", ["retrinet"]),
         "unknown method ['retrinet'] in its 'retrinet' metadata; expected one of retrinet, controlnet, ip-adapter"),
        (edited(info, "", "lock", drop=True), "its 'retrinet' metadata lacks lock"),
        (edited(info, "", "lock", "sideways"),
         "bad 'retrinet' metadata: 'lock' is 'sideways'; expected one of 'none', 'decoder', 'both' (RetriNet's locks)"),
        (edited(info, "", "train_base", "yes"),
         "bad 'retrinet' metadata: 'train_base' is 'yes'; expected true or false"),
        (edited(edited(info, "", "lock", "decoder"), "", "train_base", True),
         "bad 'retrinet' metadata: 'train_base' is True; expected false with lock 'decoder' (train_base trains the "
         "whole U-Net, which a lock freezes in part)"),
        (edited(info, "", "norm", "weird"),
         "bad 'retrinet' metadata: 'norm' is 'weird'; expected only the entries method, config, lock, train_base, "
         "unet_config"),
        (edited(info, "", "unet_config", None),
         "bad base U-Net config in its metadata: 'unet_config' is None; expected a JSON object"),
        (edited(info, "", "unet_config", "sd15"),
         "bad base U-Net config in its metadata: 'unet_config' is 'sd15'; expected a JSON object"),
        (edited(info, "unet_config", "num_res_blocks", 10 ** 7),
         "bad base U-Net config in its metadata: 'unet_config.num_res_blocks' is 10000000; expected an integer "
         "from 1 to 8"),
        (edited(info, "unet_config", "norm", "weird"),
         "bad base U-Net config in its metadata: 'unet_config.norm' is 'weird'; expected only the fields "
         "in_channels, out_channels, model_channels, attention_resolutions, num_res_blocks, channel_mult, "
         "num_heads, transformer_depth, context_dim, use_linear_in_transformer, num_head_channels, dropout, "
         "norm_groups"),
        (edited(info, "config", "heads", "two"),
         "bad retrinet config in its metadata: 'config.heads' is 'two'; expected an integer"),
        *[(edited(info, "config", "heads", h), f"bad retrinet config in its metadata: 'config.heads' is {h}; "
                                               f"expected {heads}") for h in (0, -1, 3, 10 ** 9)],
        (edited(info, "config", "norm", "weird"),
         "bad retrinet config in its metadata: 'config.norm' is 'weird'; expected only the fields heads, "
         "null_reference"),
        (edited(info, "config", "null_reference", "yes"),
         "bad retrinet config in its metadata: 'config.null_reference' is 'yes'; expected true or false"),
        (edited(edited(info, "", "method", "ip-adapter"), "", "lock", "both"),
         "bad 'retrinet' metadata: 'lock' is 'both'; expected one of 'none', 'decoder' (IP-Adapter's locks)"),
        (edited(edited(info, "", "method", "controlnet"), "", "config", {"hint_downscale": 3}),
         "bad controlnet config in its metadata: 'config.hint_downscale' is 3; expected one of 1, 2, 4, 8"),
        (edited(edited(info, "", "method", "ip-adapter"), "", "config", {"num_tokens": 10 ** 9}),
         "bad ip-adapter config in its metadata: 'config.num_tokens' is 1000000000; expected an integer from 1 "
         "to 1024"),
    ]


def test_the_checkpoint_fixture_is_good(tiny):
    info = inspect_checkpoint(tiny["retrinet"])
    assert (info.method, info.config.heads, info.lock) == ("retrinet", 2, "none")
    assert load_reference_model(tiny["retrinet"], tiny["unet"]).config.heads == 2


def test_bad_metadata_is_refused_in_one_line_naming_file_key_value(tiny, tmp_path):
    widths = ", ".join(map(str, reference_widths(tiny["unet"].config)))
    assert widths == "32, 64"   # the tiny base: 3, 10^9 and 0 divide neither
    for i, (record, message) in enumerate(metadata_cases(tiny["info"], widths)):
        path = with_record(tiny, tmp_path / f"m{i}.safetensors", record)
        with pytest.raises(CheckpointError) as e:
            inspect_checkpoint(path)
        assert str(e.value).startswith(f"{path}: {message}"), (record, str(e.value))
        assert "\n" not in str(e.value)
        with pytest.raises(CheckpointError) as again:   # loading reads the metadata through the same checks
            load_reference_model(path, tiny["unet"])
        assert str(again.value) == str(e.value)


def test_sample_refuses_bad_metadata_with_status_2_before_building(tiny, tmp_path, out, capsys):
    before = snapshot(out)
    widths = ", ".join(map(str, reference_widths(tiny["unet"].config)))
    for i, (record, message) in enumerate(metadata_cases(tiny["info"], widths)):
        path = with_record(tiny, tmp_path / f"s{i}.safetensors", record)
        rc, err = run_main(capsys, sample.main, sample_args(tiny, out, path))
        assert rc == 2, (record, err)
        assert one_error(err).startswith(f"sample.py: error: --retrinet {path}: {path}: {message}"), (record, err)
    assert snapshot(out) == before


@pytest.mark.slow  # a fresh process imports torch: ~6 s; the in-process runs above check the same fast
def test_sample_process_exits_2_on_a_head_count_of_zero(tiny, tmp_path):
    """The whole command, as a user runs it: status 2 and one line (it was a ZeroDivisionError)."""
    path = with_record(tiny, tmp_path / "heads0.safetensors", edited(tiny["info"], "config", "heads", 0))
    r = subprocess.run([sys.executable, "sample.py", *map(str, sample_args(tiny, tmp_path / "o", path))], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert one_error(r.stderr).startswith(f"sample.py: error: --retrinet {path}: {path}: bad retrinet config in its "
                                          f"metadata: 'config.heads' is 0; expected an integer >= 1")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# ---- 2. safetensors headers -----------------------------------------------------------------------------

def raw_file(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file written by hand: the 8-byte header length, the JSON header (padded with spaces
    to 8 bytes, as the library writes it), the data."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


HEADER_CASES = [
    ({"w": {"dtype": "F32", "shape": [1_000_000, 1_000_000], "data_offsets": [0, 16]}}, 16,
     "corrupt safetensors header: tensor 'w' of shape [1000000, 1000000] in F32 takes 4000000000000 bytes, but its "
     "data_offsets [0, 16] span 16"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, 8,
     "corrupt safetensors header: tensor 'w' of shape [2, 2] in F32 takes 16 bytes, but its data_offsets [0, 8] "
     "span 8"),
    ({"w": {"dtype": "F33", "shape": [4], "data_offsets": [0, 16]}}, 16,
     "corrupt safetensors header: tensor 'w' has dtype 'F33'; expected one of BOOL, U8, I8"),
    ({"w": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}, 16,
     "corrupt safetensors header: tensor 'w' has shape [-1, 4]; expected a list of non-negative integers"),
    ({"w": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, 16,
     "corrupt safetensors header: tensor 'w' has shape [4.0]; expected a list of non-negative integers"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, 16,
     "corrupt safetensors header: tensor 'w' has data_offsets [16, 0]; expected [begin, end], non-negative integers, "
     "begin <= end"),
    ({"w": {"dtype": "F32", "shape": [4]}}, 16,
     "corrupt safetensors header: tensor 'w' is {'dtype': 'F32', 'shape': [4]}; expected an object with dtype, shape "
     "and data_offsets"),
    ({"w": [1, 2]}, 16, "corrupt safetensors header: tensor 'w' is [1, 2]; expected an object with dtype"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, 12,
     "corrupt safetensors header: tensor 'b' starts at byte 8 of the data, expected 4 (tensors follow each other "
     "without gaps or overlaps)"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12,
     "corrupt safetensors header: tensor 'b' starts at byte 4 of the data, expected 8"),
    ({"__metadata__": {"retrinet": {"method": "retrinet"}},
      "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 4,
     "corrupt safetensors header: '__metadata__' is {'retrinet': {'method': 'retrinet'}}; expected an object of "
     "strings"),
    ({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, 16, "truncated: its tensors need"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 8,
     "corrupt safetensors file: 4 bytes after its last tensor; expected the file to end with it"),
]


@pytest.mark.parametrize("header, size, message", HEADER_CASES)
def test_bad_headers_are_one_line_naming_the_file_and_tensor(tmp_path, header, size, message):
    path = raw_file(tmp_path / "bad.safetensors", header, bytes(size))
    for read in (read_header, read_metadata):
        with pytest.raises(CheckpointError) as e:
            read(path)
        assert str(e.value).startswith(f"{path}: {message}"), str(e.value)
        assert "\n" not in str(e.value)


def test_a_good_header_written_by_hand_reads(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "b": {"dtype": "F16", "shape": [2, 3], "data_offsets": [4, 16]},
              "a": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]},
              "empty": {"dtype": "F32", "shape": [0, 7], "data_offsets": [16, 16]}}
    path = raw_file(tmp_path / "good.safetensors", header, bytes(16))
    assert set(read_header(path)) == {"a", "b", "empty"} and read_metadata(path) == {"format": "pt"}
    from common.weights import read_tensors
    assert read_tensors(path)["b"].shape == (2, 3)


def test_sample_with_a_bad_header(tiny, tmp_path, out, capsys):
    """As --retrinet: refused before building, status 2; as --weights: a bad weights file, found when
    loading, status 1 (README's table); one line naming the file and the tensor either way."""
    bad = raw_file(tmp_path / "big.safetensors", HEADER_CASES[0][0], bytes(16))
    before = snapshot(out)
    rc, err = run_main(capsys, sample.main, sample_args(tiny, out, bad))
    assert rc == 2 and one_error(err).startswith(f"sample.py: error: --retrinet {bad}: {bad}: {HEADER_CASES[0][2]}")
    args = ["--weights", bad, "--config", tiny["config"], "--prompt", "x", "--steps", 2, "--height", 16, "--width", 16,
            "--device", "cpu", "--out", out]
    rc, err = run_main(capsys, sample.main, args)
    assert rc == 1 and one_error(err) == f"sample.py: error: {bad}: {HEADER_CASES[0][2]}"
    assert snapshot(out) == before


# ---- 3. --config files and diffusers config.json ----------------------------------------------------------

def config_cases(base: dict) -> list[tuple[dict, str]]:
    """(--config JSON, the start of the error after "FILE: ")."""
    def part(name, **changes):
        return {**base, name: {**base[name], **changes}}
    built = "the {} config cannot be built ({}: '{}' is {}; expected {}"
    levels, hidden = len(base["unet"]["channel_mult"]), base["text_encoder"]["hidden_size"]
    return [
        (part("unet", num_res_blocks=10 ** 7), built.format("unet", "ValueError", "unet.num_res_blocks", 10 ** 7,
                                                            "an integer from 1 to 8)")),
        (part("unet", transformer_depth=10 ** 6),
         built.format("unet", "ValueError", "unet.transformer_depth", 10 ** 6,
                      "an integer from 1 to 16 or a list of up to 16 integers from 1 to 16)")),
        (part("unet", channel_mult=[1] * 9), built.format("unet", "ValueError", "unet.channel_mult", [1] * 9,
                                                          "a list of 1 to 8 integers from 1 to 64)")),
        (part("unet", num_heads=0), built.format("unet", "ValueError", "unet.num_heads", 0,
                                                 "-1 (unset) or an integer from 1 to 1024)")),
        (part("unet", dropout="high"), built.format("unet", "TypeError", "unet.dropout", "'high'",
                                                    "a finite number from 0 to 1)")),
        (part("unet", depth=3), built.format("unet", "TypeError", "unet.depth", 3, "only the fields in_channels, ")),
        (part("unet", transformer_depth=[1] * (levels - 1)),
         built.format("unet", "ValueError", "unet.transformer_depth", [1] * (levels - 1),
                      f"an integer or a list of {levels} (one per level of channel_mult))")),
        ({**base, "vae": {"num_res_blocks": 10 ** 7}}, built.format("vae", "ValueError", "vae.num_res_blocks", 10 ** 7,
                                                                    "an integer from 1 to 8)")),
        ({**base, "vae": "pixels"}, built.format("vae", "TypeError", "vae", "'pixels'",
                                                 "a JSON object or 'pixel' (no autoencoder))")),
        (part("text_encoder", num_hidden_layers=10 ** 7),
         built.format("text_encoder", "ValueError", "text_encoder.num_hidden_layers", 10 ** 7,
                      "an integer from 1 to 128)")),
        (part("text_encoder", hidden_act="relu"), built.format("text_encoder", "ValueError", "text_encoder.hidden_act",
                                                               "'relu'", "one of 'quick_gelu', 'gelu')")),
        (part("text_encoder", num_attention_heads=hidden + 1),
         built.format("text_encoder", "ValueError", "text_encoder.num_attention_heads", hidden + 1,
                      f"a divisor of hidden_size {hidden})")),
        (part("schedule", num_train_timesteps=10 ** 12),
         built.format("schedule", "ValueError", "schedule.num_train_timesteps", 10 ** 12, "an integer <= 1000000)")),
        (part("schedule", prediction="x0"), built.format("schedule", "ValueError", "schedule.prediction", "'x0'",
                                                         "one of 'epsilon', 'v_prediction')")),
        (part("schedule", beta_end="0.03"), built.format("schedule", "TypeError", "schedule.beta_end", "'0.03'",
                                                         "a finite number)")),
    ]


def test_the_tiny_config_passes_the_checks(tiny):
    base = json.loads(tiny["config"].read_text())
    configs = load_configs(tiny["config"])
    assert UNetConfig.checked(base["unet"]) == base["unet"]
    assert configs["unet"] == UNetConfig(**base["unet"]) and configs["schedule"].num_train_timesteps == 1000


def test_bad_configs_are_refused_by_sample_with_status_2_quickly(tiny, tmp_path, out, capsys):
    base = json.loads(tiny["config"].read_text())
    before = snapshot(out)
    for i, (config, message) in enumerate(config_cases(base)):
        cfg = tmp_path / f"c{i}.json"
        cfg.write_text(json.dumps(config))
        with pytest.raises(ValueError) as e:
            load_configs(cfg)
        assert str(e.value).startswith(f"{cfg}: {message}"), str(e.value)
        start = time.perf_counter()
        rc, err = run_main(capsys, sample.main, ["--weights", tiny["weights"], "--config", cfg, "--prompt", "x", "--out",
                                            out, "--height", 16, "--width", 16, "--device", "cpu"])
        assert time.perf_counter() - start < 30   # num_res_blocks 10^7 ran for minutes before being bounded
        assert rc == 2, (config, err)
        assert one_error(err).startswith(f"sample.py: error: {cfg}: {message}"), (config, err)
    assert snapshot(out) == before


def test_a_diffusers_folder_with_bad_config_json_is_refused(tmp_path, out, capsys):
    cases = [("unet", {"layers_per_block": 10 ** 7},
              "not a valid unet config (ValueError: 'layers_per_block' is 10000000; expected an integer from 1 to 8)"),
             ("unet", {"block_out_channels": "320"},
              "not a valid unet config (TypeError: 'block_out_channels' is '320'; expected a list of 1 to 8 integers "
              "from 1 to 65536)"),
             ("vae", {"block_out_channels": [128] * 50},
              "not a valid vae config (ValueError: 'block_out_channels' is [128, 128, "),
             ("text_encoder", {"text_config": {"num_hidden_layers": 10 ** 7}},
              "not a valid text_encoder config (ValueError: 'text_config.num_hidden_layers' is 10000000; expected an "
              "integer from 1 to 128)"),
             ("unet", [1, 2], "not a valid unet config (TypeError: '(top level)' is [1, 2]; expected a JSON object)")]
    before = snapshot(out)
    for i, (part, config, message) in enumerate(cases):
        folder = tmp_path / f"sd{i}"
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError) as e:
            model_configs(folder)
        assert str(e.value).startswith(f"{folder / part / 'config.json'}: {message}"), str(e.value)
        rc, err = run_main(capsys, sample.main, ["--weights", folder, "--prompt", "x", "--out", out, "--device", "cpu"])
        assert rc == 2 and one_error(err).startswith(f"sample.py: error: {folder / part / 'config.json'}: {message}")
    assert snapshot(out) == before
    good = {"layers_per_block": 1, "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D"] * 2,
            "attention_head_dim": 8, "num_attention_heads": None, "cross_attention_dim": 32, "_class_name": "UNet"}
    assert config_from_diffusers(good).num_res_blocks == 1   # keys it does not read are left alone


def test_field_errors_name_key_value_and_expectation():
    with pytest.raises(FieldError) as e:
        UNetConfig.checked({"channel_mult": [1, True]}, "unet.")
    assert (e.value.key, e.value.kind, str(e.value)) == (
        "unet.channel_mult", "TypeError", "'unet.channel_mult' is [1, True]; expected a list of 1 to 8 integers from "
                                          "1 to 64")
    assert UNetConfig.checked({"num_heads": -1, "num_head_channels": 64, "dropout": 0}) == {
        "num_heads": -1, "num_head_channels": 64, "dropout": 0}


# ---- 4. bench.verify on a pixel-space base ---------------------------------------------------------------

def test_verify_refuses_a_pixel_space_base_in_one_line(tiny, capsys, monkeypatch):
    from bench import verify
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, err = run_main(capsys, verify.main, ["--weights", tiny["weights"], "--config", tiny["config"]])
    assert rc == 2
    assert err == (f"bench.verify: error: --weights {tiny['weights']}: a pixel-space base (\"vae\": \"pixel\" in "
                   f"{tiny['config']}, as the tiny preset's); bench.verify compares an SD v1.5 base with a VAE against "
                   f"diffusers' pipeline, which has no pixel-space counterpart\n")
    cfg = tiny["root"] / "deep.json"   # a --config that cannot be read is refused there too, before loading
    cfg.write_text(json.dumps({**json.loads(tiny["config"].read_text()), "vae": {"num_res_blocks": 10 ** 7}}))
    rc, err = run_main(capsys, verify.main, ["--weights", tiny["weights"], "--config", cfg])
    assert rc == 2 and one_error(err, "bench.verify: error: ").startswith(
        f"bench.verify: error: {cfg}: the vae config cannot be built (ValueError: 'vae.num_res_blocks' is 10000000")


def test_loaders_check_the_config_json_beside_their_weights(tmp_path):
    """The loaders that read a config.json beside the weights (diffusers U-Net / VAE folders, CLIP
    text and image encoders, a full CLIP) refuse it before building anything, naming it."""
    from clip import load_clip, load_image_encoder, load_text_encoder
    from unet import load_unet

    def folder(name: str, keys: list[str], config) -> Path:
        (tmp_path / name).mkdir()
        save_file({k: torch.zeros(1) for k in keys}, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        return tmp_path / name

    deep = {"num_hidden_layers": 10 ** 7}
    cases = [
        (load_text_encoder, folder("text", ["text_model.x"], deep), "'num_hidden_layers' is 10000000"),
        (load_text_encoder, folder("text2", ["text_model.x"], {"text_config": deep}),
         "'text_config.num_hidden_layers' is 10000000"),
        (load_image_encoder, folder("image", ["vision_model.x"], deep), "'num_hidden_layers' is 10000000"),
        (load_clip, folder("clip", ["vision_model.x", "text_model.x"], {"vision_config": deep}),
         "'vision_config.num_hidden_layers' is 10000000"),
        (load_clip, folder("clip2", ["vision_model.x", "text_model.x"], {"text_config": [1]}),
         "'text_config' is [1]; expected a JSON object (a CLIPConfig's text_config)"),
    ]
    for load, path, message in cases:
        with pytest.raises(CheckpointError) as e:
            load(path)
        assert str(e.value).startswith(f"{path / 'config.json'}: {message}"), str(e.value)
    unet = tmp_path / "sd" / "unet"
    unet.mkdir(parents=True)
    save_file({"time_embedding.x": torch.zeros(1)}, str(unet / "diffusion_pytorch_model.safetensors"))
    (unet / "config.json").write_text(json.dumps({"layers_per_block": 10 ** 7}))
    with pytest.raises(CheckpointError) as e:
        load_unet(tmp_path / "sd")
    assert str(e.value) == f"{unet / 'config.json'}: 'layers_per_block' is 10000000; expected an integer from 1 to 8"


def test_an_official_ip_adapter_file_with_impossible_shapes(tmp_path):
    """Its config is read from its shapes: they must be those of its layers, and within bounds."""
    def official(name: str, proj, norm) -> Path:
        path = tmp_path / f"{name}.safetensors"
        save_file({"image_proj.proj.weight": proj, "image_proj.norm.weight": norm,
                   "ip_adapter.1.to_k_ip.weight": torch.zeros(2, 2)}, str(path))
        return path
    flat = official("flat", torch.zeros(8), torch.zeros(4))
    with pytest.raises(CheckpointError) as e:
        inspect_checkpoint(flat)
    assert str(e.value) == (f"{flat}: official IP-Adapter tensor image_proj.proj.weight has shape [8]; expected 2 "
                            f"non-zero dimensions")
    many = official("many", torch.zeros(2000, 1), torch.zeros(1))
    with pytest.raises(CheckpointError) as e:
        inspect_checkpoint(many)
    assert str(e.value) == (f"{many}: the config its shapes imply is out of bounds: 'num_tokens' is 2000; expected an "
                            f"integer from 1 to 1024")


def test_train_refuses_an_untrusted_config_before_building(tmp_path, capsys):
    """train.py --config with a value that would hang the build: status 2, one line naming the file
    and the key, before anything is read or built."""
    import json as _json
    import train
    config = tmp_path / "c.json"
    config.write_text(_json.dumps({"unet": {"num_res_blocks": 10_000_000}}))
    status = train.main(["--preset", "sd15", "--weights", str(tmp_path / "w.safetensors"), "--config", str(config),
                         "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and str(config) in err and "num_res_blocks" in err, err
    assert not (tmp_path / "out").exists()
