"""Attention maps of the retrieval encoder (paper Fig. 6): where, in each reference, E's
cross-attention looks for a concept token ("face", "clothes", "figure").

    with AttentionRecorder(model.retrinet, blocks=[4, "middle"], timesteps=[981, 501]) as rec:
        images, _ = generate(sd, prompt, model=model, references=refs, ...)
    render_attention_grid(reference_images, rec.mean_maps(), ["face"]).save("attention.png")

Recording installs a callback on the chosen blocks' text cross-attention (attn2) of E only while the
context manager is open; outside it those layers run their fused SDPA path untouched.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unet.model import SpatialTransformer
from .model import RetriNet


class AttentionRecorder:
    """Records softmax(q k^T / sqrt(d)) of E's attn2, averaged over heads, for the concept-text
    `tokens` (positions in the 77-token context; 1 = the first word after BOS), at `blocks` (input
    block indices and/or "middle") and `timesteps` (None = every call)."""

    def __init__(self, retrinet: RetriNet, blocks=("middle",), tokens=(1,), timesteps=None):
        self.retrinet = retrinet
        self.tokens = list(tokens)
        self.timesteps = None if timesteps is None else {int(t) for t in timesteps}
        encoder = retrinet.encoder
        self.layers = {}
        for block in blocks:
            module = encoder.middle_block if block == "middle" else encoder.input_blocks[block]
            transformers = [m for m in module if isinstance(m, SpatialTransformer)]
            if not transformers:
                raise ValueError(f"block {block!r} of E has no attention layer")
            self.layers[block] = [tb.attn2 for tb in transformers[0].transformer_blocks]
        self.records: list[dict] = []  # {"block", "timestep", "maps": (B, K, tokens, h, w)}
        self.timesteps_now = None

    def __enter__(self) -> "AttentionRecorder":
        self.retrinet.recorder = self
        for block, attns in self.layers.items():
            for attn in attns:
                attn.recorder = self._callback(block)
        return self

    def __exit__(self, *exc) -> None:
        self.retrinet.recorder = None
        for attns in self.layers.values():
            for attn in attns:
                attn.recorder = None

    def _callback(self, block):
        def record(module, q, k):
            t = self.timesteps_now
            if self.timesteps is not None and (t is None or int(t[0]) not in self.timesteps):
                return
            scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
            probs = scores.softmax(-1).mean(1)[..., self.tokens]          # (B*K, hw, tokens)
            side = math.isqrt(probs.shape[1])
            if side * side != probs.shape[1]:
                raise ValueError("attention maps need square references (sample.py pads them to squares)")
            b = t.shape[0] if t is not None else 1
            maps = probs.transpose(1, 2).reshape(b, -1, len(self.tokens), side, side).cpu()
            self.records.append({"block": block, "timestep": None if t is None else int(t[0]), "maps": maps})
        return record

    def mean_maps(self, sample: int = 0) -> torch.Tensor:
        """Maps of one sample averaged over every record, each resized to the largest: (K, tokens, h, w)."""
        if not self.records:
            raise ValueError("nothing was recorded: check blocks and timesteps")
        size = max(r["maps"].shape[-1] for r in self.records)
        maps = [F.interpolate(r["maps"][sample], size=(size, size), mode="bilinear", align_corners=False)
                for r in self.records]
        return torch.stack(maps).mean(0)


def render_attention_grid(images: list[Image.Image], maps: torch.Tensor, labels: list[str], size: int = 192) -> Image.Image:
    """A grid: one row per reference, its image then one heat-map overlay per token (red = high)."""
    k, n_tokens = maps.shape[:2]
    if len(images) != k or len(labels) != n_tokens:
        raise ValueError(f"{len(images)} images and {len(labels)} labels for maps of shape {tuple(maps.shape)}")
    grid = Image.new("RGB", (size * (1 + n_tokens), size * k), "white")
    for row, image in enumerate(images):
        base = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
        grid.paste(Image.fromarray((base * 255).astype(np.uint8)), (0, row * size))
        for col in range(n_tokens):
            m = F.interpolate(maps[row, col][None, None].float(), size=(size, size), mode="bilinear",
                              align_corners=False)[0, 0].numpy()
            m = (m - m.min()) / max(m.max() - m.min(), 1e-12)
            heat = np.stack([np.ones_like(m), m, np.zeros_like(m)], -1)   # red -> yellow
            over = base * (1 - 0.6 * m[..., None]) + heat * 0.6 * m[..., None]
            grid.paste(Image.fromarray((over * 255).round().astype(np.uint8)), ((1 + col) * size, row * size))
    return grid
