"""RetriNet (paper Sec. 5.1, Supp. A.4; docs/design.md section 3): a retrieval encoder E over reference
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

from dataclasses import dataclass

import torch
import torch.nn as nn
from PIL import Image

from einops import rearrange

from common.attention import attention, merge_heads, project_tokens, split_heads
from common.images import fit_and_pad
from common.weights import FieldError, check_fields
from unet import UNet, UNetConfig, UNetEncoder
from unet.model import zero_
from .base import MethodOptions, ReferenceUNet


class ReferenceCrossAttention(nn.Module):
    """Queries from the U-Net's feature at one site, keys/values from E's features of every
    reference at the same site (Sec. 5.1). Both sides are reshaped to tokens and layer-normalised
    over channels (Supp. A.4: "with proper reshaping and layer normalization"); multi-head; the one
    attention function with a key-padding mask for absent references."""

    def __init__(self, channels: int, heads: int, null_reference: bool = False):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels are not divisible by {heads} heads")
        self.heads = heads
        # The learned null reference (docs/design.md section 5, `ref_drop`): one normalised key/value
        # token that replaces all references of a sample whose references were dropped.
        self.null = nn.Parameter(torch.randn(channels) * channels ** -0.5) if null_reference else None
        self.norm_q, self.norm_kv = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, h: torch.Tensor, f, ref_mask: torch.Tensor | None = None,
                ref_drop: torch.Tensor | None = None) -> torch.Tensor:
        """h (B, C, H, W); f (B, K, C, h, w), or a list of K (B, C, h_k, w_k) for references of
        different sizes; ref_mask (B, K) bool, True = real reference; ref_drop (B,) bool, True = use
        the null reference instead of this sample's references -> tokens (B, HW, C)."""
        b, c = h.shape[:2]
        q = _normed_tokens(self.norm_q, h)                                    # (B, HW, C)
        if isinstance(f, torch.Tensor):  # K references of one size: one norm call for all
            kv = rearrange(_normed_tokens(self.norm_kv, f.flatten(0, 1)), "(b k) n c -> b (k n) c", b=b)
            counts = [f.shape[-2] * f.shape[-1]] * f.shape[1]
        else:
            kv = torch.cat([_normed_tokens(self.norm_kv, fk) for fk in f], dim=1)
            counts = [fk.shape[-2] * fk.shape[-1] for fk in f]
        # kv: every token of the K references as one set (B, sum of h_k w_k, C)
        mask = None
        if ref_mask is not None:  # each reference's flag over its tokens (shapes known when traced)
            mask = torch.cat([ref_mask[:, i, None].expand(b, n) for i, n in enumerate(counts)], dim=1)
        if self.null is not None:  # the null token is the last key, visible only to dropped samples
            drop = torch.zeros(b, dtype=torch.bool, device=h.device) if ref_drop is None else ref_drop
            kv = torch.cat([kv, self.null.to(kv.dtype).expand(b, 1, c)], dim=1)
            keep = torch.ones(b, sum(counts), dtype=torch.bool, device=h.device) if mask is None else mask
            mask = torch.cat([keep & ~drop[:, None], drop[:, None]], dim=1)
        if mask is not None:
            # A sample with no visible key at all would get NaN: let it attend to all; RetriNet.residuals
            # discards its result.
            mask = mask | ~mask.any(dim=1, keepdim=True)
        q, k, v = (split_heads(t, self.heads) for t in (self.to_q(q), self.to_k(kv), self.to_v(kv)))
        return self.to_out(merge_heads(attention(q, k, v, key_padding_mask=mask)))


