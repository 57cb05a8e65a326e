"""Image preparation shared by the training loader and sampling: open, fit into a square and pad,
cover and crop.

Training images and references are resized so that their longer side equals the training
resolution (aspect kept) and centred on a white square; the valid-area mask marks the real pixels.
Sampling prepares its references with the same function, so the model sees them as in training
(a ControlNet's hint too, at the output's size).
Generated images are saved as PNGs that record their generation parameters (`save_png`), written
under a temporary name and renamed (`write_atomically`), so that a full disk leaves no partial file.

Every image that is read goes through `to_rgb` (via `open_image`), the one place that decides how a
PIL mode becomes RGB (PIL's own `convert("RGB")` clips 16-bit and 32-bit pixels at 255, turning a
16-bit greyscale PNG white):

* "RGB" as it is; "1", "L", "CMYK" (PIL's conversion, no colour profile), "YCbCr", "HSV" by PIL;
  "LAB" through a LAB -> sRGB transform (ImageCms);
* 16-bit "I;16", "I;16L", "I;16B", "I;16N" and 32-bit "I" are greyscale in 0 ... 65535, scaled to
  0 ... 255 (v / 257, rounded); an "I" image with values outside that range is refused;
* 32-bit float "F" is greyscale in [0, 1], scaled by 255; values outside [0, 1] (or not finite)
  are refused;
* alpha ("RGBA", "LA", "PA", premultiplied "RGBa" / "La", and "P", "L" or "RGB" with a
  transparency entry) is composited over white, the colour images are padded with
  (`ALPHA_BACKGROUND`): a transparent background reads as the white the training pads with;
* any other mode is refused. Refusals are `UnsupportedImage` (a ValueError) naming the image and
  its mode.

Importing this module does not import torch (data.build and data.validate use it without).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

if TYPE_CHECKING:
    import torch

WHITE = (255, 255, 255)
ALPHA_BACKGROUND = WHITE  # what transparent pixels become

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_BY_PIL = ("1", "L", "CMYK", "YCbCr", "HSV", "RGBX", "P")


class UnsupportedImage(ValueError):
    """An image whose mode (or whose values in that mode) `to_rgb` / `to_grey` refuse; the message
    names the image and the mode."""


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """`image` as an RGB image, by the rules of this module's docstring; ValueError naming `name`
    and the mode (UnsupportedImage) when the mode is refused or its values do not fit it."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UnsupportedImage(f"{name}: mode {mode} with values {values.min()} ... {values.max()}; "
                                   f"expected 16-bit greyscale (0 ... 65535)")
        return _grey_to_rgb(((values * 255 + 32767) // 65535).astype(np.uint8))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            finite = values[np.isfinite(values)]
            what = (f"values {finite.min():g} ... {finite.max():g}" if finite.size == values.size else
                    "non-finite values (NaN or inf)")
            raise UnsupportedImage(f"{name}: mode F (32-bit float) with {what}; expected greyscale in [0, 1]")
        return _grey_to_rgb(np.round(values * 255).astype(np.uint8))
    if mode == "LAB":
        try:
            from PIL import ImageCms
            lab = ImageCms.createProfile("LAB")
            srgb = ImageCms.createProfile("sRGB")
            return ImageCms.applyTransform(image, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
        except Exception as e:  # no littlecms in this PIL build, or a transform error
            raise UnsupportedImage(f"{name}: mode LAB cannot be converted to RGB here ({type(e).__name__}: {e}); "
                             f"convert it to RGB first") from None
    palette_alpha = mode == "P" and image.palette is not None and image.palette.mode == "RGBA"
    if mode in _ALPHA or palette_alpha or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        if mode == "La":
            image = image.convert("LA")  # PIL converts premultiplied La to LA only
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _BY_PIL:
        return image.convert("RGB")
    raise UnsupportedImage(f"{name}: mode {mode} is not read (expected an RGB, greyscale, palette, CMYK or 16-bit "
                           f"image)")


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), "RGB")


def to_grey(image: Image.Image, name: str = "image") -> Image.Image:
    """`image` as an "L" image (a mask): 16-bit and float values scaled as `to_rgb` scales them,
    any other mode by PIL (colour to luminance, alpha dropped); ValueError naming `name` and the
    mode when PIL cannot convert it."""
    if image.mode == "L":
        return image
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        return to_rgb(image, name).convert("L")
    try:
        return image.convert("LA").convert("L") if image.mode == "La" else image.convert("L")
    except ValueError:
        raise UnsupportedImage(f"{name}: mode {image.mode} is not read (expected a greyscale, RGB or 16-bit "
                               f"image)") from None


def open_image(path: str | Path, what: str = "image", grey: bool = False) -> Image.Image:
    """Open an image file as RGB (`to_rgb`), or as "L" with `grey` (`to_grey`), with a one-line
    ValueError naming the file when it cannot be read or its mode is refused."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_grey(im, f"{what} {path}") if grey else to_rgb(im, f"{what} {path}")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"{what} {path}: cannot read it as an image ({e})") from None


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def fit_box(width: int, height: int, size: int | tuple[int, int]) -> tuple[float, int, int, int, int]:
    """(scale, new_w, new_h, left, top) placing a width x height image inside a size x size square
    (or a (height, width) box), centred."""
    box_h, box_w = _hw(size)
    scale = size / max(width, height) if isinstance(size, int) else min(box_w / width, box_h / height)
    nw, nh = max(1, round(width * scale)), max(1, round(height * scale))
    return scale, nw, nh, (box_w - nw) // 2, (box_h - nh) // 2


def fit_and_pad(image: Image.Image, size: int | tuple[int, int], fill=WHITE) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB image -> (float (3, H, W) in [-1, 1], valid-area mask (1, H, W) in {0, 1}), H = W = size
    or (H, W) = size.

    Resizing is antialiased bilinear on the uint8 pixels through torch (its channels-last uint8 kernel
    is several times faster than PIL's resize, which dominated the loader's time)."""
    import torch
    import torch.nn.functional as F
    image = to_rgb(image)
    _, nw, nh, left, top = fit_box(image.width, image.height, size)
    hwc = torch.from_numpy(np.array(image))                       # (H, W, 3) uint8
    pixels = hwc.permute(2, 0, 1)[None]                           # (1, 3, H, W), channels-last in memory
    if (nh, nw) != (image.height, image.width):
        pixels = F.interpolate(pixels, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    canvas = torch.empty(3, *_hw(size), dtype=torch.uint8)
    canvas[:] = torch.tensor(fill, dtype=torch.uint8)[:, None, None]
    canvas[:, top:top + nh, left:left + nw] = pixels[0]
    valid = torch.zeros(1, *_hw(size))
    valid[:, top:top + nh, left:left + nw] = 1
    return canvas.float().div_(127.5).sub_(1), valid


class WriteError(OSError):
    """A file that could not be written; nothing was left under its name. str() is one line naming
    the file and the reason; errno is the cause's."""

    def __init__(self, path: str | Path, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.message = f"{path}: cannot write it ({cause.strerror or cause})"

    def __str__(self) -> str:
        return self.message


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` to a temporary name in `path`'s folder, then rename it to `path`: a reader never
    sees half a file, and a failure (a full disk, a read-only folder) leaves no file under either
    name and an existing `path` as it was. OSError becomes WriteError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(path, e) from None
        raise
    return path


def save_png(image: torch.Tensor, params: dict, path: str | Path) -> None:
    """Write a uint8 (H, W, 3) image as PNG with `params` as JSON in the text chunk "parameters",
    atomically (`write_atomically`: WriteError naming `path` when it cannot be written)."""
    info = PngInfo()
    info.add_text("parameters", json.dumps(params, ensure_ascii=False))
    picture = Image.fromarray(image.numpy())
    write_atomically(path, lambda tmp: picture.save(tmp, format="PNG", pnginfo=info))
