"""The RetriBooru training loader (paper Sec. 3.1, Sec. 5, Supp. A.4; docs/design.md section 4).

Per target it yields the image fitted into a `resolution` square and padded, its valid-area and
face masks, its prompt (dropped to "" with probability `prompt_drop`), and K references with their
concept texts:

* the target, the same in both settings (they differ only in the references, Sec. 3.1): a view of
  the image, a horizontal flip, crop keeping 70-100% of each side (placed so that the face box
  stays whole) and brightness x0.8-1.2 (data.transforms: `draw_augment` draws them from the
  target's own generator, `keep_prompt_true` undoes what would make the record's prompt false,
  `augment` applies them to the image, its segmentation mask and its face box in one call, before
  `fit_and_pad`). Its valid-area mask is its view's; its face mask (Eq. 3) is the view's face box
  intersected with the view's figure (the segmentation mask), background left out;
* setting "b" (default, leakage-free): references are other images of the same identity
  (`similar`), never the target; missing ones are masked out, or repeated with `ref_repeat`;
* setting "a" (the leaky baseline, Sec. 3.1: "two different transforms [of] the same image as
  target and reference"): each of the K references is a view of the target's image, its own draws
  from the sample's generator; a reference's compose crop uses its view's face box; with
  ref_background "white" a reference is whitened through its view's mask;
* task "recon": whole references, concept "figure". "compose" (Sec. 5, Supp. A.4): each reference
  independently, with equal odds, the face-box crop ("face") or the full-width region below the face
  box ("clothes"); a clothes draw is the whole image, captioned "figure", when the face box is
  taller than half the image (a close-up) or leaves less below it than its own height (an
  upside-down figure), see FACE_MAJORITY. "multi": recon or compose per batch, chosen by
  `TaskBatchSampler`.

The records come from data.annotations: a missing file, a line that is not a JSON object or a
record without every required field raises AnnotationError (a ValueError) naming the file and line
at construction. Randomness comes from numpy generators seeded by (seed, epoch, index): the
sample's (task "multi" without a sampler, prompt drop, references) and, with a trailing 1, the
target's view, so a sample does not depend on worker count or order. A sample that cannot be
made (an unreadable image or mask, a mask of another size than its image, a face box outside the
image, no usable `similar` id) is skipped (None, dropped by `collate`, counted in the batch's
"skipped"), its id logged once per process; `strict=True` raises instead.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from common.images import open_image

from .annotations import load_records
from .transforms import augment_pil, box_mask, draw_augment, fit_and_pad, fit_mask, keep_prompt_true

log = logging.getLogger(__name__)
SETTINGS, TASKS = ("a", "b"), ("recon", "compose", "multi")
REF_BACKGROUNDS = ("keep", "white")


class RetriBooruDataset(Dataset):
    def __init__(self, root: str | Path, resolution: int = 384, k: int = 2, setting: str = "b", task: str = "recon",
                 prompt_drop: float = 0.5, ref_repeat: bool = False, seed: int = 0, strict: bool = False,
                 ref_resolution: int | None = None, ref_background: str = "keep"):
        if setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if ref_background not in REF_BACKGROUNDS:
            raise ValueError(f"ref_background must be one of {REF_BACKGROUNDS}, got {ref_background!r}")
        if k < 1 or resolution < 8 or not 0 <= prompt_drop <= 1:
            raise ValueError(f"need k >= 1, resolution >= 8, 0 <= prompt_drop <= 1; "
                             f"got {k}, {resolution}, {prompt_drop}")
        self.root = Path(root)
        self.records = load_records(self.root)  # AnnotationError (a ValueError) naming file and line
        self.by_id = {r["id"]: r for r in self.records}
        self.resolution, self.k, self.setting, self.task = resolution, k, setting, task
        self.ref_resolution = ref_resolution or resolution  # references may be smaller than the target
        self.prompt_drop, self.ref_repeat, self.seed, self.strict = prompt_drop, ref_repeat, seed, strict
        self.ref_background = ref_background
        self.epoch = 0
        self._logged: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        """Call at the start of each epoch (as with DistributedSampler) to draw new references/crops."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item):
        index, task = item if isinstance(item, tuple) else (item, self.task)
        rec = self.records[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        target_rng = np.random.default_rng([self.seed, self.epoch, index, 1])  # the target's view alone
        if task == "multi":  # without a TaskBatchSampler: decide per sample
            task = "recon" if rng.random() < 0.5 else "compose"
        try:
            return {"index": index, **self._sample(rec, rng, task, target_rng)}
        except (OSError, ValueError, KeyError, IndexError) as e:
            if self.strict:
                raise ValueError(f"sample {rec.get('id')}: {e}") from e
            if rec.get("id") not in self._logged:
                self._logged.add(rec.get("id"))
                log.warning("skipping sample %s: %s", rec.get("id"), e)
            return None

    # -- one sample -------------------------------------------------------------------------------
    def _open(self, rec) -> Image.Image:
        """The sample's image as RGB (common.images.to_rgb: 16-bit scaled, alpha over white); a
        ValueError naming the file for one that cannot be read or whose mode is refused."""
        return open_image(self.root / rec["image"])

    def _reference(self, rec, image: Image.Image | None = None) -> Image.Image:
        """A reference image: the sample's picture, with its background whitened through the figure
        mask when ref_background is "white"."""
        image = self._open(rec) if image is None else image
        if self.ref_background == "white":
            image = figure_on_white(image, self.root / rec["mask"])
        return image

    def _sample(self, rec, rng, task, target_rng) -> dict:
        """One sample. The target is the same in both settings: a view of the image drawn from
        `target_rng` alone and kept true to the record's prompt (`keep_prompt_true`); `rng` draws the
        prompt drop, then setting a's reference views or setting b's references."""
        image = self._open(rec)
        _check_box(rec, image)
        figure = _load_mask(self.root / rec["mask"], image)
        params = keep_prompt_true(draw_augment(target_rng, image.width, image.height, rec["face_bbox"]),
                                  rec["prompt"], image.width, image.height)
        if params == (False, 0, 0, image.height, image.width, 1.0):  # a view that changes nothing (every scene target)
            target, target_box, target_figure = image, list(rec["face_bbox"]), figure
        else:
            target, target_box, target_figure = augment_pil(params, image, rec["face_bbox"], figure)
        pixels, valid = fit_and_pad(target, self.resolution)
        # Eq. 3's face: the face box's figure pixels, its background left out
        face = box_mask(target_box, target.width, target.height, self.resolution)
        face *= fit_mask(target_figure, self.resolution)
        prompt = "" if rng.random() < self.prompt_drop else rec["prompt"]

        if self.setting == "a":
            ref_figure = figure if self.ref_background == "white" else None
            sources = [(rec, *_view(rng, image, rec["face_bbox"], ref_figure)) for _ in range(self.k)]
        else:
            pool = [s for s in rec["similar"] if s != rec["id"] and s in self.by_id]
            if not pool:
                raise ValueError("no usable similar ids")
            n = self.k if self.ref_repeat else min(self.k, len(pool))
            chosen = rng.choice(len(pool), size=n, replace=self.ref_repeat and len(pool) < self.k)
            sources = [(self.by_id[pool[i]], None, None) for i in chosen]
        refs = torch.full((self.k, 3, self.ref_resolution, self.ref_resolution), 1.0)  # masked slots: white
        ref_mask = torch.zeros(self.k, dtype=torch.bool)
        concepts, ref_ids = ["figure"] * self.k, [""] * self.k
        for j, (ref_rec, ref_image, ref_box) in enumerate(sources):
            ref_ids[j] = ref_rec["id"]
            if ref_image is None:  # setting b: another image of the identity, its own face box
                ref_image, ref_box = self._reference(ref_rec), ref_rec["face_bbox"]
                if task == "compose":
                    _check_box(ref_rec, ref_image)
            if task == "compose":
                ref_image, concepts[j] = _concept_crop(ref_image, ref_box, rng)
            refs[j] = fit_and_pad(ref_image, self.ref_resolution)[0]
            ref_mask[j] = True
        return {"id": rec["id"], "image": pixels, "valid": valid, "face": face, "prompt": prompt, "refs": refs,
                "ref_mask": ref_mask, "concepts": concepts, "ref_ids": ref_ids, "task": task}


def figure_on_white(image: Image.Image, mask_path: str | Path) -> Image.Image:
    """The figure of `image` on white: its segmentation mask (an L image of the same size, 255 =
    figure; Supp. A.1) blends the picture over a white background."""
    return _on_white(image, _load_mask(mask_path, image))


def _on_white(image: Image.Image, mask: Image.Image) -> Image.Image:
    return Image.composite(image, Image.new("RGB", image.size, "white"), mask)


def _load_mask(mask_path: str | Path, image: Image.Image) -> Image.Image:
    """The segmentation mask of `image` as an L image; ValueError unless it has the image's size."""
    mask = open_image(mask_path, "mask", grey=True)
    if mask.size != image.size:
        raise ValueError(f"{mask_path}: mask is {mask.size[0]}x{mask.size[1]}, its image {image.width}x{image.height}")
    return mask


def _check_box(rec, image) -> None:
    x0, y0, x1, y1 = rec["face_bbox"]
    if not (0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height):
        raise ValueError(f"face_bbox {rec['face_bbox']} does not fit the {image.width}x{image.height} image")


def _view(rng, image: Image.Image, box, figure: Image.Image | None = None) -> tuple[Image.Image, list[int]]:
    """One reference view of setting a: `image` under its own flip, crop and brightness drawn from
    `rng`, with its face box `box` moved along (data.transforms). With the segmentation mask
    `figure`, the view's figure is put on white through the view's mask, after the transform, so
    that the background is white as in setting b whatever the brightness."""
    view, view_box, view_figure = augment_pil(draw_augment(rng, image.width, image.height, box), image, box, figure)
    return (view if view_figure is None else _on_white(view, view_figure)), view_box


# A clothes draw falls back to the whole image ("figure") when the face box is taller than this
# fraction of the image. Sec. 5 says "the face bounding box occupies the majority of the image" and
# Supp. A.4 states the condition on the box's lower horizontal border, the line where the clothes
# crop is cut: what the face takes from a clothes crop is height, so "majority" is read as more than
# half of the image's height. An area reading would let tall, narrower close-up boxes (say 80% of
# the height, 50% of the width: 40% of the area) through as thin strips captioned "clothes".
FACE_MAJORITY = 0.5


def _concept_crop(image: Image.Image, box, rng) -> tuple[Image.Image, str]:
    """Compose task (Sec. 5, Supp. A.4): with equal odds the face-box crop ("face") or the full-width
    region below the box's lower edge ("clothes"). A clothes draw is the whole image ("figure")
    instead when the box is taller than FACE_MAJORITY of the image (a close-up) or leaves less
    below it than its own height (an upside-down figure: its body is above the face, and below it
    there is at most a strip of hair or ground). `box` is [x0, y0, x1, y1] in `image`'s pixels."""
    x0, y0, x1, y1 = box
    if rng.random() < 0.5:
        return image.crop((x0, y0, x1, y1)), "face"
    if y1 - y0 > FACE_MAJORITY * image.height or image.height - y1 < y1 - y0:
        return image, "figure"
    return image.crop((0, y1, image.width, image.height)), "clothes"


def collate(samples: list[dict | None]) -> dict:
    """Stack a batch; skipped samples (None) are dropped and counted in "skipped"."""
    kept = [s for s in samples if s is not None]
    batch = {"skipped": len(samples) - len(kept), "size": len(kept)}
    if not kept:
        return batch
    for key in ("image", "valid", "face", "refs", "ref_mask"):
        batch[key] = torch.stack([s[key] for s in kept])
    batch["index"] = torch.tensor([s["index"] for s in kept])
    for key in ("id", "prompt", "concepts", "ref_ids", "task"):
        batch[key] = [s[key] for s in kept]
    return batch


class TaskBatchSampler(Sampler):
    """Batches of (index, task) for task "multi": each batch is recon or compose with equal odds,
    decided by (seed, epoch, batch number). Wraps any index sampler (e.g. DistributedSampler)."""

    def __init__(self, sampler, batch_size: int, seed: int = 0, drop_last: bool = False):
        self.sampler, self.batch_size, self.seed, self.drop_last = sampler, batch_size, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        indices = list(self.sampler)
        for b in range(len(self)):
            chunk = indices[b * self.batch_size:(b + 1) * self.batch_size]
            task = "recon" if np.random.default_rng([self.seed, self.epoch, b]).random() < 0.5 else "compose"
            yield [(i, task) for i in chunk]

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
