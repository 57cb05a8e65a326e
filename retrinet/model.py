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
from common.weights import CheckpointError, detect_layout, load_strict, read_header, read_tensors
from unet import UNet, UNetConfig, UNetEncoder
from unet.model import zero_

LOCKS = ("none", "decoder", "both")  # paper: default, LockD, LockB
MODES = ("retrinet", "controlnet")


class ReferenceCrossAttention(nn.Module):
    """Queries from the U-Net's feature at one site, keys/values from E's features of every
    reference at the same site (Sec. 5.1). Both sides are group-normalised; multi-head; the one
    attention function with a key-padding mask for absent references."""

    def __init__(self, channels: int, heads: int, null_reference: bool = False, groups: int = 32):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels are not divisible by {heads} heads")
        self.heads = heads
        # The learned null reference (DESIGN.md section 5, `ref_drop`): one normalised key/value
        # token that replaces all references of a sample whose references were dropped.
        self.null = nn.Parameter(torch.randn(channels) * channels ** -0.5) if null_reference else None
        self.norm_q = nn.GroupNorm(groups, channels, eps=1e-6)
        self.norm_kv = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, h: torch.Tensor, f, ref_mask: torch.Tensor | None = None,
                ref_drop: torch.Tensor | None = None) -> torch.Tensor:
        """h (B, C, H, W); f (B, K, C, h, w), or a list of K (B, C, h_k, w_k) for references of
        different sizes; ref_mask (B, K) bool, True = real reference; ref_drop (B,) bool, True = use
        the null reference instead of this sample's references -> (B, C, H, W)."""
        b, c, hh, ww = h.shape
        q = self.norm_q(h).flatten(2).transpose(1, 2)                      # (B, HW, C)
        if isinstance(f, torch.Tensor):  # K references of one size: one norm call for all
            k, n = f.shape[1], f.shape[-2] * f.shape[-1]
            kv = self.norm_kv(f.flatten(0, 1)).flatten(2).transpose(1, 2).reshape(b, k * n, c)
            counts = [n] * k
        else:
            kv = torch.cat([self.norm_kv(fk).flatten(2).transpose(1, 2) for fk in f], dim=1)
            counts = [fk.shape[-2] * fk.shape[-1] for fk in f]
        # kv: every token of the K references as one set (B, sum of h_k w_k, C)
        mask = None
        if ref_mask is not None:
            mask = ref_mask.repeat_interleave(torch.tensor(counts, device=h.device), dim=1)
        if self.null is not None:  # the null token is the last key, visible only to dropped samples
            drop = torch.zeros(b, dtype=torch.bool, device=h.device) if ref_drop is None else ref_drop
            kv = torch.cat([kv, self.null.to(kv.dtype).expand(b, 1, c)], dim=1)
            keep = torch.ones(b, sum(counts), dtype=torch.bool, device=h.device) if mask is None else mask
            mask = torch.cat([keep & ~drop[:, None], drop[:, None]], dim=1)
        if mask is not None:
            # A sample with no visible key at all would get NaN: let it attend to all; RetriNet.residuals
            # discards its result.
            mask = mask | ~mask.any(dim=1, keepdim=True)
        heads = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        out = attention(heads(self.to_q(q)), heads(self.to_k(kv)), heads(self.to_v(kv)), key_padding_mask=mask)
        out = self.to_out(out.transpose(1, 2).reshape(b, hh * ww, c))
        return out.transpose(1, 2).reshape(b, c, hh, ww)


