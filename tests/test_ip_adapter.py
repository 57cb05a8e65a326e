"""The IP-Adapter baseline (IPAdapterUNet): the decoupled cross-attention it installs in the U-Net,
parity with diffusers' UNet2DConditionModel carrying the same weights loaded through diffusers' own
IP-Adapter loader, the official layout and its layer numbering, our files, locks and gradients,
reference encoding and sampling."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
from diffusers.models.attention_processor import AttnProcessor, IPAdapterAttnProcessor2_0
from PIL import Image
from safetensors.torch import save_file

from bench.oracles import diffusers_ip_adapter, diffusers_unet, unet_yaml
from clip import CLIPVisionConfig, CLIPVisionModelWithProjection, preprocess
from common.images import fit_and_pad
from common.weights import CheckpointError
from helpers import randomize_, rel_err
from retrinet import (ControlNetUNet, IPAdapterConfig, IPAdapterUNet, inspect_checkpoint, load_ip_adapter,
                      load_reference_model, official_numbers)
from retrinet.ip_adapter import (DecoupledContext, DecoupledCrossAttention, ImageKV, clip_pixels,
                                 official_key_map)
from unet import UNet, UNetConfig
from unet.loading import SD_UNET_PREFIX

# Odd and small: attention on levels 0 and 2 only (none at 64 channels), depth 2 on the last level and in
# the middle, 4 heads of width 8 / 24, context 40: 6 down, 2 mid, 9 up = 17 transformer blocks.
CFG = UNetConfig(model_channels=32, attention_resolutions=(1, 4), num_res_blocks=2, channel_mult=(1, 2, 3),
                 num_heads=4, transformer_depth=(1, 1, 2), context_dim=40)
EMBED = 24  # the image encoder's projection


def _model(lock="decoder", seed=0, image_encoder=None, cfg=CFG):
    unet = randomize_(UNet(cfg).eval(), seed=seed)
    model = IPAdapterUNet(unet, image_embed_dim=EMBED, lock=lock, image_encoder=image_encoder).eval()
    randomize_(model.adapter, seed=seed + 1)
    return model


def _inputs(seed=2, b=3, size=(16, 24), cfg=CFG):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, *size, generator=g), torch.tensor([3, 500, 999, 42][:b]),
            torch.randn(b, 7, cfg.context_dim, generator=g), torch.randn(b, EMBED, generator=g))


def _official_state(model: IPAdapterUNet) -> dict[str, torch.Tensor]:
    """The adapter's weights under the official file's keys (ip-adapter_sd15.safetensors), via our table."""
    own = model.adapter.state_dict()
    return {theirs: own[ours].contiguous() for theirs, ours in official_key_map(model.unet.config).items()}


def _diffusers_order(names) -> list[str]:
    """diffusers' cross-attention processor names sorted into our module order: down, mid, up."""
    part = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(names, key=lambda n: (part[n.split(".")[0]], [int(s) for s in n.split(".") if s.isdigit()]))


# -- the official numbering ---------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [CFG, UNetConfig.sd15()], ids=["small", "sd15"])
def test_official_numbers_follow_diffusers_loader(cfg):
    """Fill each official `ip_adapter.{n}` with n, let diffusers' loader place them, and read them back in
    our module order: they are official_numbers(cfg)."""
    numbers = official_numbers(cfg)
    with torch.device("meta"):
        ckpt = {SD_UNET_PREFIX + k: v for k, v in UNet(cfg).state_dict().items()}
        dcfg = create_unet_diffusers_config_from_ldm(unet_yaml(cfg), ckpt)
        ref = UNet2DConditionModel(**dcfg)
        model = IPAdapterUNet(UNet(cfg), image_embed_dim=1024)
    shapes = {k: v.shape for k, v in model.adapter.state_dict().items()}
    state = {"image_proj": {"proj.weight": torch.zeros(4 * cfg.context_dim, 1024)}, "ip_adapter": {}}
    for theirs, ours in official_key_map(cfg).items():
        if theirs.startswith("ip_adapter."):
            n = int(theirs.split(".")[1])
            state["ip_adapter"][theirs[len("ip_adapter."):]] = torch.full(shapes[ours], float(n))
    procs = ref._convert_ip_adapter_attn_to_diffusers([state], low_cpu_mem_usage=False)
    cross = {name: p for name, p in procs.items() if isinstance(p, IPAdapterAttnProcessor2_0)}
    got = [int(cross[name].to_k_ip[0].weight[0, 0]) for name in _diffusers_order(cross)]
    assert got == numbers
    assert [int(cross[name].to_v_ip[0].weight[0, 0]) for name in _diffusers_order(cross)] == numbers
    assert len(numbers) == len(model.adapter.layers) == sum(
        isinstance(m, DecoupledCrossAttention) for m in model.unet.modules())
    if cfg == UNetConfig.sd15():
        assert numbers == [1, 3, 5, 7, 9, 11, 31, 13, 15, 17, 19, 21, 23, 25, 27, 29]
        assert sum(p.numel() for p in model.adapter.parameters()) == 22_319_616  # ip-adapter_sd15's 22M
    else:
        assert numbers == [1, 3, 5, 7, 9, 11, 31, 33, 13, 15, 17, 19, 21, 23, 25, 27, 29]


