"""The baselines of the paper's Sec. 3.1 in the training loop (train.py --method controlnet | ip-adapter,
tiny preset): they train in settings -a and -b, resume with exactly the losses and weights of an
uninterrupted run, sample through sample.py, equal one process on two, and refuse what does not apply."""
import json

import pytest
from PIL import Image

import train
from helpers import FAST, losses, max_diff, run_sample, sd15_args, torchrun, weights
from training.checkpoints import model_file

METHODS = ["controlnet", "ip-adapter"]
i = FAST.index("--ref-resolution")
FAST = FAST[:i] + FAST[i + 2:]  # a ControlNet's hint has the target's size


def run(data, out, *extra) -> int:
    return train.main(["--data", str(data), "--out", str(out), *FAST, *map(str, extra)])


def _train(data, out, method, *extra):
    return run(data, out, "--method", method, *extra)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_trains_in_a_and_b_resumes_exactly_and_samples(data, tmp_path, method):
    for setting in ("a", "b"):
        full, half = tmp_path / f"full-{setting}", tmp_path / f"half-{setting}"
        assert _train(data, full, method, "--setting", setting, "--max-steps", 4, "--save-every", 2) == 0
        assert _train(data, half, method, "--setting", setting, "--max-steps", 2, "--save-every", 2) == 0
        assert _train(data, half, method, "--setting", setting, "--max-steps", 4, "--save-every", 2, "--resume") == 0
        assert losses(half) == losses(full) and len(losses(full)) == 4
        assert max_diff(weights(half, 4), weights(full, 4)) == 0.0
        assert max_diff(weights(full, 2), weights(full, 4)) > 0  # it learns
        assert (full / "samples" / "step-000004.png").is_file()
    # -a and -b show other references. (A ControlNet's two zero-initialised layers in a row keep the
    # hint's effect on the first losses below float32's resolution; its weights tell.)
    assert max_diff(weights(tmp_path / "full-a", 4), weights(tmp_path / "full-b", 4)) > 0

    run_dir = tmp_path / "full-b"
    ref = next((data / "images").iterdir())
    extra = ["--image-encoder", run_dir / "image-encoder"] if method == "ip-adapter" else []
    r = run_sample("--weights", run_dir / "base.safetensors", "--config", run_dir / "base-config.json",
                   "--retrinet", run_dir / "checkpoints" / "step-000004" / f"{method}.safetensors", "--refs", ref,
                   "--ref-size", 16, "--prompt", "", "--height", 16, "--width", 16, "--steps", 2, "--sampler", "ddim",
                   "--device", "cpu", "--out", tmp_path / "samples", *extra)
    assert r.returncode == 0, r.stderr
    (png,) = (tmp_path / "samples").glob("*.png")
    params = json.loads(Image.open(png).text["parameters"])
    assert params["mode"] == method and params["refs"] == [ref.name]
    if method == "ip-adapter":
        assert params["ip_scale"] == 1.0 and params["image_encoder"] == "image-encoder"


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_equal_one(data, tmp_path, method):
    """2 processes x batch 2 x 2 accumulation == 1 process x batch 4 x 2 (see test_train for why
    Adam's eps is raised)."""
    common = ["--method", method, "--batch-size", 2, "--grad-accum", 2, "--max-steps", 3, "--save-every", 3,
              "--adam-eps", "1e-3"]
    assert run(data, tmp_path / "one", *common[:2], *common[4:], "--batch-size", 4, "--grad-accum", 2) == 0
    torchrun("--data", data, "--out", tmp_path / "two", *FAST, *common)
    assert max_diff(weights(tmp_path / "two", 3), weights(tmp_path / "one", 3)) < 1e-6
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-6)


