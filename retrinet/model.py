"""RetriNet (paper Sec. 5.1, Supp. A.4; DESIGN.md section 3): a retrieval encoder E over reference
images whose features enter the frozen SD U-Net through per-layer cross-attention.

    refs (B, K, 4, h, w) latents --E (copy of SD's input_blocks + middle_block, timestep t,
                                      context = CLIP("face" | "clothes" | "figure"))--> f_1 .. f_13
    x_t --frozen SD encoder (prompt)--> h_1 .. h_12 (skips), h_13 (middle)
    a_i = CrossAttn_i(Q = norm(h_i), KV = norm(f_i of all K references, concatenated))
    h_i <- h_i + zero_conv_i(a_i)
    SD decoder (output_blocks, out) on the modified skips and middle --> eps

E never sees x_t, so nothing pixel-aligned can be copied from the references: it retrieves rather
than controls. References carry no positional signal, so they form a set (order does not matter),
and a key-padding mask lets each sample have its own number of references. With the zero convs at
zero an untrained RetriNet reproduces SD exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from common.attention import attention
from common.weights import CheckpointError, read_header, read_tensors
from unet import UNet, UNetConfig, UNetEncoder
from unet.model import zero_

LOCKS = ("none", "decoder", "both")  # paper: default, LockD, LockB


class ReferenceCrossAttention(nn.Module):
    """Queries from the U-Net's feature at one site, keys/values from E's features of every
    reference at the same site (Sec. 5.1). Both sides are group-normalised; multi-head; the one
    attention function with a key-padding mask for absent references."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels are not divisible by {heads} heads")
        self.heads = heads
        self.norm_q = nn.GroupNorm(32, channels, eps=1e-6)
        self.norm_kv = nn.GroupNorm(32, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, h: torch.Tensor, f: torch.Tensor, ref_mask: torch.Tensor | None = None) -> torch.Tensor:
        """h (B, C, H, W); f (B, K, C, h, w); ref_mask (B, K) bool, True = real reference -> (B, C, H, W)."""
        b, c, hh, ww = h.shape
        k = f.shape[1]
        tokens = f.shape[-2] * f.shape[-1]
        q = self.norm_q(h).flatten(2).transpose(1, 2)                      # (B, HW, C)
        kv = self.norm_kv(f.flatten(0, 1)).flatten(2).transpose(1, 2)      # (B*K, hw, C)
        kv = kv.reshape(b, k * tokens, c)                                  # the K references as one set
        mask = None
        if ref_mask is not None:
            mask = ref_mask[:, :, None].expand(b, k, tokens).reshape(b, k * tokens)
            # A sample with no reference at all would have no key to attend to (NaN): let it attend to
            # all; RetriNet.residuals discards its result.
            mask = mask | ~ref_mask.any(dim=1, keepdim=True)
        heads = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        out = attention(heads(self.to_q(q)), heads(self.to_k(kv)), heads(self.to_v(kv)), key_padding_mask=mask)
        out = self.to_out(out.transpose(1, 2).reshape(b, hh * ww, c))
        return out.transpose(1, 2).reshape(b, c, hh, ww)


