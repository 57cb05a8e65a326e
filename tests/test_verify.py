"""python -m bench.verify: on synthesized files in every official layout (random weights written as
the SD single file and the diffusers folder, an official ControlNet file, the official IP-Adapter file
with its image encoder folder, a transformers CLIP folder) every row passes; with one tensor of our
loaded model perturbed, the rows of that part fail and name it; bad input is refused in one line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from bench import oracles, verify
from clip.tokenizer import write_vocab_files
from helpers import randomize_
from retrinet import ControlNetUNet, IPAdapterUNet
from retrinet.ip_adapter import official_key_map

ROOT = Path(__file__).resolve().parents[1]
EMBED = 24  # the image encoder's projection
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8, projection_dim=EMBED, hidden_act="quick_gelu")
CLIP_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=16, hidden_act="quick_gelu")
CLIP_VISION = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3, image_size=40,
                   patch_size=10, projection_dim=16, hidden_act="quick_gelu")
SMALL = ["--size", "64", "--steps", "3"]


@pytest.fixture(scope="module")
def files(small_sd, weights, tmp_path_factory):
    """Every file bench.verify reads, in its official layout, with random weights."""
    sd, _ = small_sd
    folder, single, config = weights
    root = tmp_path_factory.mktemp("verify")
    control = randomize_(ControlNetUNet(sd.unet).control, seed=41)  # zero convs and hint embedding included
    save_file({"control_model." + k: v.contiguous() for k, v in control.state_dict().items()},
              root / "control_sd15_small.safetensors")
    adapter = randomize_(IPAdapterUNet(sd.unet, image_embed_dim=EMBED).adapter, seed=42).state_dict()
    save_file({theirs: adapter[ours].contiguous() for theirs, ours in official_key_map(sd.unet.config).items()},
              root / "ip-adapter_small.safetensors")
    encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION))
    randomize_(encoder, seed=43).save_pretrained(root / "image_encoder")
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION,
                                                          projection_dim=16))
    randomize_(clip, seed=44).save_pretrained(root / "clip")
    write_vocab_files(root / "clip")
    return dict(folder=folder, single=single, config=config, controlnet=root / "control_sd15_small.safetensors",
                ip_adapter=root / "ip-adapter_small.safetensors", image_encoder=root / "image_encoder",
                clip=root / "clip")


def everything(files) -> list[str]:
    return ["--weights", str(files["single"]), "--config", str(files["config"]), "--controlnet",
            str(files["controlnet"]), "--ip-adapter", str(files["ip_adapter"]), "--image-encoder",
            str(files["image_encoder"]), "--clip", str(files["clip"]), *SMALL]


ALL_ROWS = ["tokenizer", "text encoder", "U-Net t=999", "U-Net t=261", "VAE encode", "VAE decode",
            *[f"text-to-image {s}" for s in verify.SAMPLERS], "ControlNet residuals", "ControlNet U-Net",
            "image encoder", "IP-Adapter U-Net", "CLIP text", "CLIP image"]


def table_rows(out: str) -> dict[str, list[str]]:
    """The printed table as {part: cells}."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    return {r[0]: r[1:] for r in rows[1:]}


def test_every_row_passes_on_the_single_file_and_its_companions(files, capsys):
    assert verify.main(everything(files)) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert list(rows) == ALL_ROWS
    assert all(cells[2] == "pass" for cells in rows.values()), out
    assert all(float(cells[0]) <= 1e-4 and cells[1] == "1e-04" for part, cells in rows.items() if part != "tokenizer")
    assert rows["tokenizer"][:3] == ["0.00e+00", "0e+00", "pass"]
    assert f"{len(ALL_ROWS)} of {len(ALL_ROWS)} rows pass" in out