def test_options_that_do_not_apply_are_refused(data, tmp_path, capsys):
    cases = [
        (["--method", "controlnet", "--task", "compose"], "--method controlnet takes one whole-figure reference"),
        (["--method", "controlnet", "--refs", "2"], "--method controlnet takes one reference: --refs 1, got 2"),
        (["--method", "ip-adapter", "--ref-drop", "0.1"], "--ref-drop replaces RetriNet's references"),
        (["--method", "controlnet", "--heads", "2"], "--heads sets RetriNet's reference attention"),
        (["--method", "controlnet", "--ref-resolution", "8"], "--ref-resolution 8 must equal --resolution 16"),
        (["--method", "ip-adapter", "--prompt-drop", "0.3"], "the IP-Adapter drops the text, the image or both"),
        (["--method", "ip-adapter", "--image-encoder", "x"], "--preset tiny takes its image encoder from its stack's CLIP"),
        (["--image-encoder", "x"], "--image-encoder belongs to --method ip-adapter, not retrinet"),
    ]
    for extra, message in cases:
        assert train.main(["--data", str(data), "--out", str(tmp_path / "o"), "--preset", "tiny",
                           "--resolution", "16", *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert train.main(["--data", str(data), "--out", str(tmp_path / "o"), "--method", "ip-adapter",
                       "--weights", str(data), "--lock", "both"]) == 2
    err = capsys.readouterr().err
    assert "--lock both (LockB) freezes an encoder the IP-Adapter does not have" in err
    assert "--method ip-adapter with --preset sd15 needs --image-encoder" in err


@pytest.fixture(scope="module")
def one_step_runs(data, tmp_path_factory):
    """{method: a tiny run folder with a one-step checkpoint}."""
    root = tmp_path_factory.mktemp("one-step")
    for method in METHODS + ["retrinet"]:
        assert _train(data, root / method, method, "--max-steps", 1, "--save-every", 1) == 0
    return {m: root / m for m in METHODS + ["retrinet"]}


def _checkpoint(run_dir):
    return model_file(run_dir / "checkpoints" / "step-000001")


@pytest.mark.slow
def test_sample_refuses_options_of_other_methods(data, tmp_path, one_step_runs):
    """sample.py names what does not fit the checkpoint's method before it builds anything."""
    refs = sorted((data / "images").iterdir())[:2]

    def sample(method, *extra):
        out = one_step_runs[method]
        return run_sample("--weights", out / "base.safetensors", "--config", out / "base-config.json", "--retrinet",
                          _checkpoint(out), "--prompt", "", "--height", 16, "--width", 16, "--device", "cpu",
                          "--out", tmp_path / "s", *extra)
    encoder = ["--image-encoder", one_step_runs["ip-adapter"] / "image-encoder"]
    cases = [("retrinet", ["--refs", refs[0], "--ip-scale", "0.5"], "--ip-scale applies to IP-Adapter checkpoints"),
             ("retrinet", ["--refs", refs[0], *encoder], "--image-encoder applies to IP-Adapter checkpoints"),
             ("ip-adapter", ["--refs", refs[0]], "is an IP-Adapter: it needs --image-encoder"),
             ("ip-adapter", ["--refs", *refs, *encoder], "the IP-Adapter baseline takes one reference image, got 2"),
             ("controlnet", ["--refs", refs[0], "--ref-guidance", "2"],
              "--ref-guidance needs a RetriNet with a null reference, not a controlnet"),
             ("controlnet", ["--refs", *refs], "the ControlNet baseline takes one reference image, got 2")]
    for method, extra, message in cases:
        r = sample(method, *extra)
        assert r.returncode == 2 and message in r.stderr, (method, extra, r.stderr)
        assert "loaded" not in r.stderr


@pytest.mark.slow
def test_the_evaluation_protocol_runs_every_method(data, tmp_path, one_step_runs, capsys):
    """Every method through python -m eval.protocol; an IP-Adapter at the paper's scale 0.5 by default."""
    from eval import protocol
    from eval.manifest import read_manifest
    ref = next((data / "images").iterdir())
    (tmp_path / "characters.jsonl").write_text(json.dumps({"id": "c1", "refs": [str(ref)]}) + "\n")
    (tmp_path / "prompts.txt").write_text("1girl\n")
    for method, run_dir in one_step_runs.items():
        extra = ["--image-encoder", str(run_dir / "image-encoder")] if method == "ip-adapter" else []
        out = tmp_path / "gens" / method
        argv = ["--characters", str(tmp_path / "characters.jsonl"), "--prompts", str(tmp_path / "prompts.txt"),
                "--seeds", "1", "--per-seed", "1", "--weights", str(run_dir / "base.safetensors"), "--config",
                str(run_dir / "base-config.json"), "--retrinet", str(_checkpoint(run_dir)), "--out", str(out),
                "--size", "16", "--ref-size", "16", "--steps", "2", "--sampler", "ddim", "--device", "cpu", *extra]
        assert protocol.main(argv) == 0, capsys.readouterr().err
        (gen,) = read_manifest(out / "manifest.jsonl")
        params = json.loads(Image.open(gen.image).text["parameters"])
        assert params["mode"] == method and params.get("ip_scale") == (0.5 if method == "ip-adapter" else None)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_sd15_preset_trains_only_the_baseline_then_samples(data, tmp_path, small_weights, method):
    """Two steps of the sd15 preset: SD stays frozen (lock decoder), so the checkpoint holds the
    baseline's own weights only; it drives sample.py (an IP-Adapter with its image encoder)."""
    import dataclasses

    from safetensors.torch import load_file, save_file

    from clip import CLIPVisionConfig, CLIPVisionModelWithProjection
    from helpers import randomize_
    extra = []
    if method == "ip-adapter":
        cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14, projection_dim=24, hidden_act="gelu")
        folder = tmp_path / "image_encoder"
        folder.mkdir()
        encoder = randomize_(CLIPVisionModelWithProjection(cfg), seed=5)
        save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        extra = ["--image-encoder", str(folder)]
    out = tmp_path / "sd15"
    assert train.main(sd15_args(data, out, small_weights, "--method", method, "--max-steps", 2, *extra)) == 0
    ckpt = out / "checkpoints" / "step-000002" / f"{method}.safetensors"  # checkpoint files are named for their method
    prefix = {"controlnet": "control_model.", "ip-adapter": "ip_adapter."}[method]
    assert all(k.startswith(prefix) for k in load_file(ckpt))
    w, c = small_weights
    r = run_sample("--weights", w, "--config", c, "--retrinet", ckpt, "--refs", next((data / "images").iterdir()),
                   "--prompt", "1girl", "--steps", 2, "--height", 32, "--width", 32, "--ref-size", 32,
                   "--device", "cpu", "--out", tmp_path / "samples", *extra)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1


def test_method_and_preset_defaults():
    """What each method and preset fill in where the command line is silent."""
    def parse(*argv):
        return train.parse_args(["--data", "d", "--out", "o", *argv])
    a = parse("--preset", "sd15-256", "--method", "controlnet")  # the paper's baselines (Supp. A.3)
    assert (a.resolution, a.ref_resolution, a.precision, a.lock, a.refs, a.prompt_drop, a.face_weight) == (
        256, 256, "fp16", "decoder", 1, 0.5, 0.0)  # Sec. 3.1: no face loss for the baselines
    a = parse("--preset", "sd15", "--method", "ip-adapter")
    assert (a.resolution, a.precision, a.lock, a.refs, a.prompt_drop) == (384, "fp32", "decoder", 1, 0.0)
    a = parse("--preset", "sd15")
    assert (a.resolution, a.precision, a.lock, a.refs, a.prompt_drop, a.face_weight) == (384, "fp32", "none", 2, 0.5,
                                                                                        0.1)
    a = parse("--preset", "tiny", "--method", "controlnet", "--p-drop", "0.25")
    assert (a.resolution, a.ref_resolution, a.lock, a.prompt_drop) == (24, 24, "decoder", 0.25)  # SD frozen
