"""train.py: DDP equals one process, exact resume, clean stops, learning, precision and locks.

Runs use the tiny preset at 16 px (8-px references) on a small synthetic dataset, so each step takes
a fraction of a second on two CPU cores; the sd15 preset runs on small random SD weights."""
import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train
from data.dataset import RetriBooruDataset
from data.synthetic import generate
from diffusion.schedule import NoiseSchedule
from helpers import FAST, ROOT, losses, max_diff, randomize_, run, sd15_args, torchrun, weights
from retrinet import RetriUNet
from data.stream import BatchStream
from training.checkpoints import read_state
from training.objective import Conditioning, diffusion_loss, lr_at

def test_lr_schedule_warms_up_then_restarts_without_decay():
    kw = dict(lr=1.0, warmup=4, restart_every=10, min_lr=0.1)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == 1.0 and lr_at(14, **kw) == 1.0 and lr_at(24, **kw) == 1.0  # restarts at full rate
    assert lr_at(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert min(lr_at(s, **kw) for s in range(4, 40)) > 0.1


def test_resume_is_exact_across_an_epoch_boundary(data, tmp_path):
    """8 steps straight == 4 steps, stop, resume, 4 steps: the same losses and weights, bit for bit
    (the 6-step epoch ends inside the second half)."""
    assert run(data, tmp_path / "full", "--max-steps", 8, "--save-every", 4) == 0
    assert run(data, tmp_path / "half", "--max-steps", 4, "--save-every", 4) == 0
    assert run(data, tmp_path / "half", "--max-steps", 8, "--save-every", 4, "--resume") == 0
    assert losses(tmp_path / "half") == losses(tmp_path / "full")
    assert len(losses(tmp_path / "full")) == 8
    assert max_diff(weights(tmp_path / "half", 8), weights(tmp_path / "full", 8)) == 0.0
    state = read_state(tmp_path / "full" / "checkpoints" / "step-000008")
    assert state["step"] == 8 and state["data"] == {"epoch": 1, "offset": 2} and state["skipped"] == 0
    # A validation grid was written at the end; keep=3 keeps both checkpoints here.
    assert (tmp_path / "full" / "samples" / "step-000008.png").is_file()
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["step-000004", "step-000008"]


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(data, tmp_path):
    """2 processes x batch 2 x 2 accumulation steps == 1 process x batch 4 x 2 (global batch 8),
    with and without ZeRO-sharded AdamW state; a ZeRO run also resumes exactly.

    Adam's eps is raised to 1e-3 here. Some parameters have a gradient that is exactly zero in
    exact arithmetic (a bias right before a one-channel-per-group GroupNorm, as at the U-Net's
    output); in floats it is rounding noise of ~1e-9, and with eps 1e-8 Adam turns that noise into
    steps of ~lr whose sign depends on the summation order, which DDP changes. That is chaos, not a
    DDP bug (measured: 8.5e-5 on two such biases, < 1e-8 elsewhere); a larger eps damps it."""
    common = ["--batch-size", 2, "--grad-accum", 2, "--max-steps", 4, "--save-every", 2, "--adam-eps", "1e-3"]
    assert run(data, tmp_path / "one", *common[2:], "--batch-size", 4, "--grad-accum", 2) == 0
    one = weights(tmp_path / "one", 4)
    for name, extra in [("ddp", []), ("zero", ["--zero"])]:
        torchrun("--data", data, "--out", tmp_path / name, *FAST, *common, *extra)
        assert max_diff(weights(tmp_path / name, 4), one) < 1e-6, name
        assert losses(tmp_path / name) == pytest.approx(losses(tmp_path / "one"), abs=1e-6)
    assert max_diff(weights(tmp_path / "zero", 4), weights(tmp_path / "ddp", 4)) == 0.0  # sharding is exact
    # The ZeRO checkpoint holds the full optimizer state: resume from step 2 on two processes.
    state = read_state(tmp_path / "zero" / "checkpoints" / "step-000002")
    assert len(state["optimizer"]["state"]) == len(state["optimizer"]["param_groups"][0]["params"])
    shutil.copytree(tmp_path / "zero", tmp_path / "zero2", ignore=shutil.ignore_patterns("step-000004", "log.jsonl"))
    torchrun("--data", data, "--out", tmp_path / "zero2", *FAST, *common, "--zero", "--resume")
    assert max_diff(weights(tmp_path / "zero2", 4), weights(tmp_path / "zero", 4)) == 0.0


@pytest.mark.slow
def test_sigterm_saves_a_loadable_checkpoint_and_exits_cleanly(data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--data", str(data), "--out", str(out), *FAST,
                             "--max-steps", "100000", "--save-every", "100000"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "log.jsonl").is_file() or len(losses(out)) < 2:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM received" in err
    ckpts = list((out / "checkpoints").iterdir())
    assert len(ckpts) == 1 and ckpts[0].name.startswith("step-"), ckpts  # no temporary leftovers
    state = torch.load(ckpts[0] / "state.pt", weights_only=True)
    assert state["step"] == int(ckpts[0].name[5:]) >= 2
    tiny = train.build(train.parse_args(["--data", str(data), "--out", str(out), *FAST]), torch.device("cpu"), 1,
                       out)[0]
    model = RetriUNet.load(ckpts[0] / "retrinet.safetensors", tiny.unet)
    assert not model.train_base and model.lock == "none"  # fine-tuned from the stack, SD's decoder trains


@pytest.mark.slow
def test_tiny_preset_overfits_a_few_samples(tmp_path):
    root = tmp_path / "few"
    generate(root, identities=2, images_per_identity=2, size=32, seed=1, noise_fraction=0.0)
    assert run(root, tmp_path / "out", "--max-steps", 60, "--p-drop", 0, "--lr", "2e-3", "--save-every", 1000) == 0
    loss = losses(tmp_path / "out")
    first, last = sum(loss[:10]) / 10, sum(loss[-10:]) / 10
    assert last < 0.5 * first, (first, last)


def test_non_finite_steps_are_skipped_then_stop_the_run(data, tmp_path):
    """lr 1e30 makes every loss after the first step overflow: 50 skipped steps in a row stop the run
    with status 3 and a checkpoint of the last good (finite) weights. Each NaN step undoes the update
    before it (training/guard.py), which counts as skipped too: the run stops at step 50, not 51."""
    status = run(data, tmp_path / "nan", "--max-steps", 200, "--lr", "1e30", "--warmup", 0, "--weight-decay", 0,
                 "--clip-grad", 0, "--log-every", 1000)
    assert status == 3
    (ckpt,) = (tmp_path / "nan" / "checkpoints").iterdir()
    state = read_state(ckpt)
    assert state["skipped"] == train.MAX_BAD_STEPS and state["step"] == train.MAX_BAD_STEPS
    w = load_file(ckpt / "retrinet.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())
    logged = [json.loads(l) for l in (tmp_path / "nan" / "log.jsonl").read_text().splitlines()]
    assert logged[-1]["loss"] is None and logged[-1]["skipped"] == train.MAX_BAD_STEPS


def test_bf16_autocast_on_cpu(data, tmp_path):
    assert run(data, tmp_path / "bf16", "--max-steps", 3, "--precision", "bf16") == 0
    assert all(math.isfinite(l) for l in losses(tmp_path / "bf16"))
    args = train.parse_args(["--data", str(data), "--out", str(tmp_path / "bf16"), *FAST, "--precision", "bf16"])
    sd, model = train.build(args, torch.device("cpu"), 1, tmp_path / "bf16")
    assert next(sd.text_encoder.parameters()).dtype == torch.bfloat16  # frozen: half precision
    assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}


# -- the sd15 preset on small random SD weights -----------------------------------------------------

class _Recorder(torch.nn.Module):
    """A stand-in denoiser that draws RetriNet's inputs, records its input and answers 0.3 x_t."""
    training_inputs = RetriUNet.training_inputs

    def __init__(self):
        super().__init__()
        self.method, self.config = "retrinet", type("R", (), {"null_reference": False})()

    def forward(self, x_t, t, *args, **kwargs):
        self.x_t, self.t = x_t, t
        return 0.3 * x_t


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_is_eq3_against_the_schedules_target(data, prediction):
    """Eq. 3 by hand from what the denoiser was given: the noise is recovered from x_t and the pixels
    (the tiny preset's pixel space), the target is eps or v = sqrt(acp) eps - sqrt(1 - acp) x_0, and
    the masked, face-weighted mean is taken per sample, then over the batch."""
    from training.presets import build_tiny
    sd, model = build_tiny(0), _Recorder()
    assert sd.clip_sample == 1.0  # pixel space: DDIM clamps its x_0 prediction to [-1, 1]
    schedule = NoiseSchedule(beta_end=0.03, prediction=prediction)
    ds = RetriBooruDataset(data, resolution=16, k=2, ref_resolution=8)
    batch, epoch = next(BatchStream(ds, 3, rank=0, world=1, seed=0, workers=0, pin_memory=False))
    loss = diffusion_loss(model, sd, schedule, Conditioning(sd), batch, epoch=epoch, seed=0, face_weight=0.7,
                          ref_drop=0.0)
    x0 = batch["image"].double()
    acp = schedule.alphas_cumprod.double()[model.t][:, None, None, None]
    eps = (model.x_t.double() - acp.sqrt() * x0) / (1 - acp).sqrt()
    target = eps if prediction == "epsilon" else acp.sqrt() * eps - (1 - acp).sqrt() * x0
    valid, face = batch["valid"].double(), batch["face"].double()
    err = (0.3 * model.x_t.double() - target).pow(2).mean(1, keepdim=True) * valid * (1 + 0.7 * face)
    expected = (err.sum((1, 2, 3)) / valid.sum((1, 2, 3))).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


TRAINABLE = {"none": ("retrinet.", "unet.output_blocks.", "unet.out."), "decoder": ("retrinet.",),
             "both": ("retrinet.cross_attn.", "retrinet.zero_convs.")}


@pytest.mark.parametrize("lock", ["none", "decoder", "both"])
def test_each_lock_trains_exactly_its_parameters(data, tmp_path, small_weights, lock):
    args = train.parse_args(sd15_args(data, tmp_path, small_weights, "--lock", lock))
    assert not train.check_args(args)
    sd, model = train.build(args, torch.device("cpu"), 1, tmp_path)
    randomize_(model.retrinet.zero_convs, seed=4)  # let gradients reach E through the zero-initialised layers
    randomize_(model.retrinet.cross_attn, seed=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen_before = [p.detach().clone() for m in (sd.vae, sd.text_encoder) for p in m.parameters()]
    opt = train.make_optimizer(model.trainable_parameters(), args, 1)
    batch, epoch = next(BatchStream(RetriBooruDataset(data, resolution=32, k=2), 2, rank=0, world=1, seed=0, workers=0,
                                    pin_memory=False))
    loss = diffusion_loss(model, sd, NoiseSchedule.sd15(), Conditioning(sd), batch, epoch=epoch, seed=0,
                          face_weight=0.1, ref_drop=0.0)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {n for n, _ in model.named_parameters() if n.startswith(TRAINABLE[lock])}
    assert with_grad == expected
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, (p for m in (sd.vae, sd.text_encoder)
                                                                  for p in m.parameters())))


