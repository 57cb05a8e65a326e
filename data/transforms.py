"""Geometry of the training loader: the face box after `common.images.fit_and_pad`.

Images and references are fitted into a square and padded by `fit_and_pad` (re-exported here), the
function sampling uses too, so the model sees references as in training.
"""
from __future__ import annotations

import torch

from common.images import fit_and_pad, fit_box  # noqa: F401  (the loader's image geometry)


def box_mask(box, width: int, height: int, size: int) -> torch.Tensor:
    """The pixel box [x0, y0, x1, y1] of a width x height image as a (1, size, size) mask after fit_and_pad."""
    scale, _, _, left, top = fit_box(width, height, size)
    x0, y0, x1, y1 = (round(v * scale) for v in box)
    mask = torch.zeros(1, size, size)
    mask[:, top + y0:top + max(y1, y0 + 1), left + x0:left + max(x1, x0 + 1)] = 1
    return mask
