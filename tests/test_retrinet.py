"""RetriNet: untrained identity with SD, what trains under each lock, set semantics of references,
masks, mixed sizes, checkpoints."""
import pytest
import torch

from common.weights import CheckpointError
from helpers import RETRI_CFG, randomize_, rel_err, random_unet, retrinet_inputs, trained_like
from retrinet import RetriUNet
from unet import UNet, UNetConfig


def test_untrained_retrinet_reproduces_sd_exactly():
    unet = random_unet()
    model = RetriUNet(unet).eval()
    x, t, ctx, refs, ref_ctx = retrinet_inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx, refs, ref_ctx), unet(x, t, ctx))
    # E is a copy of SD's encoder half
    own = model.retrinet.encoder.state_dict()
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in own.items())
    # one site per skip plus the middle block (13 for SD v1.5; this config has 6 skips)
    assert len(model.retrinet.cross_attn) == len(model.retrinet.zero_convs) == len(unet.output_blocks) + 1 == 7
    assert [c.norm_q.normalized_shape[0] for c in model.retrinet.cross_attn] == [32, 32, 32, 64, 64, 64, 64]


def test_sd15_sites():
    with torch.device("meta"):
        model = RetriUNet(UNet(UNetConfig.sd15()))
    channels = [c.norm_q.normalized_shape[0] for c in model.retrinet.cross_attn]
    assert channels == [320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280]


@pytest.mark.parametrize("lock", ["none", "decoder", "both"])
def test_gradients_reach_exactly_the_trainable_parameters(lock):
    model = trained_like(RetriUNet(random_unet(), lock=lock))
    x, t, ctx, refs, ref_ctx = retrinet_inputs()
    with torch.no_grad():
        assert rel_err(model(x, t, ctx, refs, ref_ctx), model.unet(x, t, ctx)) > 1e-3  # references matter now
    model(x, t, ctx, refs, ref_ctx).square().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expect = {n for n, _ in model.named_parameters() if n.startswith(("retrinet.cross_attn", "retrinet.zero_convs"))}
    if lock != "both":
        expect |= {n for n, _ in model.named_parameters() if n.startswith("retrinet.encoder")}
    if lock == "none":
        expect |= {n for n, _ in model.named_parameters() if n.startswith(("unet.output_blocks", "unet.out"))}
    assert trainable == expect
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            # the parameter's own layout, which DDP's bucket views have (else a copy per step and a warning)
            assert p.grad.stride() == p.stride(), (name, p.grad.stride(), p.stride())
        else:
            assert p.grad is None, name
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for n, p in model.named_parameters() if n in expect}


def test_references_are_a_set():
    model = trained_like(RetriUNet(random_unet()).eval())
    x, t, ctx, refs, ref_ctx = retrinet_inputs(k=4)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        a = model(x, t, ctx, refs, ref_ctx)
        b = model(x, t, ctx, refs[:, perm], ref_ctx[:, perm])
    assert rel_err(b, a) <= 1e-5


def test_masked_extra_reference_changes_nothing():
    model = trained_like(RetriUNet(random_unet()).eval())
    x, t, ctx, refs, ref_ctx = retrinet_inputs(k=3)
    junk = torch.randn(2, 1, 4, 8, 12) * 5
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    with torch.no_grad():
        plain = model(x, t, ctx, refs, ref_ctx)
        padded = model(x, t, ctx, torch.cat([refs, junk], 1), torch.cat([ref_ctx, ref_ctx[:, :1]], 1), mask)
        # a different number of references per sample: sample 0 has 1, sample 1 has 3
        mask2 = torch.tensor([[True, False, False], [True, True, True]])
        mixed = model(x, t, ctx, refs, ref_ctx, mask2)
        one = model(x[:1], t[:1], ctx[:1], refs[:1, :1], ref_ctx[:1, :1])
    assert rel_err(padded, plain) <= 1e-5
    assert rel_err(mixed[:1], one) <= 1e-5 and rel_err(mixed[1:], plain[1:]) <= 1e-5


