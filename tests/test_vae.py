"""The VAE: LDM key layout, parity with diffusers' AutoencoderKL on random weights, tiling, loaders."""
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as HFAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm
from safetensors.torch import save_file

from bench.oracles import diffusers_vae, vae_yaml
from common.weights import CheckpointError
from helpers import randomize_, rel_err
from vae import AutoencoderKL, VAEConfig, config_from_diffusers, diffusers_to_ldm, load_vae

SD_KEYS = json.loads((Path(__file__).parent / "data" / "ldm_sd15_keys.json").read_text())
PREFIX = "first_stage_model."
# Small and odd: 3 levels, 64 channels at the top, one res block; attention only in the mid blocks.
SMALL = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4)


def test_sd15_keys_and_shapes_equal_the_official_file():
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig.sd15())
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    official = {k[len(PREFIX):]: v[0] for k, v in SD_KEYS.items() if k.startswith(PREFIX)}
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == official


def test_sd15_key_set_converts_cleanly():
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig.sd15())
        ckpt = {PREFIX + k: v for k, v in model.state_dict().items()}
        dcfg = create_vae_diffusers_config_from_ldm(vae_yaml(VAEConfig.sd15()), ckpt)
        converted = convert_ldm_vae_checkpoint(ckpt, dcfg)
        ref = HFAutoencoderKL(**dcfg)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ref.state_dict().items()}
    back = diffusers_to_ldm(converted, VAEConfig.sd15())
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("size", [(40, 56), (24, 72)])
def test_parity_with_diffusers(size):
    ours = randomize_(AutoencoderKL(SMALL).eval(), seed=1)
    ref = diffusers_vae(ours, SMALL)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, *size, generator=g) * 2 - 1
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        assert rel_err(post.mean, ref_post.mean) <= 1e-4
        assert rel_err(post.std, ref_post.std) <= 1e-4
        z = post.sample(torch.Generator().manual_seed(3))
        assert rel_err(z, ref_post.sample(torch.Generator().manual_seed(3))) <= 1e-4
        assert rel_err(ours.decode(z), ref.decode(z).sample) <= 1e-4
    assert z.shape == (3, 4, size[0] // 4, size[1] // 4)


def test_attention_at_a_level_builds_and_converts():
    """attn_resolutions puts AttnBlocks into levels too (LDM allows it; SD does not use it)."""
    cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(128,), resolution=256)
    model = randomize_(AutoencoderKL(cfg).eval(), seed=4)
    assert "encoder.down.1.attn.1.q.weight" in model.state_dict()
    with torch.no_grad():
        x = torch.rand(1, 3, 16, 24) * 2 - 1
        assert model.decode(model.encode(x).mean).shape == (1, 3, 16, 24)


def test_any_misplaced_weight_is_detected():
    ours = randomize_(AutoencoderKL(SMALL).eval(), seed=5)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    state = ours.state_dict()

    def run():
        post = ours.encode(x)
        return torch.cat([post.mean.flatten(), post.std.flatten(), ours.decode(post.mean).flatten()])
    with torch.no_grad():
        ref = run()
        groups = {}
        for k, v in state.items():
            groups.setdefault(tuple(v.shape), []).append(k)
        for keys in groups.values():
            for a, b in zip(keys, keys[1:]):
                ours.load_state_dict(dict(state, **{a: state[b], b: state[a]}))
                assert rel_err(run(), ref) > 1e-3, f"swapping {a} and {b} went unnoticed"


def test_tiling_is_exact_for_local_operations():
    """The tiler itself: for a local, translation-equivariant function (receptive field smaller than
    half the overlap) blending overlapping tiles reproduces the untiled result exactly."""
    from vae.model import _tiled
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    up = lambda t: conv(torch.nn.functional.interpolate(t, scale_factor=8.0))  # noqa: E731
    z = torch.randn(2, 4, 37, 50)
    with torch.no_grad():
        full, tiled = up(z), _tiled(up, z, tile=16, overlap=6, scale=8)
    # Tiles are zero-padded at their own borders, so compare where every covering tile is exact:
    # blending weights are zero at a tile's outer edge, except at the image border.
    assert tiled.shape == full.shape
    assert rel_err(tiled, full) <= 1e-5