def test_every_row_passes_on_the_diffusers_folder(files, capsys):
    assert verify.main(["--weights", str(files["folder"]), *SMALL]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert list(rows) == ALL_ROWS[:11] and all(cells[2] == "pass" for cells in rows.values())


def _perturbed(args, ours, theirs, tensor: torch.Tensor) -> set[str]:
    """The parts that fail with `tensor` (one of ours) scaled by 1.01, then put back."""
    kept = tensor.detach().clone()
    with torch.no_grad():
        tensor.mul_(1.01)
    try:
        return {r.part for r in verify.compare(args, ours, theirs) if not r.passed}
    finally:
        with torch.no_grad():
            tensor.copy_(kept)


@pytest.mark.slow
def test_one_perturbed_tensor_fails_the_rows_of_its_part(files, tmp_path):
    args = verify.parse_args(everything(files))
    assert verify.problems(args) == []
    ours = verify.load_ours(args)
    theirs = verify.load_theirs(args, ours, tmp_path)
    assert all(r.passed for r in verify.compare(args, ours, theirs))
    sd, samplers = ours.sd, {f"text-to-image {s}" for s in verify.SAMPLERS}
    unet_rows = {"U-Net t=999", "U-Net t=261", "ControlNet U-Net", "IP-Adapter U-Net"} | samplers
    cases = [(sd.unet.out[2].weight, unet_rows),
             (sd.unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight, unet_rows),  # not the ControlNet's copy
             (sd.text_encoder.text_model.encoder.layers[1].mlp.fc1.weight, {"text encoder"} | samplers),
             (sd.vae.encoder.conv_in.weight, {"VAE encode"}),
             (sd.vae.decoder.conv_out.weight, {"VAE decode"}),
             (ours.controlnet.control.zero_convs[3][0].weight, {"ControlNet residuals", "ControlNet U-Net"}),
             (ours.ip_adapter.image_encoder.visual_projection.weight, {"image encoder"}),
             (ours.ip_adapter.adapter.image_proj.proj.weight, {"IP-Adapter U-Net"}),
             (ours.clip.text_projection.weight, {"CLIP text"}),
             (ours.clip.vision_model.encoder.layers[0].self_attn.q_proj.weight, {"CLIP image"})]
    for tensor, parts in cases:
        assert _perturbed(args, ours, theirs, tensor) == parts


def test_the_failure_is_named_in_the_table_and_the_status(files, tmp_path, capsys, monkeypatch):
    """The command's own output when a part differs: FAIL on its rows, their names in the last line,
    status 1. Ours is perturbed as it is loaded (the decoder's last conv, 1%)."""
    load = verify.load_ours

    def load_perturbed(args):
        ours = load(args)
        with torch.no_grad():
            ours.sd.vae.decoder.conv_out.weight.mul_(1.01)
        return ours
    monkeypatch.setattr(verify, "load_ours", load_perturbed)
    assert verify.main(["--weights", str(files["single"]), "--config", str(files["config"]), *SMALL]) == 1
    out = capsys.readouterr().out
    assert table_rows(out)["VAE decode"][2] == "FAIL"
    assert out.strip().splitlines()[-1] == "10 of 11 rows pass; failed: VAE decode"


@pytest.mark.parametrize("argv, line", [
    ([], "nothing to verify: give --weights (and --controlnet, --ip-adapter), --clip or --machine"),
    (["--weights", "missing.safetensors"], "--weights missing.safetensors: no such file or folder"),
    (["--clip", "."], None),  # checked below: a folder that exists passes the argument checks
    (["--controlnet", "FILE"], "--controlnet runs on SD's U-Net: give --weights too"),
    (["--weights", "FILE", "--ip-adapter", "FILE"],
     "--ip-adapter and --image-encoder come together (the adapter reads the encoder's embedding)"),
    (["--weights", "FILE", "--precision", "fp16"],
     "--precision fp16 needs --device cuda (the CPU's fp16 kernels are partial and slow)"),
    (["--weights", "FILE", "--device", "cuda"], "--device cuda: CUDA is not available here"),
    (["--weights", "FILE", "--device", "tpu"], "--device 'tpu' is unknown; expected cpu, cuda, cuda:N or auto"),
    (["--weights", "FILE", "--size", "100"], "--size 100: expected a positive multiple of 8 (the VAE's downscale)"),
    (["--weights", "FILE", "--steps", "0"], "--steps 0: expected at least 1"),
])
def test_bad_arguments_are_refused_in_one_line(files, argv, line, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU-only machine
    argv = [str(files["single"]) if a == "FILE" else a for a in argv]
    args = verify.parse_args(argv)
    if line is None:
        assert verify.problems(args) == []
        return
    assert verify.problems(args) == [line]
    assert verify.main(argv) == 2
    assert capsys.readouterr().err == f"bench.verify: error: {line}\n"


def test_a_file_that_is_not_sd_is_refused_in_one_line(files, capsys):
    assert verify.main(["--weights", str(files["controlnet"]), *SMALL]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"bench.verify: error: {files['controlnet']}: ") and len(err) == 2


def test_missing_oracles_are_named_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    assert verify.import_oracles() == ("bench.verify compares against diffusers and transformers, and diffusers is "
                                       "not installed: pip install -r requirements-dev.txt")


def test_machine_report_from_the_command():
    r = subprocess.run([sys.executable, "-m", "bench.verify", "--machine"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # no GPU, wherever it runs
    assert r.returncode == 0, r.stderr
    assert "| torch | " + torch.__version__ + " |" in r.stdout and "no CUDA GPU visible" in r.stdout
    assert "--device cpu --precision fp32" in r.stdout


def test_the_scheduler_config_follows_the_schedule():
    """The oracle's scheduler predicts what our schedule says (a v model's pipeline is a v pipeline)."""
    from diffusion.schedule import PREDICTIONS, NoiseSchedule
    for prediction in PREDICTIONS:
        cfg = oracles.scheduler_config(NoiseSchedule(beta_end=0.02, prediction=prediction))
        assert (cfg["prediction_type"], cfg["beta_end"], cfg["num_train_timesteps"]) == (prediction, 0.02, 1000)
