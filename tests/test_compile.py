"""torch.compile(fullgraph=True) takes every model whole: the U-Net, the VAE,
the CLIP text and image towers, and one training step's forward and backward of each conditioning
method. A graph break (a Python branch on a tensor's value, `.item()`, a data-dependent shape) is an
error under fullgraph, so these tests fail on the first one. The aot_eager backend traces forward
and backward exactly as inductor would see them but runs them with eager kernels, so no compiler
toolchain is needed; its outputs must equal eager mode's. train.py --compile and sample.py
--compile use it."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch._dynamo
from PIL import Image

from clip import CLIPVisionModelWithProjection
from helpers import FAST, losses, randomize_, run, run_sample, torchrun
from retrinet import METHODS, MethodOptions, build_model
from training.objective import Conditioning, denoising_loss
from training.presets import build_tiny, tiny_configs
from unet import UNet
from vae import AutoencoderKL, VAEConfig

BACKEND = "aot_eager"


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend=BACKEND, fullgraph=True)


def close(a, b, tol=1e-5):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item() <= tol


def small_sd(seed: int):
    """The tiny preset with a two-level U-Net: a smaller graph to trace, the same kinds of blocks
    (ResBlocks, a transformer level, down- and up-sampling, skips)."""
    sd = build_tiny(seed)
    cfg = dataclasses.replace(sd.unet.config, channel_mult=(1, 2), attention_resolutions=(2,))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sd.unet = UNet(cfg)
    return sd


@pytest.fixture(scope="module")
def sd():
    return small_sd(11)


@pytest.mark.slow
def test_unet_text_and_image_towers_compile_whole(sd):
    g = torch.Generator().manual_seed(0)
    unet = randomize_(sd.unet, 1)  # every parameter, the zero-initialised output layers too
    x, ctx = torch.randn(3, 3, 24, 16, generator=g), torch.randn(3, 77, 64, generator=g)
    t = torch.tensor([3, 511, 998])
    with torch.no_grad():
        assert close(compiled(unet)(x, t, ctx), unet(x, t, ctx))
        ids = torch.randint(0, 49408, (2, 77), generator=g)
        assert close(compiled(sd.text_encoder)(ids), sd.text_encoder(ids))
        vision = randomize_(CLIPVisionModelWithProjection(tiny_configs()["image_encoder"]), 2)
        pixels = torch.randn(2, 3, 32, 32, generator=g)
        assert close(compiled(vision)(pixels), vision(pixels))


@pytest.mark.slow
def test_vae_compiles_whole():
    vae = randomize_(AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4)), 3)
    g = torch.Generator().manual_seed(1)
    z, image = torch.randn(2, 4, 5, 7, generator=g), torch.randn(2, 3, 10, 14, generator=g)
    with torch.no_grad():
        assert close(compiled(vae.decode)(z), vae.decode(z))
        assert close(compiled(lambda im: vae.encode(im).mean)(image), vae.encode(image).mean)


def method_inputs(method: str, b: int, g: torch.Generator) -> tuple:
    """A model of `method` built as train.py builds it (retrinet.build_model, the method's default
    lock) on a fresh tiny U-Net (every parameter random, the zero convs too), and its inputs as its
    own `training_inputs` draws them from a batch: RetriNet with a missing reference and a dropped
    sample (null reference), ControlNet's hint at the target's size, IP-Adapter's image embedding
    with one sample's image dropped."""
    sd = small_sd(12)
    encoder = CLIPVisionModelWithProjection(tiny_configs()["image_encoder"])
    options = MethodOptions(lock=METHODS[method].training_defaults["lock"], heads=1, null_reference=True,
                            hint_downscale=1, image_encoder=encoder)
    model = randomize_(build_model(method, sd.unet, options), 4)
    k = METHODS[method].training_defaults["refs"]
    batch = {"image": torch.rand(b, 3, 24, 24, generator=g) * 2 - 1,
             "refs": torch.rand(b, k, 3, 24, 24, generator=g) * 2 - 1,
             "ref_mask": torch.tensor([[True, True], [True, False], [False, False]])[:, :k],
             "prompt": ["1girl, blue background", "", "1boy"], "concepts": [["figure"] * k] * b}
    gens = [torch.Generator().manual_seed(i) for i in range(b)]
    u = torch.tensor([0.9, 0.01, 0.9])  # the second sample drops its references (RetriNet) or its image (IP-Adapter)
    with torch.no_grad():
        inputs = model.training_inputs(sd, Conditioning(sd), batch, gens, u, ref_drop=0.5)
    return model, inputs