class RetriNet(nn.Module):
    """E plus the 13 cross-attention layers and zero convs. Keys: `encoder.*` (E, named as SD's
    encoder half), `cross_attn.{0..12}.*`, `zero_convs.{0..12}.*` (site 12 = the middle block)."""

    def __init__(self, unet_cfg: UNetConfig, heads: int = 8, null_reference: bool = False):
        super().__init__()
        self.encoder = UNetEncoder(unet_cfg)
        sites = self.encoder.skip_channels + [self.encoder.middle_channels]
        self.cross_attn = nn.ModuleList(ReferenceCrossAttention(c, heads, null_reference, unet_cfg.norm_groups)
                                        for c in sites)
        self.null_reference = null_reference
        self.zero_convs = nn.ModuleList(zero_(nn.Conv2d(c, c, 1)) for c in sites)
        self.heads = heads
        self.recorder = None  # an AttentionRecorder while one is active: told each call's timesteps

    def encode_refs(self, refs, timesteps, ref_context: torch.Tensor) -> list:
        """E's 13 features of each reference: refs (B, K, C, h, w), ref_context (B, K, L, D) ->
        [(B, K, C_i, h_i, w_i)] for the 12 input blocks and the middle block. Computed once per
        sampling step, it serves the whole classifier-free-guidance batch.

        References of different sizes (a face crop beside a figure) come as a list of K tensors
        (B, C, h_k, w_k); E then runs once per size and each site gets a list of K features."""
        if not isinstance(refs, torch.Tensor):
            by_size = {}
            for i, r in enumerate(refs):
                by_size.setdefault(tuple(r.shape[-2:]), []).append(i)
            out = [[None] * len(refs) for _ in range(len(self.cross_attn))]
            for idx in by_size.values():
                feats = self.encode_refs(torch.stack([refs[i] for i in idx], 1), timesteps, ref_context[:, idx])
                for site, f in enumerate(feats):
                    for j, i in enumerate(idx):
                        out[site][i] = f[:, j]
            return out
        b, k = refs.shape[:2]
        t = torch.as_tensor(timesteps, device=refs.device)
        t = (t.expand(b) if t.dim() == 0 else t).repeat_interleave(k)  # each reference at its target's t
        if self.recorder is not None:
            self.recorder.timesteps_now = t.view(b, k)[:, 0]
        emb = self.encoder.embed_time(t, b * k, refs.dtype)
        skips, middle = self.encoder.encode(refs.flatten(0, 1), emb, ref_context.flatten(0, 1))
        return [f.unflatten(0, (b, k)) for f in skips + [middle]]

    def residuals(self, skips: list[torch.Tensor], middle: torch.Tensor, features: list[torch.Tensor],
                  ref_mask: torch.Tensor | None = None, ref_drop: torch.Tensor | None = None) -> list[torch.Tensor]:
        """zero_conv_i(CrossAttn_i(h_i, f_i)) for the 13 sites; zero for samples without references
        (unless they use the null reference)."""
        res = [zc(attn(h, f, ref_mask, ref_drop)) for h, f, attn, zc in
               zip(skips + [middle], features, self.cross_attn, self.zero_convs)]
        if ref_mask is not None:
            keep = ref_mask.any(dim=1) if ref_drop is None else ref_mask.any(dim=1) | ref_drop
            if not keep.all():
                res = [r * keep.to(r.dtype)[:, None, None, None] for r in res]
        return res


class ControlNet(UNetEncoder):
    """ControlNet (Zhang et al. 2023), the paper's baseline (Sec. 5.2, ControlNet-a/-b): a copy of
    SD's encoder half reads x_t plus a hint embedding of one reference image and adds its 13 outputs,
    through zero convs, to the skips and the middle feature. Keys are the official checkpoint's
    under `control_model.`: time_embed, input_blocks, middle_block, input_hint_block.{0..14},
    zero_convs.{0..11}.0, middle_block_out.0."""

    def __init__(self, cfg: UNetConfig, hint_channels: int = 3):
        super().__init__(cfg)
        # 3x3 convs 3-16-16-32-32-96-96-256 (stride 2 into 32, 96, 256: the image -> latent size), SiLU
        # between, then a zero conv to model_channels.
        widths = [hint_channels, 16, 16, 32, 32, 96, 96, 256]
        layers = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers += [nn.Conv2d(a, b, 3, padding=1, stride=2 if i in (2, 4, 6) else 1), nn.SiLU()]
        self.input_hint_block = nn.Sequential(*layers, zero_(nn.Conv2d(256, cfg.model_channels, 3, padding=1)))
        self.zero_convs = nn.ModuleList(nn.Sequential(zero_(nn.Conv2d(c, c, 1))) for c in self.skip_channels)
        self.middle_block_out = nn.Sequential(zero_(nn.Conv2d(self.middle_channels, self.middle_channels, 1)))

    def forward(self, x, hint, emb, context, context_mask=None) -> list[torch.Tensor]:
        """x (B, 4, h, w) noisy latents, hint (B, 3, 8h, 8w) in [0, 1] -> the 13 residuals."""
        skips, middle = self.encode(x, emb, context, context_mask, hint=self.input_hint_block(hint))
        return [zc(s) for zc, s in zip(self.zero_convs, skips)] + [self.middle_block_out(middle)]


