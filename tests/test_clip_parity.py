"""CLIP towers equal transformers' on identical random weights (every parameter randomised)."""
import pytest
import torch
import transformers

from clip import (CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel)
from helpers import randomize_, rel_err

TOL = 1e-4

# A small, odd-shaped CLIP: head dims 16 and 12, 5x5 patches, a short context.
TEXT = dict(vocab_size=1000, hidden_size=48, intermediate_size=100, num_hidden_layers=3, num_attention_heads=3,
            max_position_embeddings=29, projection_dim=20, bos_token_id=998, eos_token_id=999, pad_token_id=999)
VISION = dict(hidden_size=60, intermediate_size=70, num_hidden_layers=2, num_attention_heads=5, image_size=30,
              patch_size=6, projection_dim=20)


def _hf_clip(act="quick_gelu", seed=0):
    cfg = transformers.CLIPConfig(text_config={**TEXT, "hidden_act": act}, vision_config={**VISION, "hidden_act": act},
                                  projection_dim=20)
    cfg._attn_implementation = "eager"  # the plain matmul-softmax path: independent of our SDPA call
    return randomize_(transformers.CLIPModel(cfg).eval(), seed)


def _ours_from(hf, act="quick_gelu"):
    ours = CLIPModel(CLIPTextConfig.from_hf({**TEXT, "hidden_act": act}),
                     CLIPVisionConfig.from_hf({**VISION, "hidden_act": act})).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # same key names, no mapping
    return ours


def _small_ids(batch_lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(batch_lengths), TEXT["max_position_embeddings"]), 999)
    ids[:, 0] = 998
    for row, n in enumerate(batch_lengths):
        ids[row, 1:n + 1] = torch.randint(0, 998, (n,), generator=g)
    return ids


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_small_clip_model_matches_transformers(act):
    hf = _hf_clip(act)
    ours = _ours_from(hf, act)
    ids = _small_ids([3, 17, 27, 0])  # different prompt lengths, one empty prompt
    pixels = torch.randn(3, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_text = hf.text_model(input_ids=ids)
        ref_vision = hf.vision_model(pixel_values=pixels)
        assert rel_err(ours.text_model(ids), ref_text.last_hidden_state) <= TOL
        assert rel_err(ours.encode_text(ids), hf.get_text_features(input_ids=ids).pooler_output) <= TOL
        assert rel_err(ours.vision_model(pixels), ref_vision.last_hidden_state) <= TOL
        assert rel_err(ours.vision_model.pool(ours.vision_model(pixels)), ref_vision.pooler_output) <= TOL
        assert rel_err(ours.encode_image(pixels), hf.get_image_features(pixel_values=pixels).pooler_output) <= TOL
        assert rel_err(ours(ids, pixels), hf(input_ids=ids, pixel_values=pixels).logits_per_image) <= TOL


def test_attention_mask_matches_transformers():
    hf = _hf_clip()
    ours = _ours_from(hf)
    ids = _small_ids([4, 20, 9])
    mask = (torch.arange(ids.shape[1]) <= torch.tensor([5, 21, 10])[:, None]).long()  # keys after EOS masked
    with torch.no_grad():
        ref = hf.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.text_model(ids, attention_mask=mask)
    valid = mask.bool()
    assert rel_err(got[valid], ref[valid]) <= TOL


def test_vision_and_text_models_alone():
    hf = _hf_clip(seed=3)
    ours = _ours_from(hf)
    text = CLIPTextModel(ours.text_config)
    text.load_state_dict({k: v for k, v in ours.state_dict().items() if k.startswith("text_model.")})
    vision = CLIPVisionModel(ours.vision_config)
    vision.load_state_dict({k: v for k, v in ours.state_dict().items() if k.startswith("vision_model.")})
    ids = _small_ids([5, 12])
    pixels = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        assert rel_err(text(ids), hf.text_model(input_ids=ids).last_hidden_state) <= TOL
        assert rel_err(vision.pooled(pixels), hf.vision_model(pixel_values=pixels).pooler_output) <= TOL


def test_any_misplaced_weight_is_detected():
    """The parity tests above would fail if any one weight went to the wrong place: swapping two
    same-shaped tensors anywhere moves the outputs far past the tolerance."""
    hf = _hf_clip(seed=5)
    ids = _small_ids([6, 14, 22])
    pixels = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(2))
    state = hf.state_dict()
    by_shape = {}
    for k, v in state.items():
        by_shape.setdefault(tuple(v.shape), []).append(k)
    ours = _ours_from(hf)
    with torch.no_grad():
        ref = torch.cat([ours.encode_text(ids).flatten(), ours.encode_image(pixels).flatten()])
        for keys in by_shape.values():
            for a, b in zip(keys, keys[1:]):
                swapped = dict(state, **{a: state[b], b: state[a]})
                ours.load_state_dict(swapped)
                out = torch.cat([ours.encode_text(ids).flatten(), ours.encode_image(pixels).flatten()])
                assert rel_err(out, ref) > 100 * TOL, f"swapping {a} and {b} went unnoticed"
        ours.load_state_dict(state)


def test_vit_l14_text_encoder_matches_transformers():
    """SD v1.5's full text encoder (123M parameters), random weights, batch of real prompts."""
    cfg = transformers.CLIPTextConfig(hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072,
                                      num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
    cfg._attn_implementation = "eager"
    hf = randomize_(transformers.CLIPTextModel(cfg).eval(), seed=7)
    ours = CLIPTextModel(CLIPTextConfig.vit_l14()).eval()
    # transformers >= 5 drops the `text_model.` prefix that the official files (and we) keep.
    ours.load_state_dict({"text_model." + k: v for k, v in hf.state_dict().items()}, strict=True)
    ids = CLIPTokenizer.default()(["a photograph of an astronaut riding a horse", "",
                                   "1girl, solo, silver hair, red eyes, school uniform, cherry blossoms, " * 3])
    with torch.no_grad():
        ref = hf(input_ids=ids).last_hidden_state
        got = ours(ids)
    assert got.shape == (3, 77, 768)
    assert rel_err(got, ref) <= TOL


def test_gradients_match_transformers():
    """Backward through both towers (the fused quick_gelu MLP included) gives transformers' gradients."""
    hf = _hf_clip(seed=9)
    ours = _ours_from(hf)
    ids = _small_ids([7, 19])
    pixels = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(4))
    target = torch.randn(2, 20, generator=torch.Generator().manual_seed(5))
    loss_ref = ((hf.get_text_features(input_ids=ids).pooler_output - target) ** 2).sum() \
        + ((hf.get_image_features(pixel_values=pixels).pooler_output - target) ** 2).sum()
    loss_ref.backward()
    loss = ((ours.encode_text(ids) - target) ** 2).sum() + ((ours.encode_image(pixels) - target) ** 2).sum()
    loss.backward()
    ref_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        if name == "logit_scale":
            continue  # not part of either feature
        if name.endswith("k_proj.bias"):
            # Its true gradient is 0 (a key bias shifts every score of a query equally, and softmax
            # ignores that): both sides hold rounding noise, so compare against the weight's scale.
            scale = ref_grads[name.replace("bias", "weight")].grad.abs().max()
            assert (p.grad - ref_grads[name].grad).abs().max() <= 1e-4 * scale, name
            continue
        assert rel_err(p.grad, ref_grads[name].grad) <= 1e-4, name
