"""The U-Net: exact LDM key layout, parity with diffusers on random weights, attention options,
gradient checkpointing, channels_last."""
import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

from bench.oracles import diffusers_unet, unet_yaml
from helpers import SMALL_UNET, randomize_, rel_err
from unet import UNet, UNetConfig, diffusers_to_ldm

SD_KEYS = json.loads((Path(__file__).parent / "data" / "ldm_sd15_keys.json").read_text())
PREFIX = "model.diffusion_model."


def test_sd15_keys_and_shapes_equal_the_official_file():
    with torch.device("meta"):
        model = UNet(UNetConfig.sd15())
    assert sum(p.numel() for p in model.parameters()) == 859_520_964
    official = {k[len(PREFIX):]: v[0] for k, v in SD_KEYS.items() if k.startswith(PREFIX)}
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == official


def test_sd15_key_set_converts_cleanly():
    """diffusers' converter maps every one of our SD v1.5 keys onto UNet2DConditionModel's."""
    with torch.device("meta"):
        model = UNet(UNetConfig.sd15())
        ckpt = {PREFIX + k: v for k, v in model.state_dict().items()}
        dcfg = create_unet_diffusers_config_from_ldm(unet_yaml(UNetConfig.sd15()), ckpt)
        converted = convert_ldm_unet_checkpoint(ckpt, dcfg)
        ref = UNet2DConditionModel(**dcfg)
    assert len(converted) == len(ckpt) == 686
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert set(diffusers_to_ldm(converted, UNetConfig.sd15())) == set(model.state_dict())


@pytest.mark.parametrize("cfg,size", [
    (SMALL_UNET, (24, 40)),
    # SD 2 style: linear projections, fixed head width, depth 2, one res block, attention on levels 0 and 2
    (UNetConfig(model_channels=32, attention_resolutions=(1, 4), num_res_blocks=1, channel_mult=(1, 2, 2),
                num_head_channels=8, transformer_depth=2, context_dim=40, use_linear_in_transformer=True), (16, 24)),
    # 3 res blocks, no attention at the highest resolution, sizes not divisible by 2^levels
    (UNetConfig(model_channels=32, attention_resolutions=(2,), num_res_blocks=3, channel_mult=(1, 2), num_heads=2,
                context_dim=24, in_channels=5, out_channels=3), (13, 19)),
    # the tiny training preset's shape with 8 GroupNorm groups (4 channels each) instead of LDM's 32
    (UNetConfig(in_channels=3, out_channels=3, model_channels=32, attention_resolutions=(4,), num_res_blocks=1,
                channel_mult=(1, 1, 2), num_heads=2, context_dim=64, use_linear_in_transformer=True, norm_groups=8),
     (24, 24)),
])
def test_parity_with_diffusers(cfg, size):
    torch.manual_seed(0)
    ours = randomize_(UNet(cfg).eval(), seed=1)
    ref = diffusers_unet(ours, cfg)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, cfg.in_channels, *size, generator=g)
    t = torch.tensor([1, 500, 999])
    ctx = torch.randn(3, 7, cfg.context_dim, generator=g)
    with torch.no_grad():
        got = ours(x, t, ctx)
        want = ref(x, t, ctx).sample
    assert got.shape == (3, cfg.out_channels, *size)
    assert rel_err(got, want) <= 1e-4


@pytest.mark.slow
def test_any_misplaced_weight_is_detected():
    """Swapping any two same-shaped tensors (checked pairwise within each shape group) breaks parity."""
    ours = randomize_(UNet(SMALL_UNET).eval(), seed=3)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 5, 48)
    state = ours.state_dict()
    with torch.no_grad():
        ref = ours(x, t, ctx)
        groups = {}
        for k, v in state.items():
            groups.setdefault(tuple(v.shape), []).append(k)
        for keys in groups.values():
            for a, b in zip(keys, keys[1:]):
                ours.load_state_dict(dict(state, **{a: state[b], b: state[a]}))
                assert rel_err(ours(x, t, ctx), ref) > 1e-3, f"swapping {a} and {b} went unnoticed"
        ours.load_state_dict(state)


