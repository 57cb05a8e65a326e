"""The ControlNet baseline (ControlNetUNet): official keys, parity with diffusers' ControlNetModel + UNet2DConditionModel,
official files load strictly."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint, create_unet_diffusers_config_from_ldm
from diffusers.models.attention_processor import AttnProcessor
from safetensors.torch import save_file

from bench.oracles import controlnet_config, diffusers_unet, unet_yaml
from common.weights import CheckpointError
from helpers import randomize_, rel_err
from retrinet import ControlNet, ControlNetUNet, RetriUNet, load_reference_model
from unet import UNet, UNetConfig
from vae import VAEConfig

OFFICIAL = json.loads((Path(__file__).parent / "data" / "ldm_controlnet_keys.json").read_text())
CFG = UNetConfig(model_channels=32, attention_resolutions=(2, 4), num_res_blocks=2, channel_mult=(1, 2, 3, 4),
                 num_heads=4, context_dim=48)


def test_sd15_controlnet_keys_equal_the_official_file():
    with torch.device("meta"):
        control = ControlNet(UNetConfig.sd15())
    assert sum(p.numel() for p in control.parameters()) == 361_279_120
    assert {"control_model." + k: list(v.shape) for k, v in control.state_dict().items()} == OFFICIAL


def _model(seed=0):
    unet = randomize_(UNet(CFG).eval(), seed=seed)
    model = ControlNetUNet(unet).eval()
    return model


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 24, 40, generator=g)
    hint = torch.rand(3, 3, 192, 320, generator=g)
    return x, torch.tensor([3, 500, 999]), torch.randn(3, 7, 48, generator=g), hint


def test_untrained_controlnet_reproduces_sd():
    model = _model()
    x, t, ctx, hint = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx, hint), model.unet(x, t, ctx))


def test_parity_with_diffusers():
    model = _model()
    randomize_(model.control, seed=2)
    ckpt = {"control_model." + k: v for k, v in model.control.state_dict().items()}
    dcfg = controlnet_config(model.unet, VAEConfig.sd15())
    ref_control = ControlNetModel(**dcfg).eval()
    ref_control.load_state_dict(convert_controlnet_checkpoint(ckpt, dcfg), strict=True)
    ref_control.set_attn_processor(AttnProcessor())
    ref_unet = diffusers_unet(model.unet, CFG)
    x, t, ctx, hint = _inputs()
    with torch.no_grad():
        down, mid = ref_control(x, t, ctx, controlnet_cond=hint, return_dict=False)
        want = ref_unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        got = model(x, t, ctx, hint)
    assert rel_err(got, want) <= 1e-4
    assert rel_err(got, model.unet(x, t, ctx)) > 1e-2  # the control matters


def test_official_files_load(tmp_path):
    model = _model()
    randomize_(model.control, seed=3)
    state = {k: v.contiguous() for k, v in model.control.state_dict().items()}
    x, t, ctx, hint = _inputs()
    with torch.no_grad():
        want = model(x, t, ctx, hint)
    # ControlNet 1.1 layout: control_model.* only
    save_file({"control_model." + k: v for k, v in state.items()}, tmp_path / "v11.safetensors")
    # ControlNet 1.0 layout: the whole ControlLDM, with SD's own weights beside
    full = {"control_model." + k: v for k, v in state.items()}
    full.update({"model.diffusion_model.out.2.bias": torch.zeros(4), "first_stage_model.quant_conv.bias": torch.zeros(8)})
    save_file(full, tmp_path / "v10.safetensors")
    save_file(state, tmp_path / "bare.safetensors")  # prefix-less, as some third-party files
    for name in ("v11", "v10", "bare"):
        loaded = ControlNetUNet.load(tmp_path / f"{name}.safetensors", model.unet).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x, t, ctx, hint), want), name
    partial = {"control_model." + k: v for k, v in state.items() if not k.startswith("middle_block_out")}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"partial.safetensors: detected layout 'controlnet'.*2 missing keys: "
                                              r"middle_block_out.0.weight"):
        ControlNetUNet.load(tmp_path / "partial.safetensors", model.unet)


def test_save_load_and_locks(tmp_path):
    model = _model()
    randomize_(model.control, seed=4)
    model.save(tmp_path / "cn.safetensors")
    loaded = load_reference_model(tmp_path / "cn.safetensors", model.unet).eval()
    assert isinstance(loaded, ControlNetUNet) and loaded.method == "controlnet"
    with pytest.raises(CheckpointError, match="holds a controlnet checkpoint, not a retrinet one"):
        RetriUNet.load(tmp_path / "cn.safetensors", model.unet)
    x, t, ctx, hint = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ctx, hint), model(x, t, ctx, hint))
    model.set_lock("both")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith(("control.zero_convs", "control.middle_block_out"))}
    with pytest.raises(ValueError, match=r"hint must be \(3, 3, H, W\)"):
        model(x, t, ctx, hint[:, :1])


# CFG with 2-8 channels per GroupNorm group: with one channel per group (32 groups of model_channels=32)
# GroupNorm cancels any per-channel constant, so the true gradient of a resnet's conv1 bias and time
# embedding projection at the first level is 0 and both implementations only return rounding noise there.
GRAD_CFG = dataclasses.replace(CFG, norm_groups=16)


def _diffusers_controlnet(control: ControlNet, cfg: UNetConfig) -> tuple[ControlNetModel, dict]:
    """diffusers' ControlNetModel holding `control`'s weights (the conversion test_parity_with_diffusers
    uses), and its config."""
    unet_cfg = create_unet_diffusers_config_from_ldm(unet_yaml(cfg), {})
    fields = ["in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
              "attention_head_dim", "use_linear_projection", "transformer_layers_per_block"]
    dcfg = {"conditioning_channels": 3, "norm_num_groups": cfg.norm_groups, **{k: unet_cfg[k] for k in fields}}
    ref = ControlNetModel(**dcfg)
    ref.load_state_dict(convert_controlnet_checkpoint({"control_model." + k: v for k, v in control.state_dict().items()},
                                                      dcfg), strict=True)
    ref.set_attn_processor(AttnProcessor())
    return ref, dcfg


def test_training_step_gradients_equal_diffusers():
    """One LockD training step (SD frozen, only the ControlNet trains, as diffusers'
    examples/controlnet/train_controlnet.py): every ControlNet parameter's gradient equals diffusers'."""
    model = ControlNetUNet(randomize_(UNet(GRAD_CFG), seed=0), lock="decoder")
    randomize_(model.control, seed=5)  # zero convs and hint embedding included: non-trivial gradients everywhere
    ref_control, dcfg = _diffusers_controlnet(model.control, GRAD_CFG)
    ref_unet = diffusers_unet(model.unet, GRAD_CFG).requires_grad_(False)
    ref_control.train()
    ref_unet.train()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 8, 16, generator=g)             # batch 2, non-square latents
    t = torch.tensor([17, 640])                           # a timestep per sample
    ctx = torch.randn(2, 5, 48, generator=g)
    hint = torch.rand(2, 3, 64, 128, generator=g)         # in [0, 1], at the output's pixel size
    target = torch.randn(2, 4, 8, 16, generator=g)

    assert model.trainable_parameters() == list(model.control.parameters())
    torch.nn.functional.mse_loss(model(x, t, ctx, hint), target).backward()

    down, mid = ref_control(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
    pred = ref_unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=list(down),
                    mid_block_additional_residual=mid, return_dict=False)[0]
    torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean").backward()

    # ours: gradients to exactly the ControlNet's parameters, none to the U-Net's
    assert {n for n, p in model.named_parameters() if p.grad is not None} == \
        {"control." + n for n, _ in model.control.named_parameters()}
    assert all(p.grad is None for p in model.unet.parameters())
    assert all(p.grad is None for p in ref_unet.parameters())
    assert all(p.grad.stride() == p.stride() for p in model.control.parameters())  # the layout DDP's buckets have

    ours = convert_controlnet_checkpoint({"control_model." + n: p.grad for n, p in model.control.named_parameters()},
                                         dcfg)
    theirs = {n: p.grad for n, p in ref_control.named_parameters()}
    assert ours.keys() == theirs.keys() and len(theirs) == len(list(model.control.parameters()))
    errs = {}
    for name, want in theirs.items():
        assert want is not None and want.abs().max() > 0, name
        errs[name] = rel_err(ours[name], want)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= 1e-4, (worst, errs[worst])