class RetriUNet(nn.Module):
    """The SD U-Net with RetriNet: `forward(x, timesteps, context, refs, ref_context, ref_mask=None) -> eps`.

    x (B, 4, H, W) noisy latents; context (B, L, D) prompt embeddings; refs (B, K, 4, h, w) reference
    latents (any h, w), or a list of K tensors (B, 4, h_k, w_k) when the references differ in size (a
    face crop beside a figure); ref_context (B, K, L, D) each reference's concept-text
    embedding; ref_mask (B, K) bool, True = a real reference (None = all real).
    """

    def __init__(self, unet: UNet, heads: int = 8, lock: str = "none", mode: str = "retrinet",
                 null_reference: bool = False, train_base: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.unet, self.mode = unet, mode
        p = next(unet.parameters())
        if mode == "retrinet":
            self.retrinet = RetriNet(unet.config, heads, null_reference).to(p.device, p.dtype)
        else:
            self.control = ControlNet(unet.config).to(p.device, p.dtype)
        # E starts as a copy of SD's encoder half (ControlNet's tool_add_control).
        own = self.encoder.state_dict()
        self.encoder.load_state_dict({k: v for k, v in unet.state_dict().items() if k in own}, strict=False)
        self.set_lock(lock, train_base)

    @property
    def encoder(self) -> UNetEncoder:
        """E: RetriNet's retrieval encoder, or the ControlNet in controlnet mode."""
        return self.retrinet.encoder if self.mode == "retrinet" else self.control

    @property
    def added(self) -> nn.Module:
        """Everything RetriNet / ControlNet adds to SD."""
        return self.retrinet if self.mode == "retrinet" else self.control

    def set_lock(self, lock: str, train_base: bool = False) -> None:
        """Choose what trains (paper Sec. 5.2): "none" = E, cross-attention, zero convs and SD's
        decoder; "decoder" (LockD) freezes the decoder; "both" (LockB) also freezes E. SD's encoder
        half is frozen, unless `train_base`: then the whole U-Net trains as well (a base trained
        from scratch, as in the tiny preset; `lock` must be "none")."""
        if lock not in LOCKS:
            raise ValueError(f"lock must be one of {LOCKS}, got {lock!r}")
        if train_base and lock != "none":
            raise ValueError(f"train_base trains the whole U-Net; it contradicts lock {lock!r}")
        self.lock, self.train_base = lock, train_base
        self.unet.requires_grad_(train_base)
        self.added.requires_grad_(True)
        if lock == "none":
            self.unet.output_blocks.requires_grad_(True)
            self.unet.out.requires_grad_(True)
        if lock == "both":
            self.encoder.requires_grad_(False)
            if self.mode == "controlnet":  # its zero convs stay trainable
                self.control.zero_convs.requires_grad_(True)
                self.control.middle_block_out.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, x, timesteps, context, refs, ref_context=None, ref_mask=None, features=None, ref_drop=None):
        """`features`: E's output from `retrinet.encode_refs`, when computed once for several calls.
        `ref_drop` (B,) bool replaces a sample's references by the learned null reference (models
        built with `null_reference=True`, trained with reference dropout).
        In controlnet mode `refs` is (B, 1, 3, 8h, 8w): one hint image in [0, 1] per sample, and
        `ref_context`, `ref_mask` and `features` are unused."""
        self._check(x, refs, ref_context, ref_mask, ref_drop)
        unet = self.unet
        emb = unet.embed_time(timesteps, x.shape[0], x.dtype)
        with torch.set_grad_enabled(self.train_base and torch.is_grad_enabled()):  # frozen: keep no graph
            skips, middle = unet.encode(x, emb if self.train_base else emb.detach(), context)
        if self.mode == "retrinet":
            if features is None:
                features = self.retrinet.encode_refs(refs, timesteps, ref_context)
            res = self.retrinet.residuals(skips, middle, features, ref_mask, ref_drop)
        else:
            res = self.control(x, refs[:, 0], self.control.embed_time(timesteps, x.shape[0], x.dtype), context)
        return unet.decode(skips, middle, emb, context, skip_residuals=res[:-1], middle_residual=res[-1])

    def _check(self, x, refs, ref_context, ref_mask, ref_drop=None):
        b = x.shape[0]
        if self.mode == "controlnet":
            if refs.dim() != 5 or refs.shape[:3] != (b, 1, 3):
                raise ValueError(f"controlnet mode takes refs of shape ({b}, 1, 3, H, W), got {tuple(refs.shape)}")
            return
        c = self.unet.config.in_channels
        if isinstance(refs, torch.Tensor):
            if refs.dim() != 5 or refs.shape[0] != b or refs.shape[2] != c:
                raise ValueError(f"refs must be ({b}, K, {c}, h, w), got {tuple(refs.shape)}")
            k = refs.shape[1]
        else:
            bad = [tuple(r.shape) for r in refs if r.dim() != 4 or r.shape[:2] != (b, c)]
            if not refs or bad:
                raise ValueError(f"a list of refs must hold K >= 1 tensors ({b}, {c}, h_k, w_k), got {bad or 'none'}")
            k = len(refs)
        if ref_context is None or tuple(ref_context.shape[:2]) != (b, k):
            raise ValueError(f"ref_context must be ({b}, {k}, L, D), got "
                             f"{None if ref_context is None else tuple(ref_context.shape)}")
        if ref_mask is not None and tuple(ref_mask.shape) != (b, k):
            raise ValueError(f"ref_mask must have shape {(b, k)}, got {tuple(ref_mask.shape)}")
        if ref_drop is not None and not self.retrinet.null_reference:
            raise ValueError("ref_drop needs a RetriNet built with null_reference=True (trained with reference dropout)")

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """What RetriNet / ControlNet adds (and SD's decoder when it was trained, lock "none"; the
        whole U-Net with `train_base`) as safetensors, with the base U-Net config, mode, heads and
        lock in the metadata. ControlNet weights keep the official `control_model.` keys."""
        state = {f"{self._prefix}{k}": v for k, v in self.added.state_dict().items()}
        if self.lock == "none":
            state.update({f"unet.{k}": v for k, v in self.unet.state_dict().items()
                          if self.train_base or k.startswith(("output_blocks.", "out."))})
        retri = self.mode == "retrinet"
        info = {"unet_config": self.unet.config.__dict__, "mode": self.mode, "lock": self.lock,
                "heads": self.retrinet.heads if retri else None,
                "null_reference": self.retrinet.null_reference if retri else False, "train_base": self.train_base}
        meta = {"format": "pt", "retrinet": json.dumps(info, default=list)}
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata=meta)

    @property
    def _prefix(self) -> str:
        return "retrinet." if self.mode == "retrinet" else "control_model."

    @classmethod
    def load(cls, path: str | Path, unet: UNet) -> "RetriUNet":
        """A RetriUNet around `unet` with the weights saved by `save`; the file's base config must be
        `unet`'s. Official ControlNet files (no metadata) go through `load_controlnet`."""
        meta = read_metadata(path)
        diff = base_config_mismatch(meta, unet.config)
        if diff:
            raise CheckpointError(f"{path}: RetriNet made for another base U-Net; differing config fields "
                                  f"(file, model): {diff}")
        model = cls(unet, heads=meta.get("heads") or 8, lock=meta["lock"], mode=meta.get("mode", "retrinet"),
                    null_reference=meta.get("null_reference", False), train_base=meta.get("train_base", False))
        model.load_weights(path)
        return model

    def load_weights(self, path: str | Path) -> None:
        """Load a file written by `save` (for this very model: same mode, heads and lock) in place."""
        p = next(self.unet.parameters())
        state = read_tensors(path, device=p.device, dtype=p.dtype)
        added = {k[len(self._prefix):]: v for k, v in state.items() if k.startswith(self._prefix)}
        load_strict(self.added, added, source=str(path), layout=f"retrinet ({self.mode})")
        trained = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
        if trained:
            own = {k: v for k, v in self.unet.state_dict().items()
                   if self.train_base or k.startswith(("output_blocks.", "out."))}
            if trained.keys() != own.keys() or any(trained[k].shape != own[k].shape for k in own):
                raise CheckpointError(f"{path}: the trained U-Net weights do not fit the U-Net")
            self.unet.load_state_dict(trained, strict=False)

    @classmethod
    def load_controlnet(cls, path: str | Path, unet: UNet, lock: str = "none") -> "RetriUNet":
        """The ControlNet baseline from an official ControlNet file: `control_model.*` (1.1 files, or
        1.0 files holding the whole ControlLDM, whose other keys are ignored) or prefix-less keys."""
        keys = list(read_header(path))
        prefix = "control_model." if any(k.startswith("control_model.") for k in keys) else ""
        model = cls(unet, lock=lock, mode="controlnet")
        p = next(unet.parameters())
        names = [k for k in keys if k.startswith(prefix)] if prefix else keys
        state = read_tensors(path, names, rename=lambda k: k[len(prefix):], device=p.device, dtype=p.dtype)
        load_strict(model.control, state, source=str(path), layout=detect_layout(keys))
        return model


def base_config_mismatch(meta: dict, cfg: UNetConfig) -> dict:
    """{field: (checkpoint's value, cfg's value)} where a RetriNet checkpoint's base U-Net config
    (from `read_metadata`) differs from `cfg`; empty when they agree."""
    expected = json.loads(json.dumps(cfg.__dict__, default=list))
    defaults = json.loads(json.dumps(UNetConfig().__dict__, default=list))  # fields newer than the file
    saved = {k: meta["unet_config"].get(k, defaults[k]) for k in expected}
    return {k: (saved[k], v) for k, v in expected.items() if saved[k] != v}


def read_metadata(path: str | Path) -> dict:
    """The RetriNet metadata of a checkpoint written by RetriUNet.save (clear errors otherwise)."""
    read_header(path)  # existence, suffix, truncation
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "retrinet" not in meta:
        raise CheckpointError(f"{path}: not a RetriNet checkpoint (no 'retrinet' metadata)")
    return json.loads(meta["retrinet"])