def _small_inputs(seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 24, 40, generator=g), torch.tensor([3, 420, 977]), torch.randn(3, 9, 48, generator=g)


def test_bf16_autocast_close_to_fp32():
    ours = randomize_(UNet(SMALL_UNET).eval(), seed=5)
    x, t, ctx = _small_inputs()
    with torch.no_grad():
        full = ours(x, t, ctx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = ours(x, t, ctx)
    assert rel_err(half.float(), full) <= 2e-2


def test_chunked_and_upcast_attention_agree():
    ours = randomize_(UNet(SMALL_UNET).eval(), seed=6)
    x, t, ctx = _small_inputs()
    with torch.no_grad():
        plain = ours(x, t, ctx)
        ours.set_attention(chunk_size=7)
        chunked = ours(x, t, ctx)
        ours.set_attention(chunk_size=None, upcast=True)
        upcast = ours(x, t, ctx)
    assert rel_err(chunked, plain) <= 1e-5
    assert rel_err(upcast, plain) <= 1e-5


def test_context_mask_equals_removing_the_keys():
    ours = randomize_(UNet(SMALL_UNET).eval(), seed=7)
    x, t, ctx = _small_inputs()
    lengths = [9, 4, 1]
    mask = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        masked = ours(x, t, ctx, context_mask=mask)
        for i, n in enumerate(lengths):
            alone = ours(x[i:i + 1], t[i:i + 1], ctx[i:i + 1, :n])
            assert rel_err(masked[i:i + 1], alone) <= 1e-5


def test_gradient_checkpointing_gives_the_same_gradients():
    ours = randomize_(UNet(SMALL_UNET), seed=8)
    x, t, ctx = _small_inputs()
    grads = []
    for flag in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = flag
        ours(x, t, ctx).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-5, atol=1e-7), name


def test_channels_last():
    ours = randomize_(UNet(SMALL_UNET).eval(), seed=9)
    x, t, ctx = _small_inputs()
    with torch.no_grad():
        ref = ours(x, t, ctx)
        ours.to(memory_format=torch.channels_last)
        got = ours(x.to(memory_format=torch.channels_last), t, ctx)
    assert rel_err(got, ref) <= 1e-5


def test_encoder_decoder_halves_and_residuals():
    ours = randomize_(UNet(SMALL_UNET).eval(), seed=10)
    x, t, ctx = _small_inputs()
    with torch.no_grad():
        emb = ours.embed_time(t, 3, x.dtype)
        skips, middle = ours.encode(x, emb, ctx)
        assert len(skips) == 12 and [s.shape[1] for s in skips] == [32] * 4 + [64] * 3 + [96] * 3 + [128] * 2
        assert torch.equal(ours.decode(skips, middle, emb, ctx), ours(x, t, ctx))
        # Residuals are added to the skips / middle before the decoder reads them.
        res = [torch.randn_like(s) for s in skips]
        mid_res = torch.randn_like(middle)
        want = ours.decode([s + r for s, r in zip(skips, res)], middle + mid_res, emb, ctx)
        assert torch.equal(ours.decode(skips, middle, emb, ctx, skip_residuals=res, middle_residual=mid_res), want)
    with pytest.raises(ValueError, match="decode needs 12 skips"):
        ours.decode(skips[:-1], middle, emb, ctx)


def test_bad_inputs_are_named():
    ours = UNet(SMALL_UNET)
    x, t, ctx = _small_inputs()
    with pytest.raises(ValueError, match=r"x must be \(B, 4, H, W\)"):
        ours(x[:, :3], t, ctx)
    with pytest.raises(ValueError, match=r"context must be \(3, L, 48\)"):
        ours(x, t, ctx[..., :40])
    with pytest.raises(ValueError, match=r"timesteps must be a scalar or shape \(3,\)"):
        ours(x, t[:2], ctx)