def test_tiled_vae_close_to_untiled_without_seams():
    """The VAE's GroupNorms and mid-block attention are global, so tiles see other statistics:
    tiling is an approximation. With random weights it stays close on average, and the blended seams
    are no sharper than the image elsewhere."""
    model = randomize_(AutoencoderKL(SMALL).eval(), seed=7)
    g = torch.Generator().manual_seed(8)
    z = torch.randn(1, 4, 40, 56, generator=g)
    x = torch.rand(1, 3, 96, 160, generator=g) * 2 - 1
    with torch.no_grad():
        full, tiled = model.decode(z), model.tiled_decode(z, tile=32, overlap=16)
        post, post_t = model.encode(x), model.tiled_encode(x, tile=96, overlap=32)
        # One tile covering everything is exactly the untiled result.
        assert torch.allclose(model.tiled_decode(z, tile=64, overlap=8), full, atol=1e-6)
    assert tiled.shape == full.shape
    assert ((tiled - full).abs().mean() / full.abs().mean()).item() <= 0.1
    assert ((post_t.mean - post.mean).abs().mean() / post.mean.abs().mean()).item() <= 0.1
    # Column-to-column jumps at the tile boundaries vs everywhere (tiles start at 0 and 16 latents).
    jumps = (tiled[..., 1:] - tiled[..., :-1]).abs().mean(dim=(0, 1, 2))
    seam = jumps[16 * 4 - 1: 32 * 4 + 1]  # the overlap band of the first two tiles, in pixels
    assert seam.max() <= 2 * jumps.mean()


def test_bad_inputs():
    model = AutoencoderKL(SMALL)
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"decode expects \(B, 4, h, w\)"):
        model.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="overlap must be in"):
        model.tiled_decode(torch.zeros(1, 4, 8, 8), tile=8, overlap=8)


# ---- loaders ----------------------------------------------------------------------------------

def _save(path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})
    return path


def _same(model, ref):
    x = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(9)) * 2 - 1
    with torch.no_grad():
        assert rel_err(model.decode(model.encode(x).mean), ref.decode(ref.encode(x).mean)) <= 1e-6


def test_loaders_in_both_layouts(tmp_path):
    ours = randomize_(AutoencoderKL(SMALL).eval(), seed=10)
    single = {PREFIX + k: v for k, v in ours.state_dict().items()}
    single.update({"model.diffusion_model.out.2.bias": torch.zeros(4), "betas": torch.rand(1000),
                   "model_ema.decay": torch.tensor(0.9999)})
    _same(load_vae(_save(tmp_path / "sd.safetensors", single), SMALL), ours)

    diffusers_vae(ours, SMALL).save_pretrained(tmp_path / "pipe" / "vae")
    cfg = config_from_diffusers(json.loads((tmp_path / "pipe" / "vae" / "config.json").read_text()))
    assert cfg == SMALL
    _same(load_vae(tmp_path / "pipe"), ours)

    # Older diffusers files name the attention query/key/value/proj_attn; they load too.
    from safetensors.torch import load_file
    state = load_file(tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors")
    legacy = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value").replace("to_out.0", "proj_attn"): v
              for k, v in state.items()}
    _same(load_vae(_save(tmp_path / "legacy.safetensors", legacy), SMALL), ours)


def test_loader_errors(tmp_path):
    ours = AutoencoderKL(SMALL)
    state = {PREFIX + k: v for k, v in ours.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"1 missing keys: decoder.mid.attn_1.q.bias"):
        load_vae(_save(tmp_path / "p.safetensors", {k: v for k, v in state.items() if "decoder.mid.attn_1.q.bias" not in k}),
                 SMALL)
    with pytest.raises(CheckpointError, match=r"shape mismatches"):
        load_vae(_save(tmp_path / "s.safetensors", state))  # SD v1.5 config against the small file
    with pytest.raises(CheckpointError, match=r"detected layout 'diffusers-unet' holds no VAE"):
        load_vae(_save(tmp_path / "u.safetensors", {"conv_in.weight": torch.zeros(2), "time_embedding.linear_1.weight": torch.zeros(2)}))


def test_gradients_match_diffusers():
    """Backward through encode and decode (the in-place SiLU / adds included) equals diffusers'."""
    ours = randomize_(AutoencoderKL(SMALL), seed=11)
    ref = diffusers_vae(ours, SMALL)
    x = torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(12)) * 2 - 1
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours.decode(ours.encode(x_ours).mean).square().mean().backward()
    ref.decode(ref.encode(x_ref).latent_dist.mean).sample.square().mean().backward()
    assert rel_err(x_ours.grad, x_ref.grad) <= 1e-4
    ref_grads = dict(ref.named_parameters())
    assert rel_err(ours.decoder.conv_in.weight.grad, ref_grads["decoder.conv_in.weight"].grad) <= 1e-4
    assert rel_err(ours.encoder.mid.attn_1.q.weight.grad[:, :, 0, 0],
                   ref_grads["encoder.mid_block.attentions.0.to_q.weight"].grad) <= 1e-4