def test_sample_without_references_is_plain_sd():
    model = trained_like(RetriUNet(random_unet()).eval())
    x, t, ctx, refs, ref_ctx = retrinet_inputs()
    with torch.no_grad():
        out = model(x, t, ctx, refs, ref_ctx, torch.tensor([[False] * 3, [True] * 3]))
        assert torch.isfinite(out).all()
        assert rel_err(out[:1], model.unet(x[:1], t[:1], ctx[:1])) <= 1e-5


def test_references_of_another_size_and_precomputed_features():
    model = trained_like(RetriUNet(random_unet()).eval())
    x, t, ctx, refs, ref_ctx = retrinet_inputs(ref_hw=(24, 16))  # larger than the 16x8 target
    with torch.no_grad():
        out = model(x, t, ctx, refs, ref_ctx)
        feats = model.retrinet.encode_refs(refs, t, ref_ctx)
        assert torch.equal(model(x, t, ctx, refs, ref_ctx, features=feats), out)
    assert out.shape == x.shape


def test_save_load_round_trip_and_mismatch(tmp_path):
    model = trained_like(RetriUNet(random_unet(), lock="none"))
    randomize_(model.unet.output_blocks, seed=9)  # "trained" decoder travels with the file
    x, t, ctx, refs, ref_ctx = retrinet_inputs()
    model.save(tmp_path / "retri.safetensors")
    loaded = RetriUNet.load(tmp_path / "retri.safetensors", random_unet()).eval()  # a fresh copy of the base SD
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ctx, refs, ref_ctx), model(x, t, ctx, refs, ref_ctx))
    assert loaded.lock == "none"
    locked = trained_like(RetriUNet(random_unet(), lock="decoder"))
    locked.save(tmp_path / "lockd.safetensors")
    assert RetriUNet.load(tmp_path / "lockd.safetensors", random_unet()).lock == "decoder"
    other = UNet(UNetConfig(model_channels=32, attention_resolutions=(1,), num_res_blocks=1, channel_mult=(1, 2, 2),
                            num_heads=4, context_dim=24))
    with pytest.raises(CheckpointError, match=r"RetriNet made for another base U-Net; .*attention_resolutions"):
        RetriUNet.load(tmp_path / "retri.safetensors", other)
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="not a RetriNet checkpoint"):
        RetriUNet.load(tmp_path / "plain.safetensors", random_unet())


def test_bad_inputs():
    model = RetriUNet(random_unet())
    x, t, ctx, refs, ref_ctx = retrinet_inputs()
    with pytest.raises(ValueError, match=r"refs must be \(2, K, 4, h, w\)"):
        model(x, t, ctx, refs[:, 0], ref_ctx)
    with pytest.raises(ValueError, match="ref_mask must have shape"):
        model(x, t, ctx, refs, ref_ctx, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="lock must be one of"):
        RetriUNet(random_unet(), lock="all")


def test_null_reference():
    """With ref_drop a sample sees only the learned null reference: its own references no longer
    matter, the other samples are untouched, and the null token round-trips through save/load."""
    model = trained_like(RetriUNet(random_unet(), null_reference=True).eval())
    x, t, ctx, refs, ref_ctx = retrinet_inputs()
    drop = torch.tensor([True, False])
    with torch.no_grad():
        plain = model(x, t, ctx, refs, ref_ctx)
        dropped = model(x, t, ctx, refs, ref_ctx, ref_drop=drop)
        other_refs = model(x, t, ctx, torch.randn_like(refs), ref_ctx, ref_drop=drop)
        assert rel_err(dropped[1:], plain[1:]) <= 1e-5
        assert rel_err(other_refs[:1], dropped[:1]) <= 1e-5
        assert rel_err(dropped[:1], plain[:1]) > 1e-3
        assert rel_err(dropped[:1], model.unet(x[:1], t[:1], ctx[:1])) > 1e-3  # the null is learned, not "no residual"
    model.eval()
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        model.save(Path(d) / "n.safetensors")
        loaded = RetriUNet.load(Path(d) / "n.safetensors", model.unet).eval()
    assert loaded.retrinet.null_reference
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ctx, refs, ref_ctx, ref_drop=drop), dropped)
    with pytest.raises(ValueError, match="ref_drop needs a RetriNet built with null_reference=True"):
        RetriUNet(random_unet())(x, t, ctx, refs, ref_ctx, ref_drop=drop)