class RetriNet(nn.Module):
    """E plus the 13 cross-attention layers and zero convs. Keys: `encoder.*` (E, named as SD's
    encoder half), `cross_attn.{0..12}.*`, `zero_convs.{0..12}.*` (site 12 = the middle block)."""

    def __init__(self, unet_cfg: UNetConfig, heads: int = 8):
        super().__init__()
        self.encoder = UNetEncoder(unet_cfg)
        sites = self.encoder.skip_channels + [self.encoder.middle_channels]
        self.cross_attn = nn.ModuleList(ReferenceCrossAttention(c, heads) for c in sites)
        self.zero_convs = nn.ModuleList(zero_(nn.Conv2d(c, c, 1)) for c in sites)
        self.heads = heads

    def encode_refs(self, refs: torch.Tensor, timesteps, ref_context: torch.Tensor) -> list[torch.Tensor]:
        """E's 13 features of each reference: refs (B, K, C, h, w), ref_context (B, K, L, D) ->
        [(B, K, C_i, h_i, w_i)] for the 12 input blocks and the middle block. Computed once per
        sampling step, it serves the whole classifier-free-guidance batch."""
        b, k = refs.shape[:2]
        t = torch.as_tensor(timesteps, device=refs.device)
        t = (t.expand(b) if t.dim() == 0 else t).repeat_interleave(k)  # each reference at its target's t
        emb = self.encoder.embed_time(t, b * k, refs.dtype)
        skips, middle = self.encoder.encode(refs.flatten(0, 1), emb, ref_context.flatten(0, 1))
        return [f.unflatten(0, (b, k)) for f in skips + [middle]]

    def residuals(self, skips: list[torch.Tensor], middle: torch.Tensor, features: list[torch.Tensor],
                  ref_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """zero_conv_i(CrossAttn_i(h_i, f_i)) for the 13 sites; zero for samples without references."""
        res = [zc(attn(h, f, ref_mask)) for h, f, attn, zc in
               zip(skips + [middle], features, self.cross_attn, self.zero_convs)]
        if ref_mask is not None and not ref_mask.any(dim=1).all():
            keep = ref_mask.any(dim=1).to(res[0].dtype)[:, None, None, None]
            res = [r * keep for r in res]
        return res


class RetriUNet(nn.Module):
    """The SD U-Net with RetriNet: `forward(x, timesteps, context, refs, ref_context, ref_mask=None) -> eps`.

    x (B, 4, H, W) noisy latents; context (B, L, D) prompt embeddings; refs (B, K, 4, h, w) reference
    latents (any h, w, shared by the batch); ref_context (B, K, L, D) each reference's concept-text
    embedding; ref_mask (B, K) bool, True = a real reference (None = all real).
    """

    def __init__(self, unet: UNet, heads: int = 8, lock: str = "none"):
        super().__init__()
        self.unet = unet
        p = next(unet.parameters())
        self.retrinet = RetriNet(unet.config, heads).to(p.device, p.dtype)
        # E starts as a copy of SD's encoder half (ControlNet's tool_add_control).
        own = self.retrinet.encoder.state_dict()
        self.retrinet.encoder.load_state_dict({k: v for k, v in unet.state_dict().items() if k in own})
        self.set_lock(lock)

    def set_lock(self, lock: str) -> None:
        """Choose what trains (paper Sec. 5.2): "none" = E, cross-attention, zero convs and SD's
        decoder; "decoder" (LockD) freezes the decoder; "both" (LockB) also freezes E. SD's encoder
        half is always frozen."""
        if lock not in LOCKS:
            raise ValueError(f"lock must be one of {LOCKS}, got {lock!r}")
        self.lock = lock
        self.unet.requires_grad_(False)
        self.retrinet.requires_grad_(True)
        if lock == "none":
            self.unet.output_blocks.requires_grad_(True)
            self.unet.out.requires_grad_(True)
        if lock == "both":
            self.retrinet.encoder.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, x, timesteps, context, refs, ref_context, ref_mask=None, features=None):
        """`features`: E's output from `retrinet.encode_refs`, when computed once for several calls."""
        if refs.dim() != 5 or refs.shape[0] != x.shape[0] or refs.shape[2] != self.unet.config.in_channels:
            raise ValueError(f"refs must be ({x.shape[0]}, K, {self.unet.config.in_channels}, h, w), got "
                             f"{tuple(refs.shape)}")
        if ref_context.shape[:2] != refs.shape[:2]:
            raise ValueError(f"ref_context must be {tuple(refs.shape[:2])} + (L, D), got {tuple(ref_context.shape)}")
        if ref_mask is not None and ref_mask.shape != refs.shape[:2]:
            raise ValueError(f"ref_mask must have shape {tuple(refs.shape[:2])}, got {tuple(ref_mask.shape)}")
        unet = self.unet
        emb = unet.embed_time(timesteps, x.shape[0], x.dtype)
        with torch.no_grad():  # SD's encoder half is frozen: keep no graph for it
            skips, middle = unet.encode(x, emb.detach(), context)
        if features is None:
            features = self.retrinet.encode_refs(refs, timesteps, ref_context)
        res = self.retrinet.residuals(skips, middle, features, ref_mask)
        return unet.decode(skips, middle, emb, context, skip_residuals=res[:-1], middle_residual=res[-1])

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """RetriNet's weights (and SD's decoder when it was trained, lock "none") as safetensors,
        with the base U-Net config, heads and lock in the metadata."""
        state = {f"retrinet.{k}": v for k, v in self.retrinet.state_dict().items()}
        if self.lock == "none":
            state.update({f"unet.{k}": v for k, v in self.unet.state_dict().items()
                          if k.startswith(("output_blocks.", "out."))})
        meta = {"format": "pt", "retrinet": json.dumps({"unet_config": self.unet.config.__dict__, "heads": self.retrinet.heads,
                                                        "lock": self.lock}, default=list)}
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, unet: UNet) -> "RetriUNet":
        """A RetriUNet around `unet` with the weights saved by `save`; the file's base config must be
        `unet`'s."""
        meta = read_metadata(path)
        expected = json.loads(json.dumps(unet.config.__dict__, default=list))
        if meta["unet_config"] != expected:
            diff = {k: (meta["unet_config"].get(k), v) for k, v in expected.items() if meta["unet_config"].get(k) != v}
            raise CheckpointError(f"{path}: RetriNet made for another base U-Net; differing config fields "
                                  f"(file, model): {diff}")
        model = cls(unet, heads=meta["heads"], lock=meta["lock"])
        state = read_tensors(path, device=next(unet.parameters()).device, dtype=next(unet.parameters()).dtype)
        retri = {k[len("retrinet."):]: v for k, v in state.items() if k.startswith("retrinet.")}
        decoder = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
        missing, unexpected = model.retrinet.load_state_dict(retri, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path}: RetriNet weights do not fit: missing {missing[:5]}, unexpected "
                                  f"{unexpected[:5]}")
        if decoder:
            missing, unexpected = model.unet.load_state_dict(decoder, strict=False)
            if unexpected or any(k.startswith(("output_blocks.", "out.")) for k in missing):
                raise CheckpointError(f"{path}: decoder weights do not fit the U-Net: unexpected {unexpected[:5]}")
        return model


def read_metadata(path: str | Path) -> dict:
    """The RetriNet metadata of a checkpoint written by RetriUNet.save (clear errors otherwise)."""
    read_header(path)  # existence, suffix, truncation
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "retrinet" not in meta:
        raise CheckpointError(f"{path}: not a RetriNet checkpoint (no 'retrinet' metadata)")
    return json.loads(meta["retrinet"])