# -- parity with diffusers ----------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_parity_with_diffusers(scale):
    model = _model()
    ref = diffusers_ip_adapter(diffusers_unet(model.unet, CFG), _official_state(model), scale)
    x, t, ctx, embeds = _inputs()
    with torch.no_grad():
        want = ref(x, t, ctx, added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
        got = model(x, t, ctx, embeds, scale=scale)
        plain = model.unet(x, t, ctx)
    assert rel_err(got, want) <= 1e-4
    assert rel_err(got, plain) > 1e-2  # the image matters


def _sd15_twin(ours: UNet) -> UNet2DConditionModel:
    """diffusers_unet at SD v1.5 size without a second random initialisation: built on the meta
    device, it takes our (converted) tensors as they are."""
    cfg = ours.config
    ckpt = {SD_UNET_PREFIX + k: v for k, v in ours.state_dict().items()}
    dcfg = create_unet_diffusers_config_from_ldm(unet_yaml(cfg), ckpt)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**dcfg)
    ref.load_state_dict(convert_ldm_unet_checkpoint(ckpt, dcfg), strict=True, assign=True)
    ref.set_attn_processor(AttnProcessor())
    return ref.eval()


@pytest.mark.slow
def test_parity_with_diffusers_at_sd15_size():
    cfg = UNetConfig.sd15()
    with torch.device("meta"):
        unet = UNet(cfg)
    unet = randomize_(unet.to_empty(device="cpu"), seed=5).eval()
    model = IPAdapterUNet(unet, image_embed_dim=1024).eval()  # the official ViT-H/14 embedding
    randomize_(model.adapter, seed=6)
    ref = diffusers_ip_adapter(_sd15_twin(unet), _official_state(model), 0.6)
    g = torch.Generator().manual_seed(7)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 800])
    ctx, embeds = torch.randn(2, 77, 768, generator=g), torch.randn(2, 1024, generator=g)
    with torch.no_grad():
        want = ref(x, t, ctx, added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
        got = model(x, t, ctx, embeds, scale=0.6)
    assert rel_err(got, want) <= 1e-4


# -- the installed attention ----------------------------------------------------------------------------

def _decoupled(model, x, t, ctx, image_kv, scale, mask=None):
    """The U-Net on a DecoupledContext, as IPAdapterUNet.forward runs it, with an optional text mask."""
    unet = model.unet
    emb = unet.embed_time(t, x.shape[0], x.dtype)
    context = DecoupledContext(ctx, image_kv, scale)
    skips, middle = unet.encode(x, emb, context, mask)
    return unet.decode(skips, middle, emb, context, mask)


def test_scale_zero_and_a_text_context_are_plain_sd():
    """With the image attention installed, a text context is plain SD, exactly, and so is the model at
    scale 0; image attention weighted 0, through the installed layers themselves, adds exactly nothing."""
    model = _model()
    x, t, ctx, embeds = _inputs()
    untouched = randomize_(UNet(CFG).eval(), seed=0)  # the same U-Net without an IP-Adapter
    with torch.no_grad():
        plain = untouched(x, t, ctx)
        assert torch.equal(model.unet(x, t, ctx), plain)
        assert torch.equal(model(x, t, ctx, embeds, scale=0.0), plain)
        assert torch.equal(_decoupled(model, x, t, ctx, model.adapter(embeds), 0.0), plain)
        assert torch.equal(_decoupled(model, x, t, ctx, model.adapter(embeds), 0.6), model(x, t, ctx, embeds, 0.6))
    with pytest.raises(ValueError, match=r"image_embeds must be \(3, 24\)"):
        model(x, t, ctx, embeds[:, :10])
    with pytest.raises(ValueError, match=r"context must be \(3, L, 40\), got \(3, 7, 30\)"):
        model(x, t, ctx[..., :30], embeds)


def test_the_image_attention_is_installed_in_place():
    """Each transformer block's attn2 becomes a DecoupledCrossAttention numbered in module order (the
    adapter's layer order), holding the very projection modules it replaced: the U-Net's keys and
    weights stay SD's, the model's are the U-Net's and the adapter's, and no adapter weight sits in
    the U-Net. A second IP-Adapter around the same U-Net keeps the installed layers; each model keeps
    its own weights."""
    unet = randomize_(UNet(CFG).eval(), seed=0)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    originals = [m.attn2 for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    model = IPAdapterUNet(unet, image_embed_dim=EMBED).eval()
    randomize_(model.adapter, seed=1)
    attns = [m.attn2 for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert all(type(a) is DecoupledCrossAttention for a in attns)
    assert [a.index for a in attns] == list(range(17)) == list(range(len(model.adapter.layers)))
    names = [n for n, m in unet.named_modules() if isinstance(m, DecoupledCrossAttention)]
    assert all(n.endswith(".attn2") for n in names)
    assert [n.split(".")[0] for n in names] == ["input_blocks"] * 6 + ["middle_block"] * 2 + ["output_blocks"] * 9
    for new, old in zip(attns, originals):
        assert all(getattr(new, p) is getattr(old, p) for p in ("to_q", "to_k", "to_v", "to_out"))
        assert not any(True for _ in new.parameters(recurse=False))
    state = unet.state_dict()
    assert list(state) == list(before) and all(torch.equal(state[k], v) for k, v in before.items())
    assert list(model.state_dict()) == [f"unet.{k}" for k in before] + [f"adapter.{k}" for k in model.adapter.state_dict()]
    assert not any(isinstance(m, ImageKV) for m in unet.modules())

    x, t, ctx, embeds = _inputs()
    with torch.no_grad():
        want = model(x, t, ctx, embeds, scale=0.6)
        other = IPAdapterUNet(unet, image_embed_dim=EMBED).eval()
        randomize_(other.adapter, seed=20)
        assert [m.attn2 for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"] == attns
        assert torch.equal(model(x, t, ctx, embeds, scale=0.6), want)
        assert rel_err(other(x, t, ctx, embeds, scale=0.6), want) > 1e-3


def test_the_text_mask_applies_to_the_text_alone():
    """Masking the last text tokens is dropping them; the image keys are never masked."""
    model = _model()
    x, t, ctx, embeds = _inputs()
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[:, 4:] = False
    with torch.no_grad():
        image_kv = model.adapter(embeds)
        masked = _decoupled(model, x, t, ctx, image_kv, 0.6, mask)
        assert rel_err(masked, _decoupled(model, x, t, ctx[:, :4], image_kv, 0.6)) <= 1e-5
        assert rel_err(masked, _decoupled(model, x, t, ctx, image_kv, 0.6)) > 1e-3  # the mask matters


def test_a_recorder_sees_the_text_attention():
    """An attention recorder (retrinet.AttentionRecorder's callback) on an installed layer gets the
    queries and the text keys, once per call, with or without the image."""
    model = _model()
    x, t, ctx, embeds = _inputs()
    attn = model.unet.middle_block[1].transformer_blocks[0].attn2
    calls = []
    attn.recorder = lambda module, q, k: calls.append((module, q.shape, k.shape))
    with torch.no_grad():
        model(x, t, ctx, embeds, scale=0.6)
        model(x, t, ctx, embeds, scale=0.0)
    assert [(m is attn, k) for m, _, k in calls] == [(True, (3, 4, 7, 24))] * 2


def _grads(model, x, t, ctx, embeds):
    model.zero_grad()
    model(x, t, ctx, embeds).square().mean().backward()
    assert all(p.grad.stride() == p.stride() for p in model.parameters() if p.grad is not None)  # DDP's bucket layout
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_reach_exactly_what_trains():
    encoder = randomize_(CLIPVisionModelWithProjection(_tiny_clip()), seed=9)
    model = _model(image_encoder=encoder).train()
    assert not encoder.training  # stays in eval mode
    x, t, ctx, embeds = _inputs(b=2)
    adapter = {"adapter." + n for n, _ in model.adapter.named_parameters()}
    grads = _grads(model, x, t, ctx, embeds)
    assert set(grads) == adapter and all(g.abs().max() > 0 for g in grads.values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapter
    assert model.frozen_parts()[-1] is encoder and all(not p.requires_grad for p in encoder.parameters())

    model.set_lock("none")
    grads = _grads(model, x, t, ctx, embeds)
    decoder = {n for n, _ in model.named_parameters() if n.startswith(("unet.output_blocks.", "unet.out."))}
    assert set(grads) == adapter | decoder
    assert encoder in model.frozen_parts() and model.unet.output_blocks not in model.frozen_parts()


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _model().train()
    x, t, ctx, embeds = _inputs(b=2)
    plain = _grads(model, x, t, ctx, embeds)
    model.unet.gradient_checkpointing = True
    checkpointed = _grads(model, x, t, ctx, embeds)
    assert plain.keys() == checkpointed.keys()
    for name, g in plain.items():
        assert torch.allclose(checkpointed[name], g, rtol=1e-5, atol=1e-7), name


def test_lockb_is_refused():
    unet = UNet(CFG)
    with pytest.raises(ValueError, match="LockB does not apply to IP-Adapter"):
        IPAdapterUNet(unet, lock="both")
    model = IPAdapterUNet(unet)
    with pytest.raises(ValueError, match="LockB does not apply to IP-Adapter"):
        model.set_lock("both")
    assert model.lock == "decoder"


# -- files --------------------------------------------------------------------------------------------

def test_official_files_load(tmp_path):
    model = _model()
    x, t, ctx, embeds = _inputs()
    with torch.no_grad():
        want = model(x, t, ctx, embeds)
    official = _official_state(model)
    assert sorted(official) == sorted(["image_proj.proj.weight", "image_proj.proj.bias", "image_proj.norm.weight",
                                       "image_proj.norm.bias"] + [f"ip_adapter.{n}.to_{kv}_ip.weight"
                                                                  for n in range(1, 34, 2) for kv in "kv"])
    save_file(official, tmp_path / "ip-adapter.safetensors")
    for load in (IPAdapterUNet.load, load_ip_adapter, load_reference_model):
        loaded = load(tmp_path / "ip-adapter.safetensors", model.unet).eval()
        assert isinstance(loaded, IPAdapterUNet) and loaded.config == IPAdapterConfig(EMBED, 4)
        assert loaded.lock == "decoder"
        with torch.no_grad():
            assert torch.equal(loaded(x, t, ctx, embeds), want), load.__name__

    info = inspect_checkpoint(tmp_path / "ip-adapter.safetensors")
    assert (info.method, info.layout, info.config, info.unet_config) == ("ip-adapter", "official",
                                                                         IPAdapterConfig(EMBED, 4), None)
    assert info.base_mismatch(CFG) == {}
    # Another base (attention on level 0 only: 2 down, 2 mid, 3 up): its table renames the file's numbers;
    # numbers beyond it keep their official names.
    diff = info.base_mismatch(dataclasses.replace(CFG, attention_resolutions=(1,)))
    assert all(theirs != ours for theirs, ours in diff.values())
    assert diff["layers.4.to_k_ip.weight"] == ([96, 40], [32, 40])  # the first up layer is number 5 there
    assert diff["ip_adapter.33.to_v_ip.weight"] == ([96, 40], None)
    assert diff.keys() >= {f"ip_adapter.{n}.to_k_ip.weight" for n in range(15, 34, 2)}

    partial = {k: v for k, v in official.items() if k != "ip_adapter.21.to_v_ip.weight"}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"partial.safetensors: official IP-Adapter file does not fit this U-Net "
                                              r"\(17 cross-attention layers\): 1 missing keys: "
                                              r"ip_adapter.21.to_v_ip.weight$"):
        IPAdapterUNet.load(tmp_path / "partial.safetensors", model.unet)
    save_file({**official, "ip_adapter.35.to_k_ip.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: ip_adapter.35.to_k_ip.weight"):
        load_reference_model(tmp_path / "extra.safetensors", model.unet)
    other = UNet(dataclasses.replace(CFG, context_dim=48))
    with pytest.raises(CheckpointError, match=r"ip-adapter.safetensors: image_proj.proj.weight has 160 rows, not a "
                                              r"multiple of the context dimension 48"):
        IPAdapterUNet.load(tmp_path / "ip-adapter.safetensors", other)


def test_our_files(tmp_path):
    encoder = CLIPVisionModelWithProjection(_tiny_clip())
    model = _model(lock="none", image_encoder=encoder)
    model.save(tmp_path / "ours.safetensors")
    info = inspect_checkpoint(tmp_path / "ours.safetensors")
    assert (info.method, info.layout, info.lock, info.config) == ("ip-adapter", "ours", "none", IPAdapterConfig(EMBED, 4))
    assert info.base_mismatch(CFG) == {}
    unet = randomize_(UNet(CFG).eval(), seed=0)  # the same base with another decoder: the file's replaces it
    randomize_(unet.output_blocks, seed=11)
    loaded = load_reference_model(tmp_path / "ours.safetensors", unet, image_encoder=encoder).eval()
    assert isinstance(loaded, IPAdapterUNet) and loaded.lock == "none" and loaded.image_encoder is encoder
    x, t, ctx, embeds = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ctx, embeds), model(x, t, ctx, embeds))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("vision_model" in k for k in keys)  # the image encoder is no part of the checkpoint
    assert {k.split(".")[0] for k in keys} == {"ip_adapter", "unet"}
    with pytest.raises(CheckpointError, match="holds a ip-adapter checkpoint, not a controlnet one"):
        ControlNetUNet.load(tmp_path / "ours.safetensors", unet)


# -- references -----------------------------------------------------------------------------------------

def _tiny_clip() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=28, patch_size=14, projection_dim=EMBED, hidden_act="gelu")


def test_clip_pixels_match_clip_preprocess():
    """On images (smooth, unlike noise, where the uint8 kernel's clamping between its two passes
    shows) the float resize differs from CLIP's uint8 one by about one level: 1 / 255 / std."""
    g = torch.Generator().manual_seed(12)
    coarse = torch.rand(2, 3, 8, 6, generator=g) * 255
    u8 = torch.nn.functional.interpolate(coarse, size=(60, 45), mode="bilinear").round().to(torch.uint8)
    ours = clip_pixels(u8.float() / 127.5 - 1, 28)
    want = preprocess(u8, size=28)
    assert ours.shape == want.shape == (2, 3, 28, 28)
    assert (ours - want).abs().max() < 0.03


def test_encode_references_and_denoiser():
    encoder = randomize_(CLIPVisionModelWithProjection(_tiny_clip()), seed=13).eval()
    model = _model(image_encoder=encoder)
    g = torch.Generator().manual_seed(14)
    pixels = torch.rand(2, 3, 40, 40, generator=g) * 2 - 1
    embeds = model.encode_references(pixels)
    assert embeds.shape == (2, EMBED) and not embeds.requires_grad
    with torch.no_grad():
        assert torch.allclose(embeds, encoder(clip_pixels(pixels, 28)))

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8))
    sd = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    eps = model.denoiser(sd, [image], ["figure"], ref_size=32, height=128, width=192, scale=0.6)
    x, t, ctx, _ = _inputs(b=2)
    out = eps(x, t, ctx)
    assert out.shape == x.shape
    ref_embeds = model.encode_references(fit_and_pad(image, 32)[0][None])
    with torch.no_grad():
        assert torch.equal(out, model(x, t, ctx, ref_embeds.expand(2, -1), scale=0.6))
    with pytest.raises(ValueError, match="the IP-Adapter baseline takes one reference image, got 2"):
        model.denoiser(sd, [image, image], ["face", "figure"], ref_size=32, height=128, width=192)
    with pytest.raises(ValueError, match="the IP-Adapter has no image encoder"):
        _model().encode_references(pixels)


def test_image_encoder_moves_with_the_model():
    encoder = CLIPVisionModelWithProjection(_tiny_clip())
    model = IPAdapterUNet(UNet(CFG), image_embed_dim=EMBED, image_encoder=encoder)
    model.to(torch.float64)
    assert next(encoder.parameters()).dtype == torch.float64
    assert any(m is encoder for m in model.modules())


def test_image_keys_and_values_start_as_the_text_ones():
    """As IP-Adapter's tutorial_train.py: to_k_ip / to_v_ip are copies of each cross-attention's to_k / to_v."""
    from unet.model import BasicTransformerBlock
    unet = randomize_(UNet(CFG), seed=11)
    model = IPAdapterUNet(unet, image_embed_dim=20)
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(blocks) == len(model.adapter.layers)
    for layer, block in zip(model.adapter.layers, blocks):
        assert torch.equal(layer.to_k_ip.weight, block.attn2.to_k.weight)
        assert torch.equal(layer.to_v_ip.weight, block.attn2.to_v.weight)