def test_references_of_mixed_sizes():
    """A face crop beside a figure: references of different sizes in one sample, as a list. Equal
    to the stacked tensor when the sizes agree; order-invariant; masks work across sizes."""
    model = trained_like(RetriUNet(random_unet()).eval())
    x, t, ctx, refs, ref_ctx = retrinet_inputs(k=3, ref_hw=(8, 8))
    g = torch.Generator().manual_seed(5)
    face, figure = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 24, 16, generator=g)
    with torch.no_grad():
        assert rel_err(model(x, t, ctx, list(refs.unbind(1)), ref_ctx), model(x, t, ctx, refs, ref_ctx)) <= 1e-5
        mixed = model(x, t, ctx, [face, figure, refs[:, 2]], ref_ctx)
        swapped = model(x, t, ctx, [figure, refs[:, 2], face], ref_ctx[:, [1, 2, 0]])
        assert rel_err(swapped, mixed) <= 1e-5
        assert rel_err(mixed, model(x, t, ctx, refs, ref_ctx)) > 1e-3
        masked = model(x, t, ctx, [face, figure, refs[:, 2]], ref_ctx, torch.tensor([[True, False, True]] * 2))
        alone = model(x, t, ctx, [face, refs[:, 2]], ref_ctx[:, [0, 2]])
        assert rel_err(masked, alone) <= 1e-5
    with pytest.raises(ValueError, match="a list of refs must hold K >= 1 tensors"):
        model(x, t, ctx, [face[:1]], ref_ctx[:, :1])


def test_norm_groups_reach_every_group_norm_and_files_keep_them(tmp_path):
    """`norm_groups` sets every GroupNorm of the base and of E; a checkpoint made on a base with other
    groups is refused, naming the field."""
    import dataclasses
    cfg8 = dataclasses.replace(RETRI_CFG, norm_groups=8)
    model = trained_like(RetriUNet(randomize_(UNet(cfg8).eval(), seed=0)))
    groups = {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {8} and all(isinstance(c.norm_kv, torch.nn.LayerNorm) for c in model.retrinet.cross_attn)
    model.save(tmp_path / "g8.safetensors")
    with pytest.raises(CheckpointError, match=r"another base U-Net; .*norm_groups.*\(8, 32\)"):
        RetriUNet.load(tmp_path / "g8.safetensors", random_unet())


def test_reference_attention_is_layer_normalised_per_token():
    """Supp. A.4: both sides are reshaped to tokens and layer-normalised over channels, so rescaling
    and shifting any one token's channels (positive scale) leaves the attention's output unchanged;
    rescaling one channel over every token (what a norm over the map would undo) changes it."""
    from retrinet import ReferenceCrossAttention
    g = torch.Generator().manual_seed(3)
    h, f = torch.randn(2, 32, 5, 7, generator=g), torch.randn(2, 3, 32, 4, 6, generator=g)
    scale_h, shift_h = torch.rand(2, 1, 5, 7, generator=g) + 0.5, torch.randn(2, 1, 5, 7, generator=g)
    scale_f, shift_f = torch.rand(2, 3, 1, 4, 6, generator=g) + 0.5, torch.randn(2, 3, 1, 4, 6, generator=g)
    attn = randomize_(ReferenceCrossAttention(32, 4), seed=4)
    one_channel = torch.ones(1, 32, 1, 1)
    one_channel[0, 5] = 3.0
    with torch.no_grad():
        out = attn(h, f)
        assert rel_err(attn(h * scale_h + shift_h, f * scale_f + shift_f), out) <= 1e-4  # LayerNorm eps: ~1e-5
        assert rel_err(attn(h * one_channel, f), out) > 1e-3
