"""train.py's levers for learning per CPU-minute: --ema (training/ema.py), --snr-gamma
(training/objective.snr_weight) and --added-lr-scale: the average's update rule, exact resume, the
file that sample.py and the demo load, the loss weights against diffusers' implementation, and the
learning rate of each parameter group."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from data.synthetic import generate
from diffusion.schedule import NoiseSchedule
from helpers import FAST as TRAIN_FAST
from retrinet import RetriUNet
from training.checkpoints import read_state
from training.ema import EMA, EMA_FILE
from training.objective import lr_at, snr_weight

FAST = [*TRAIN_FAST[:-1], "5"]   # test_train's fast tiny run, seed 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema-data") / "syn"
    generate(root, identities=6, images_per_identity=3, size=32, seed=1, noise_fraction=0.0)
    return root


def run(data, out, *extra) -> int:
    return train.main(["--data", str(data), "--out", str(out), *FAST, *map(str, extra)])


def test_update_rule_with_warm_up_and_exact_swap():
    torch.manual_seed(0)
    p = [torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(7))]
    ema = EMA(p, decay=0.9)
    expected = [x.detach().clone() for x in p]
    for n in range(1, 30):
        with torch.no_grad():
            for x in p:
                x.add_(torch.randn_like(x))
        d = min(0.9, (1 + n) / (10 + n))           # LDM's LitEma warm-up
        assert ema.current_decay() == pytest.approx(d)
        ema.update()
        expected = [d * e + (1 - d) * x.detach() for e, x in zip(expected, p)]
    assert ema.updates == 29
    for s, e in zip(ema.shadow, expected):
        torch.testing.assert_close(s, e, rtol=1e-6, atol=1e-6)
    before = [x.detach().clone() for x in p]
    with ema.applied():
        assert all(torch.equal(x, s) for x, s in zip(p, ema.shadow))
    assert all(torch.equal(x, b) for x, b in zip(p, before))
    with pytest.raises(ValueError, match="within"):
        EMA(p, decay=1.0)


@pytest.mark.slow
def test_resume_keeps_the_average_exactly_and_the_demo_file_loads(data, tmp_path):
    """6 steps straight == 3 steps, stop, resume, 3 steps: the same weights and the same average,
    bit for bit; the average is a model file of its own that RetriUNet.load reads, and it is not the
    last weights."""
    assert run(data, tmp_path / "full", "--max-steps", 6, "--save-every", 3, "--ema", 0.8) == 0
    assert run(data, tmp_path / "half", "--max-steps", 3, "--save-every", 3, "--ema", 0.8) == 0
    assert run(data, tmp_path / "half", "--max-steps", 6, "--save-every", 3, "--ema", 0.8, "--resume") == 0
    for name in ("retrinet.safetensors", EMA_FILE):
        a = load_file(tmp_path / "full" / "checkpoints" / "step-000006" / name)
        b = load_file(tmp_path / "half" / "checkpoints" / "step-000006" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ckpt = tmp_path / "full" / "checkpoints" / "step-000006"
    assert read_state(ckpt)["ema_updates"] == 6
    raw, avg = load_file(ckpt / "retrinet.safetensors"), load_file(ckpt / EMA_FILE)
    assert max((raw[k] - avg[k]).abs().max().item() for k in raw) > 1e-4
    from diffusion.sd15 import load_configs, load_sd15
    sd = load_sd15(tmp_path / "full" / "base.safetensors", configs=load_configs(tmp_path / "full" / "base-config.json"))
    model = RetriUNet.load(ckpt / EMA_FILE, sd.unet)
    state = {**{f"unet.{k}": v for k, v in model.unet.state_dict().items() if f"unet.{k}" in avg},
             **{k: v for k, v in model.state_dict().items() if k in avg}}
    assert all(torch.equal(state[k], avg[k]) for k in avg)


@pytest.mark.slow
def test_resume_without_an_average_starts_one(data, tmp_path, capsys):
    out = tmp_path / "o"
    assert run(data, out, "--max-steps", 2, "--save-every", 2) == 0
    assert run(data, out, "--max-steps", 3, "--save-every", 3, "--ema", 0.5, "--resume") == 0
    assert "holds no weight average (ema.safetensors); --ema starts one from its weights" in capsys.readouterr().err
    assert read_state(out / "checkpoints" / "step-000003")["ema_updates"] == 1


@pytest.mark.parametrize("value, message", [("1", "--ema 1.0 must be within [0, 1) (0: no average)"),
                                            ("-0.5", "--ema -0.5 must be within [0, 1)"),
                                            ("nan", "--ema nan must be a finite number"),
                                            ("-1", "--snr-gamma -1.0 must be >= 0 (0: off)"),
                                            ("0", "--added-lr-scale 0.0 must be > 0")])
def test_bad_values_are_refused_up_front(data, tmp_path, capsys, value, message):
    option = message.split()[0]
    assert run(data, tmp_path / "o", option, value) == 2
    err = capsys.readouterr().err
    assert f"train.py: error: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_snr_weights_equal_diffusers(prediction):
    """diffusers' train_text_to_image.py: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    schedule = NoiseSchedule(beta_end=0.03, prediction=prediction)
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=schedule.beta_start, beta_end=schedule.beta_end,
                        num_train_timesteps=schedule.num_train_timesteps, prediction_type=prediction)
    t = torch.tensor([0, 3, 17, 250, 499, 731, 998, 999])
    for gamma in (1.0, 5.0):
        snr = compute_snr(ref, t)
        want = torch.stack([snr, gamma * torch.ones_like(snr)], 1).min(1)[0]
        want = want / (snr + 1) if prediction == "v_prediction" else want / snr
        torch.testing.assert_close(snr_weight(schedule, t, gamma), want.float(), rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_snr_gamma_changes_the_loss_by_the_weights(data, tmp_path):
    """One step's logged loss with --snr-gamma differs from plain, and a huge gamma is the plain v
    loss times SNR / (SNR + 1) < 1 per sample, so it can only be smaller."""
    assert run(data, tmp_path / "plain", "--max-steps", 1) == 0
    assert run(data, tmp_path / "snr", "--max-steps", 1, "--snr-gamma", 1e9) == 0

    def loss(out):
        return json.loads((Path(out) / "log.jsonl").read_text().splitlines()[0])["loss"]
    assert 0 < loss(tmp_path / "snr") < loss(tmp_path / "plain")


@pytest.mark.slow
def test_added_lr_scale_gives_the_added_modules_their_own_rate(data, tmp_path, capsys):
    """Two parameter groups: the U-Net's at --lr's schedule, RetriNet's (E, cross-attention, zero convs)
    at X times it; a resume may change X (the run's own X applies) but not between 1 and another value."""
    from training.presets import build_tiny
    out = tmp_path / "o"
    assert run(data, out, "--max-steps", 2, "--save-every", 2, "--added-lr-scale", 3, "--lr", 1e-3) == 0
    assert run(data, out, "--max-steps", 3, "--save-every", 3, "--added-lr-scale", 5, "--lr", 1e-3, "--resume") == 0
    model = RetriUNet(build_tiny(0).unet, heads=1, null_reference=False)  # lock none: the U-Net's decoder trains
    n_added = sum(1 for p in model.retrinet.parameters() if p.requires_grad)
    n_base = sum(1 for p in model.unet.parameters() if p.requires_grad)
    for step, scale in ((2, 3), (3, 5)):
        groups = read_state(out / "checkpoints" / f"step-{step:06d}")["optimizer"]["param_groups"]
        lr = lr_at(step - 1, lr=1e-3, warmup=2, restart_every=100_000)
        assert [len(g["params"]) for g in groups] == [n_base, n_added]
        assert groups[0]["lr"] == pytest.approx(lr) and groups[1]["lr"] == pytest.approx(scale * lr), step
    capsys.readouterr()
    assert run(data, out, "--max-steps", 4, "--save-every", 4, "--lr", 1e-3, "--resume") == 1
    err = capsys.readouterr().err
    assert "its optimizer state does not fit" in err and "--added-lr-scale 1 keeps one parameter group" in err
    assert "Traceback" not in err