def test_sd15_preset_end_to_end_then_sample_py(data, tmp_path, small_weights):
    """Two steps of the sd15 preset with reference dropout; its checkpoint drives sample.py with
    --ref-guidance."""
    out = tmp_path / "sd15"
    assert train.main(sd15_args(data, out, small_weights, "--max-steps", 2, "--ref-drop", 0.2)) == 0
    ckpt = out / "checkpoints" / "step-000002" / "retrinet.safetensors"
    refs = sorted((data / "images").glob("*.png"))[:2]
    w, c = small_weights
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--weights", str(w), "--config", str(c),
                        "--retrinet", str(ckpt), "--refs", *map(str, refs), "--prompt", "1girl", "--steps", "2",
                        "--height", "32", "--width", "32", "--ref-size", "32", "--ref-guidance", "2",
                        "--out", str(tmp_path / "samples")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1


def test_tiny_checkpoint_samples_with_sample_py(data, tmp_path):
    """The tiny preset's base.safetensors + base-config.json + checkpoint load in sample.py (pixel space)."""
    out = tmp_path / "tiny"
    assert run(data, out, "--max-steps", 1, "--ref-drop", 0.5) == 0
    refs = sorted((data / "images").glob("*.png"))[:2]
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--weights", str(out / "base.safetensors"),
                        "--config", str(out / "base-config.json"), "--retrinet",
                        str(out / "checkpoints" / "step-000001" / "retrinet.safetensors"), "--refs", *map(str, refs),
                        "--prompt", "", "--steps", "2", "--sampler", "ddim", "--height", "16", "--width", "16",
                        "--ref-size", "8", "--ref-guidance", "3", "--out", str(tmp_path / "samples")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1


