"""An exponential moving average of the trainable weights (train.py --ema DECAY), as LDM's LitEma
keeps one of SD's U-Net: after every update that train.py keeps,

    shadow <- d * shadow + (1 - d) * weights,   d = min(DECAY, (1 + n) / (10 + n)),

n the number of averaged updates so far (the warm-up lets a short run's average forget its random
start). Sampling from the average gives cleaner images than the last weights, whose noise of the
last few hundred steps it smooths out.

A checkpoint holds the average as a second model file, ema.safetensors, in the layout of the
method's own file (so sample.py and the demo load it as they load any checkpoint), and n in
state.pt; --resume restores both, exactly.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

EMA_FILE = "ema.safetensors"


class EMA:
    """The average of `params` (the model's trainable parameters), kept in fp32."""

    def __init__(self, params: list[nn.Parameter], decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay {decay} must be within (0, 1)")
        self.params, self.decay, self.updates = list(params), decay, 0
        self.shadow = [p.detach().float().clone() for p in self.params]

    def current_decay(self) -> float:
        """d of the next update."""
        return min(self.decay, (1 + self.updates + 1) / (10 + self.updates + 1))

    @torch.no_grad()
    def update(self) -> None:
        """Average in the weights held now (call after an update that was kept)."""
        d = self.current_decay()
        self.updates += 1
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - d)

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in the model for the duration of the block (for sampling and saving);
        the trained ones back afterwards, bit for bit."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def save(self, model, folder: Path) -> None:
        """folder/ema.safetensors: `model` (a ReferenceUNet) saved with the averaged weights."""
        with self.applied():
            model.save(Path(folder) / EMA_FILE)

    def load(self, model, folder: Path, updates: int) -> None:
        """The average that `save` wrote into folder (and its update count n); the model's own
        weights are left as they were."""
        backup = [p.detach().clone() for p in self.params]
        model.load_weights(Path(folder) / EMA_FILE)
        with torch.no_grad():
            for s, p, b in zip(self.shadow, self.params, backup):
                s.copy_(p)
                p.copy_(b)
        self.updates = updates
