"""The baselines train and sample as their official code (Supp. A.3): the constant learning rate of
diffusers' train_controlnet.py and IP-Adapter's tutorial_train.py (lr_at against diffusers' own
schedulers), the optimisation defaults train.py fills per method, and IP-Adapter's classifier-free
guidance with a zero image embedding in the negative branch, as its official pipeline."""
import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler
from PIL import Image
from safetensors.torch import save_file

import sample
import train
from clip import CLIPVisionConfig, CLIPVisionModelWithProjection
from common.images import fit_and_pad
from diffusion.sd15 import ClassifierFreeGuidance
from helpers import UNET, randomize_
from retrinet import ControlNetUNet, IPAdapterUNet, RetriUNet
from retrinet.ip_adapter import IP_ADAPTER_NEGATIVE
from training.checkpoints import resume_problems, run_settings
from training.objective import lr_at
from unet import UNet, UNetConfig


# -- the learning-rate schedule -----------------------------------------------------------------------

def _diffusers_lrs(name: str, warmup: int, lr: float, steps: int) -> list[float]:
    """The learning rate of each update as the official scripts step diffusers' scheduler: the
    optimizer's step with the current rate, then the scheduler's."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("lr", [1e-5, 3e-4])
def test_constant_schedule_is_diffusers(lr):
    """train_controlnet.py's default --lr_scheduler constant ignores --lr_warmup_steps 500: our
    constant schedule with the baselines' warm-up 0; with a warm-up, diffusers' constant_with_warmup."""
    controlnet = train.parse_args(["--data", "d", "--out", "o", "--method", "controlnet"])
    assert controlnet.warmup == 0 and controlnet.schedule == "constant"
    ours = [lr_at(s, lr=lr, warmup=controlnet.warmup, restart_every=controlnet.restart_every, schedule="constant")
            for s in range(1000)]
    assert ours == _diffusers_lrs("constant", 500, lr, 1000)
    for warmup in (500, 7):
        ours = [lr_at(s, lr=lr, warmup=warmup, restart_every=9000, schedule="constant") for s in range(1000)]
        theirs = _diffusers_lrs("constant_with_warmup", warmup, lr, 1000)
        assert ours == theirs
        assert ours[0] == 0.0 and ours[warmup // 2] < lr and ours[warmup:] == [lr] * (1000 - warmup)


def test_cosine_schedule_is_the_default_and_unknown_ones_are_refused():
    kw = dict(lr=1e-3, warmup=50, restart_every=300, min_lr=1e-5)
    assert [lr_at(s, **kw, schedule="cosine-restarts") for s in range(1000)] == [lr_at(s, **kw) for s in range(1000)]
    assert lr_at(120, **kw) < 1e-3  # decays; the constant one does not
    assert lr_at(120, **kw, schedule="constant") == 1e-3
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_at(0, **kw, schedule="linear")


# -- what train.py fills in per method ----------------------------------------------------------------

RECIPES = {  # method: (schedule, warmup (None: the preset's), clip_grad, weight_decay, adam_eps)
    "retrinet": ("cosine-restarts", None, 1.0, 1e-2, 1e-8),
    "controlnet": ("constant", 0, 1.0, 1e-2, 1e-8),    # diffusers' train_controlnet.py
    "ip-adapter": ("constant", 0, 0.0, 1e-2, 1e-8),    # IP-Adapter's tutorial_train.py
}


@pytest.mark.parametrize("preset, preset_warmup, restart_every", [("tiny", 50, 100_000), ("sd15", 0, 9000)])
@pytest.mark.parametrize("method", list(RECIPES))
def test_train_fills_each_methods_recipe(method, preset, preset_warmup, restart_every):
    a = train.parse_args(["--data", "d", "--out", "o", "--preset", preset, "--method", method])
    schedule, warmup, clip_grad, weight_decay, adam_eps = RECIPES[method]
    assert (a.schedule, a.warmup, a.clip_grad, a.weight_decay, a.adam_eps) == (
        schedule, preset_warmup if warmup is None else warmup, clip_grad, weight_decay, adam_eps)
    assert a.restart_every == restart_every
    assert not {"schedule", "warmup", "clip_grad", "weight_decay", "adam_eps"} & set(a.explicit)
    given = ["--schedule", "cosine-restarts", "--warmup", "3", "--clip-grad", "0.5", "--weight-decay", "0",
             "--adam-eps", "1e-6"]
    a = train.parse_args(["--data", "d", "--out", "o", "--preset", preset, "--method", method, *given])
    assert (a.schedule, a.warmup, a.clip_grad, a.weight_decay, a.adam_eps) == ("cosine-restarts", 3, 0.5, 0.0, 1e-6)


def test_constant_schedule_refuses_restarts_and_a_floor(data, tmp_path, capsys):
    cases = [(["--method", "controlnet", "--restart-every", "50"],
              "--restart-every 50: --schedule constant has no restarts"),
             (["--schedule", "constant", "--restart-every", "50"],
              "--restart-every 50: --schedule constant has no restarts"),
             (["--method", "ip-adapter", "--min-lr", "1e-6"], "--min-lr 1e-06: --schedule constant has no cosine floor")]
    for extra, message in cases:
        assert train.main(["--data", str(data), "--out", str(tmp_path / "o"), "--preset", "tiny", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
        assert not (tmp_path / "o").exists()
    # The same options with the cosine schedule pass the checks.
    args = train.parse_args(["--data", str(data), "--out", str(tmp_path / "o"), "--preset", "tiny", "--method",
                             "controlnet", "--schedule", "cosine-restarts", "--restart-every", "50", "--min-lr", "1e-6"])
    assert train.check_args(args) == []


def test_a_resumed_run_keeps_its_schedule(tmp_path):
    def settings(*argv):
        return run_settings(vars(train.parse_args(["--data", "d", "--out", "o", *argv])), 1, 24)
    saved = settings("--method", "controlnet")
    problems, _ = resume_problems(saved, settings("--method", "controlnet", "--schedule", "cosine-restarts"), tmp_path)
    assert len(problems) == 1 and "--schedule cosine-restarts" in problems[0] and "--schedule constant" in problems[0]
    assert resume_problems(saved, settings("--method", "controlnet"), tmp_path)[0] == []
    # A run written before --schedule existed followed the cosine schedule.
    old = {k: v for k, v in saved.items() if k != "schedule"}
    problems, _ = resume_problems(run_settings(old, 1, 24), settings("--method", "controlnet"), tmp_path)
    assert len(problems) == 1 and "the checkpoint's run had --schedule cosine-restarts" in problems[0]
    old = {k: v for k, v in settings().items() if k != "schedule"}
    assert resume_problems(run_settings(old, 1, 24), settings(), tmp_path)[0] == []


# -- IP-Adapter's guidance -------------------------------------------------------------------------

CFG = UNetConfig(model_channels=32, attention_resolutions=(1, 2), num_res_blocks=1, channel_mult=(1, 2), num_heads=2,
                 context_dim=40)
VISION = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=28, patch_size=14, projection_dim=24, hidden_act="gelu")


def _reference(seed=0, size=(30, 20)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_ip_adapter_guidance_is_the_official_pipelines(scale):
    encoder = randomize_(CLIPVisionModelWithProjection(VISION), seed=3).eval()
    model = IPAdapterUNet(randomize_(UNet(CFG), seed=4), image_embed_dim=24, image_encoder=encoder).eval()
    randomize_(model.adapter, seed=5)
    image = _reference()
    sd = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    denoiser = model.denoiser(sd, [image], ["figure"], ref_size=24, height=40, width=56, scale=scale)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 5, 7, generator=g)  # batch 2, odd latent sizes
    t = torch.tensor(421)
    negative, context = torch.randn(2, 9, 40, generator=g), torch.randn(2, 9, 40, generator=g)
    guidance = 7.5
    with torch.no_grad():
        ref = model.encode_references(fit_and_pad(image, 24)[0][None]).expand(2, -1)
        uncond = model(x, t, negative, torch.zeros_like(ref), scale)   # official: image_proj(zeros_like(e))
        cond = model(x, t, context, ref, scale)
        want = uncond + guidance * (cond - uncond)
        got = model.guided_predictor(denoiser, guidance)(x, t, negative, context)
        old = ClassifierFreeGuidance(denoiser, guidance)(x, t, negative, context)  # the reference in both branches
        alone = model.guided_predictor(denoiser, 1.0)(x, t, negative, context)
    assert got.shape == x.shape
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    assert (old - want).abs().max() > 100 * (got - want).abs().max() + 1e-4
    assert torch.equal(alone, cond)  # guidance <= 1: the positive branch alone


def test_retrinet_and_controlnet_guide_as_before():
    denoiser = lambda x, t, context: x  # noqa: E731
    for model in (RetriUNet(UNet(UNET), heads=2), ControlNetUNet(UNet(UNET))):
        predictor = model.guided_predictor(denoiser, 4.0)
        assert type(predictor) is ClassifierFreeGuidance and predictor.model is denoiser and predictor.scale == 4.0


# -- sample.py --ip-adapter-negative ------------------------------------------------------------------

@pytest.fixture(scope="module")
def ip_adapter_files(small_sd, tmp_path_factory):
    """An IP-Adapter over the small SD's U-Net (its layers random) and its image encoder's folder."""
    sd, _ = small_sd
    root = tmp_path_factory.mktemp("ip-adapter")
    vision = dataclasses.replace(VISION, projection_dim=16)
    encoder = randomize_(CLIPVisionModelWithProjection(vision), seed=8)
    (root / "image-encoder").mkdir()
    (root / "image-encoder" / "config.json").write_text(json.dumps(dataclasses.asdict(vision)))
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, root / "image-encoder" / "model.safetensors")
    unet = UNet(UNET).eval()
    unet.load_state_dict(sd.unet.state_dict())
    model = IPAdapterUNet(unet, image_embed_dim=16)
    randomize_(model.adapter, seed=9)
    model.save(root / "ip-adapter.safetensors")
    _reference().save(root / "ref.png")
    return root


def _sample(capsys, weights, out, *extra):
    _, single, config = weights
    capsys.readouterr()
    rc = sample.main([str(a) for a in ("--weights", single, "--config", config, "--prompt", "a fox", "--steps", 2,
                                       "--height", 16, "--width", 16, "--device", "cpu", "--out", out, *extra)])
    return rc, capsys.readouterr().err


def test_sample_ip_adapter_negative(weights, ip_adapter_files, retrinet_ckpt, tmp_path, capsys):
    ip = ["--retrinet", ip_adapter_files / "ip-adapter.safetensors", "--refs", ip_adapter_files / "ref.png",
          "--ref-size", 16, "--image-encoder", ip_adapter_files / "image-encoder"]
    pngs = {}
    for name, extra in (("official", ["--ip-adapter-negative"]), ("none", []), ("own", ["--negative-prompt", "blurry"])):
        rc, err = _sample(capsys, weights, tmp_path / name, *ip, *extra)
        assert rc == 0, err
        (png,) = (tmp_path / name).glob("*.png")
        pngs[name] = json.loads(Image.open(png).text["parameters"])["negative_prompt"], np.asarray(Image.open(png))
    assert [pngs[n][0] for n in ("official", "none", "own")] == [IP_ADAPTER_NEGATIVE, "", "blurry"]
    assert not np.array_equal(pngs["official"][1], pngs["none"][1])  # the negative prompt was used

    refusals = [(["--negative-prompt", "x", "--ip-adapter-negative", *ip], "leave out --negative-prompt"),
                (["--ip-adapter-negative"], "--ip-adapter-negative applies to IP-Adapter checkpoints: give one"),
                (["--ip-adapter-negative", "--retrinet", retrinet_ckpt, "--refs", ip_adapter_files / "ref.png"],
                 "--ip-adapter-negative applies to IP-Adapter checkpoints, not a retrinet")]
    for extra, message in refusals:
        rc, err = _sample(capsys, weights, tmp_path / "refused", *extra)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and message in lines[0], (extra, err)
        assert not list(tmp_path.glob("refused/*.png")) and "loaded" not in err