def test_bad_arguments_are_all_reported_before_building(data, tmp_path, capsys):
    status = train.main(["--preset", "sd15", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                         "--resolution", "20", "--prompt-drop", "1.5", "--refs", "0", "--precision", "fp16",
                         "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2
    for expected in ("needs --weights", "no annotations.jsonl", "--resolution 20", "--prompt-drop 1.5", "--refs 0",
                     "fp16"):
        assert expected in err, expected
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a GradScaler needs CUDA")
def test_fp16_grad_scaler_on_cuda(data, tmp_path):
    assert run(data, tmp_path / "fp16", "--max-steps", 3, "--precision", "fp16", "--device", "cuda") == 0
    assert all(math.isfinite(l) for l in losses(tmp_path / "fp16"))
    state = read_state(tmp_path / "fp16" / "checkpoints" / "step-000003")
    assert state["scaler"]["scale"] > 0


def test_tiny_runs_start_from_the_shipped_stack(data, tmp_path):
    """As the paper starts from SD: the U-Net is the stack's, RetriNet's E is a copy of its encoder,
    the run keeps a byte copy of the stack's base, and the IP-Adapter's image encoder is the image
    tower of the stack's CLIP."""
    from clip import load_clip
    from training.presets import STACK, load_tiny_stack
    stack = load_tiny_stack()
    sd, model = train.build(train.parse_args(["--data", str(data), "--out", str(tmp_path), *FAST]),
                            torch.device("cpu"), 0, tmp_path)
    assert (tmp_path / "base.safetensors").read_bytes() == (STACK / "base.safetensors").read_bytes()
    assert (tmp_path / "base-config.json").read_bytes() == (STACK / "base-config.json").read_bytes()
    expected = stack.unet.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in sd.unet.state_dict().items())
    encoder = {k: v for k, v in expected.items() if k.startswith(("time_embed.", "input_blocks.", "middle_block."))}
    copied = {k: v for k, v in model.retrinet.encoder.state_dict().items() if k in encoder}
    assert copied.keys() == encoder.keys() and all(torch.equal(copied[k], encoder[k]) for k in encoder)
    assert not model.train_base and model.lock == "none"
    out = tmp_path / "ip"
    args = train.parse_args(["--data", str(data), "--out", str(out), *FAST, "--method", "ip-adapter"])
    assert args.lock == "decoder" and not train.check_args(args)
    out.mkdir()
    _, ip = train.build(args, torch.device("cpu"), 0, out)
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ip.image_encoder(pixels), load_clip(STACK / "clip").encode_image(pixels), rtol=0, atol=0)


