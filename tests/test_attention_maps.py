"""Recording E's cross-attention maps (paper Fig. 6) without touching the normal path, and rendering them."""
import pytest
import torch
from PIL import Image

from helpers import random_unet, retrinet_inputs, trained_like
from retrinet import AttentionRecorder, RetriUNet, render_attention_grid


def test_records_probability_maps_and_leaves_outputs_alone():
    model = trained_like(RetriUNet(random_unet()).eval())
    x, t, ctx, refs, ref_ctx = retrinet_inputs(k=2, ref_hw=(8, 8))
    refs_ctx_len = ref_ctx.shape[2]
    with torch.no_grad():
        plain = model(x, t, ctx, refs, ref_ctx)
        with AttentionRecorder(model.retrinet, blocks=[1, "middle"], tokens=range(refs_ctx_len)) as rec:
            recorded = model(x, t, ctx, refs, ref_ctx)
        after = model(x, t, ctx, refs, ref_ctx)
    assert torch.equal(recorded, plain) and torch.equal(after, plain)
    assert [r["block"] for r in rec.records] == [1, "middle"]
    first = rec.records[0]["maps"]
    assert first.shape == (2, 2, refs_ctx_len, 8, 8)  # (B, K, tokens, h, w): block 1 is at full latent size
    assert rec.records[1]["maps"].shape == (2, 2, refs_ctx_len, 2, 2)
    # all context tokens recorded: the probabilities of each reference pixel sum to 1
    assert torch.allclose(first.sum(2), torch.ones(2, 2, 8, 8), atol=1e-5)
    assert all(a.recorder is None for attns in rec.layers.values() for a in attns) and model.retrinet.recorder is None
    assert rec.mean_maps(sample=1).shape == (2, refs_ctx_len, 8, 8)


def test_timestep_filter_and_bad_block():
    model = trained_like(RetriUNet(random_unet()).eval())
    x, t, ctx, refs, ref_ctx = retrinet_inputs(k=1, ref_hw=(8, 8))
    with torch.no_grad(), AttentionRecorder(model.retrinet, blocks=["middle"], timesteps=[17]) as rec:
        model(x[:1], t[:1], ctx[:1], refs[:1], ref_ctx[:1])   # t = 17: recorded
        model(x[1:], t[1:], ctx[1:], refs[1:], ref_ctx[1:])   # t = 640: skipped
    assert [r["timestep"] for r in rec.records] == [17]
    with pytest.raises(ValueError, match="block 2 of E has no attention layer"):
        AttentionRecorder(model.retrinet, blocks=[2])  # a downsampler


def test_render_grid(tmp_path):
    maps = torch.rand(3, 2, 4, 4)
    images = [Image.new("RGB", (30, 20), c) for c in ("red", "green", "blue")]
    grid = render_attention_grid(images, maps, ["face", "clothes"], size=32)
    grid.save(tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == (32 * 3, 32 * 3)
    with pytest.raises(ValueError, match="2 images and 2 labels"):
        render_attention_grid(images[:2], maps, ["face", "clothes"])