@pytest.mark.slow
@pytest.mark.parametrize("method", ["retrinet", "controlnet", "ip-adapter"])
def test_training_step_forward_and_backward_compile_whole(method):
    """denoising_loss (the model's forward and the masked, weighted loss) compiled whole gives eager
    mode's loss and every parameter's gradient."""
    g, b = torch.Generator().manual_seed(5), 3
    model, inputs = method_inputs(method, b, g)
    step = dict(x_t=torch.randn(b, 3, 24, 24, generator=g), t=torch.tensor([7, 420, 990]), inputs=inputs,
                target=torch.randn(b, 3, 24, 24, generator=g), valid=(torch.rand(b, 1, 24, 24, generator=g) > 0.2).float(),
                face_factor=1 + 0.1 * torch.rand(b, 1, 24, 24, generator=g), sample_weight=torch.rand(b, generator=g))
    grads = []
    for fn in (denoising_loss, compiled(denoising_loss)):
        model.zero_grad(set_to_none=True)
        loss = fn(model, **step)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (eager_loss, eager), (comp_loss, comp) = grads
    assert close(comp_loss, eager_loss)
    assert eager.keys() == comp.keys() and len(eager) == len(list(model.trainable_parameters()))
    assert all(close(comp[n], eager[n], 1e-4) for n in eager), [n for n in eager if not close(comp[n], eager[n], 1e-4)]


@pytest.mark.slow
def test_train_compile_gives_eager_losses_in_one_process_and_under_ddp(data, tmp_path):
    """train.py --compile: one process (the loss one graph, fullgraph) gives eager's losses; so do two
    processes with the same global batch, where DDP's forward hooks run between graphs (Adam's eps
    raised as in test_train's DDP test, so that two processes equal one). The IP-Adapter, whose graph
    is the quickest to trace: each method's own graph is tested above, the wiring here is common."""
    common = [*FAST, "--method", "ip-adapter", "--max-steps", 2, "--save-every", 2, "--adam-eps", "1e-3",
              "--device", "cpu"]
    assert run(data, tmp_path / "eager", *common) == 0
    assert run(data, tmp_path / "compiled", *common, "--compile", BACKEND) == 0
    torchrun("--data", data, "--out", tmp_path / "ddp", *common, "--batch-size", 2, "--compile", BACKEND)
    eager = losses(tmp_path / "eager")
    assert len(eager) == 2 and np.allclose(losses(tmp_path / "compiled"), eager, rtol=1e-4, atol=0)
    assert np.allclose(losses(tmp_path / "ddp"), eager, rtol=1e-4, atol=0)


@pytest.mark.slow
def test_sample_compile_gives_eager_images(data, tmp_path):
    assert run(data, tmp_path / "run", "--max-steps", 1, "--save-every", 1, "--device", "cpu") == 0
    run_dir = tmp_path / "run"
    ref = next((data / "images").iterdir())
    common = ["--weights", run_dir / "base.safetensors", "--config", run_dir / "base-config.json",
              "--retrinet", run_dir / "checkpoints" / "step-000001" / "retrinet.safetensors", "--refs", ref,
              "--ref-size", 8, "--prompt", "1girl", "--height", 16, "--width", 16, "--steps", 3, "--sampler", "ddim",
              "--num", 2, "--device", "cpu"]
    images = []
    for name, extra in (("eager", []), ("compiled", ["--compile", BACKEND])):
        r = run_sample(*common, "--out", tmp_path / name, *extra)
        assert r.returncode == 0, r.stderr
        pngs = sorted((tmp_path / name).glob("*.png"))
        assert len(pngs) == 2
        images.append(np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in pngs]))
        assert json.loads(Image.open(pngs[0]).text["parameters"])["mode"] == "retrinet"
    assert np.abs(images[0] - images[1]).max() <= 1  # rounding to uint8 may differ by one level


def test_unknown_backend_is_refused_before_anything_runs(data, tmp_path, capsys):
    assert run(data, tmp_path / "out", "--compile", "no-such-backend", "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert "--compile no-such-backend: not a torch.compile backend" in err and "aot_eager" in err
    assert not (tmp_path / "out").exists()
    r = run_sample("--weights", tmp_path, "--prompt", "x", "--compile", "no-such-backend", "--device", "cpu",
                   "--out", tmp_path / "s")
    assert r.returncode == 2 and "--compile no-such-backend: not a torch.compile backend" in r.stderr