def test_from_scratch_trains_the_base_with_the_method(data, tmp_path):
    args = train.parse_args(["--data", str(data), "--out", str(tmp_path), *FAST, "--from-scratch"])
    assert args.lock == "none" and args.stack is None and not train.check_args(args)
    _, model = train.build(args, torch.device("cpu"), 0, tmp_path)
    assert model.train_base


@pytest.mark.parametrize("extra, message", [
    (["--from-scratch", "--lock", "decoder"], "--from-scratch trains the base U-Net with the method: only --lock none"),
    (["--from-scratch", "--stack", "s"], "--from-scratch builds no stack: leave out --stack"),
    (["--stack", "nowhere"], "--stack: nowhere/base.safetensors: missing"),
    (["--preset", "sd15", "--weights", "w", "--from-scratch"], "--stack / --from-scratch belong to --preset tiny"),
])
def test_stack_options_are_checked(data, tmp_path, capsys, extra, message):
    assert run(data, tmp_path / "o", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_resume_keeps_the_runs_own_base(data, tmp_path):
    """A resumed tiny run loads the base it copied at its start, not what --stack holds now."""
    import shutil
    from training.presets import STACK
    stack = tmp_path / "stack"
    shutil.copytree(STACK, stack)
    out = tmp_path / "run"
    assert run(data, out, "--max-steps", 1, "--stack", stack) == 0
    before = (out / "base.safetensors").read_bytes()
    from safetensors.torch import load_file, save_file
    state = load_file(stack / "base.safetensors")
    save_file({k: v + 1 if k.startswith("model.diffusion_model.") else v for k, v in state.items()},
              str(stack / "base.safetensors"))
    assert run(data, out, "--max-steps", 2, "--stack", stack, "--resume") == 0
    assert (out / "base.safetensors").read_bytes() == before
    sd, _ = train.build(train.parse_args(["--data", str(data), "--out", str(out), *FAST, "--stack", str(stack),
                                          "--resume"]), torch.device("cpu"), 0, out)
    assert torch.equal(sd.unet.out[2].bias, load_file(STACK / "base.safetensors")["model.diffusion_model.out.2.bias"])
