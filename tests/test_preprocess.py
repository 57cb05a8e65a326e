"""CLIP preprocessing equals transformers' CLIPImageProcessor (torchvision backend)."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from clip import preprocess

SIZES = [(224, 224), (300, 451), (517, 233), (97, 131), (1024, 768), (225, 224), (640, 223)]


def _random_image(w, h, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    # Smooth structure plus noise, so resizing has something to interpolate.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (7 + c) + yy / (11 + 2 * c)) for c in range(3)], -1) * 100 + 128
    arr = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


@pytest.fixture(scope="module")
def processor():
    return CLIPImageProcessor()


@pytest.mark.parametrize("w,h", SIZES)
def test_pil_matches_clip_image_processor(processor, w, h):
    img = _random_image(w, h, seed=w * h)
    ours = preprocess(img)
    ref = processor(images=img, return_tensors="pt").pixel_values
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    assert ours.dtype == torch.float32
    # A tolerance of 1e-2 would do; both resize uint8 tensors with torchvision, so the result is exact.
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("w,h", SIZES[:4])
def test_close_to_pil_resampling(w, h):
    """openai/CLIP resizes with PIL; that differs from torchvision's bicubic by at most one uint8
    level before normalisation (1/255/std <= 0.0152)."""
    img = _random_image(w, h, seed=w + h)
    ref = CLIPImageProcessorPil()(images=img, return_tensors="pt").pixel_values
    assert (preprocess(img) - ref).abs().max().item() <= 1.01 / 255 / 0.2613


def test_batch_of_mixed_sizes_and_modes(processor):
    images = [_random_image(300, 200, 1), _random_image(150, 400, 2, "L"), _random_image(260, 260, 3, "RGBA")]
    ours = preprocess(images)
    ref = processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
    assert ours.shape == (3, 3, 224, 224)
    assert (ours - ref).abs().max().item() <= 1e-2


def test_uint8_tensors_equal_pil():
    images = [_random_image(333, 250, 4), _random_image(250, 333, 5)]
    as_tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]
    assert torch.equal(preprocess(as_tensors), preprocess(images))
    same_size = torch.stack([as_tensors[0], as_tensors[0]])
    assert torch.equal(preprocess(same_size), preprocess([images[0], images[0]]))
    gray = torch.from_numpy(np.array(images[0].convert("L")))[None]
    assert torch.equal(preprocess(gray), preprocess(images[0].convert("L")))


def test_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        preprocess(torch.rand(3, 64, 64))
    with pytest.raises(TypeError, match="PIL image"):
        preprocess([np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match="no images"):
        preprocess([])