def _normed_tokens(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> tokens (B, HW, C), each layer-normalised over its channels."""
    return norm(rearrange(x, "b c h w -> b (h w) c"))


class RetriNet(nn.Module):
    """E plus the 13 cross-attention layers and zero convs. Keys: `encoder.*` (E, named as SD's
    encoder half), `cross_attn.{0..12}.*`, `zero_convs.{0..12}.*` (site 12 = the middle block)."""

    def __init__(self, unet_cfg: UNetConfig, heads: int = 8, null_reference: bool = False):
        super().__init__()
        self.encoder = UNetEncoder(unet_cfg)
        sites = self.encoder.skip_channels + [self.encoder.middle_channels]
        self.cross_attn = nn.ModuleList(ReferenceCrossAttention(c, heads, null_reference) for c in sites)
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
        (unless they use the null reference). Each zero conv (1x1) runs on its attention's tokens as
        one matmul, so that its weight's gradient has the weight's own layout (a conv on the tokens
        seen as a map gave it other strides, which DDP copies into its buckets at every step)."""
        res = [rearrange(project_tokens(zc, attn(h, f, ref_mask, ref_drop)), "b (h w) c -> b c h w", h=h.shape[2])
               for h, f, attn, zc in zip(skips + [middle], features, self.cross_attn, self.zero_convs)]
        if ref_mask is not None:  # always multiplied (by 1 where kept): no branch on tensor values
            keep = ref_mask.any(dim=1) if ref_drop is None else ref_mask.any(dim=1) | ref_drop
            res = [r * keep.to(r.dtype)[:, None, None, None] for r in res]
        return res


@dataclass
class RetriNetConfig:
    heads: int = 8                 # attention heads of the 13 reference cross-attention layers
    null_reference: bool = False   # a learned null reference (trained with reference dropout)

    @classmethod
    def checked(cls, values, key: str = "", unet: UNetConfig | None = None) -> dict:
        """`values` (fields read from a checkpoint's metadata) of the types declared here; `heads` must
        split every width of the reference attention over the base U-Net `unet` (default SD v1.5's).
        FieldError (keys prefixed by `key`) otherwise."""
        values = check_fields(cls, values, key=key)
        heads = values.get("heads")
        widths = reference_widths(unet or UNetConfig())
        if heads is not None and (heads < 1 or any(w % heads for w in widths)):
            raise FieldError(key + "heads", heads, f"an integer >= 1 that divides {', '.join(map(str, widths))} "
                                                   f"(the widths it splits: the base U-Net's channels)")
        return values


def reference_widths(cfg: UNetConfig) -> list[int]:
    """The channel counts of RetriNet's 13 reference attention sites over a U-Net of config `cfg`
    (its skips and middle feature: model_channels times 1 and each channel_mult)."""
    return sorted({cfg.model_channels * m for m in (1, *cfg.channel_mult)})


class RetriUNet(ReferenceUNet):
    """The SD U-Net with RetriNet: `forward(x, timesteps, context, refs, ref_context, ref_mask=None) -> eps`.

    x (B, 4, H, W) noisy latents; context (B, L, D) prompt embeddings; refs (B, K, 4, h, w) reference
    latents (any h, w), or a list of K tensors (B, 4, h_k, w_k) when the references differ in size (a
    face crop beside a figure); ref_context (B, K, L, D) each reference's concept-text
    embedding; ref_mask (B, K) bool, True = a real reference (None = all real).
    """

    method, title, prefix, config_class = "retrinet", "RetriNet", "retrinet.", RetriNetConfig
    # The paper's recipe (Sec. 5.2): K = 2 references, SD's decoder trains, half the prompts emptied,
    # Eq. 3's face term at lambda_face = 0.1. The cosine schedule with restarts (Supp. A.4) after the
    # preset's warm-up, gradients clipped at norm 1, AdamW's weight decay 1e-2 and eps 1e-8.
    training_defaults = dict(refs=2, lock="none", prompt_drop=0.5, face_weight=0.1, schedule="cosine-restarts",
                             clip_grad=1.0, weight_decay=1e-2, adam_eps=1e-8)

    def __init__(self, unet: UNet, heads: int = 8, lock: str = "none", null_reference: bool = False,
                 train_base: bool = False):
        super().__init__(unet, RetriNetConfig(heads, null_reference))
        self.retrinet = self._like_unet(RetriNet(unet.config, heads, null_reference))
        self._init_encoder_from_unet(self.retrinet.encoder)
        self.set_lock(lock, train_base)

    @classmethod
    def build(cls, unet: UNet, options: MethodOptions) -> "RetriUNet":
        return cls(unet, heads=options.heads, lock=options.lock, null_reference=options.null_reference,
                   train_base=options.train_base)

    @classmethod
    def option_problems(cls, args) -> list[str]:
        return []  # every task, any K, reference dropout and --heads apply

    @property
    def added(self) -> RetriNet:
        return self.retrinet

    def lockb_frozen(self) -> list[nn.Module]:
        """LockB freezes E; the cross-attention layers and zero convs still train."""
        return [self.retrinet.encoder]

    def forward(self, x, timesteps, context, refs, ref_context=None, ref_mask=None, features=None, ref_drop=None):
        """`features`: E's output from `retrinet.encode_refs`, when computed once for several calls.
        `ref_drop` (B,) bool replaces a sample's references by the learned null reference (models
        built with `null_reference=True`, trained with reference dropout)."""
        self._check(x, refs, ref_context, ref_mask, ref_drop)
        unet = self.unet
        emb = unet.embed_time(timesteps, x.shape[0], x.dtype)
        with torch.set_grad_enabled(self.train_base and torch.is_grad_enabled()):  # frozen: keep no graph
            skips, middle = unet.encode(x, emb if self.train_base else emb.detach(), context)
        if features is None:
            features = self.retrinet.encode_refs(refs, timesteps, ref_context)
        res = self.retrinet.residuals(skips, middle, features, ref_mask, ref_drop)
        return unet.decode(skips, middle, emb, context, skip_residuals=res[:-1], middle_residual=res[-1])

    def _check(self, x, refs, ref_context, ref_mask, ref_drop=None):
        b, c = x.shape[0], self.unet.config.in_channels
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

    # -- training ---------------------------------------------------------------------------------
    def training_inputs(self, sd, text, batch: dict, gens: list, u, ref_drop: float) -> dict:
        """K references as VAE posterior samples with their concept texts; a sample whose draw u falls
        below `ref_drop` sees the learned null reference instead (our addition, docs/design.md section 5)."""
        refs = batch["refs"].to(sd.device, non_blocking=True)
        b, k = refs.shape[:2]
        post = sd.vae.encode(refs.flatten(0, 1))
        ref_noise = torch.stack([torch.randn((k, *post.mean.shape[1:]), generator=g) for g in gens]).to(sd.device)
        latents = (post.mean.float().unflatten(0, (b, k)) + post.std.float().unflatten(0, (b, k)) * ref_noise)
        ref_context = text([c for cs in batch["concepts"] for c in cs]).unflatten(0, (b, k))
        return dict(context=text(batch["prompt"]), refs=latents * sd.latent_scale, ref_context=ref_context,
                    ref_mask=batch["ref_mask"].to(sd.device),
                    ref_drop=(u < ref_drop) if self.config.null_reference else None)

    # -- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def denoiser(self, sd, references: list[Image.Image], concepts: list[str], *, ref_size: int, height: int,
                 width: int):
        """`(x, t, context, ref_drop=None) -> eps` conditioned on fixed references: each is fitted and
        padded to `ref_size` (as the training loader does) and VAE-encoded once. At each step E's
        features are computed once, for one copy of the references, and shared by the whole
        guidance batch."""
        pixels = torch.stack([fit_and_pad(im, ref_size)[0] for im in references]).to(sd.device, sd.dtype)
        refs = (sd.vae.encode(pixels).mean * sd.latent_scale)[None]       # (1, K, C, s/8, s/8)
        ref_context = sd.encode_prompts(concepts)[None]                  # (1, K, 77, D)

        @torch.no_grad()
        def eps(x, t, context, ref_drop=None):
            b = x.shape[0]
            features = [f.expand(b, *f.shape[1:]) for f in self.retrinet.encode_refs(refs, t, ref_context)]
            return self(x, t, context, refs.expand(b, *refs.shape[1:]), ref_context.expand(b, *ref_context.shape[1:]),
                        features=features, ref_drop=ref_drop)
        return eps
