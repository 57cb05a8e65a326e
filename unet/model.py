"""The Stable Diffusion U-Net (LDM's `openaimodel.UNetModel`) with its native parameter names.

Attribute paths equal the keys under `model.diffusion_model.` in SD v1.5's single file, so the
official weights load with no mapping:

    time_embed.{0,2}                      Linear -> SiLU -> Linear on the sinusoidal timestep
    input_blocks.0.0                      conv_in
    input_blocks.N.0 [+ .1]               ResBlock [+ SpatialTransformer], or .0.op = Downsample
    middle_block.{0,1,2}                  ResBlock, SpatialTransformer, ResBlock
    output_blocks.N.0 [+ .1] [+ .1/.2]    ResBlock on [h, skip] [+ SpatialTransformer] [+ Upsample]
    out.{0,2}                             GroupNorm -> SiLU -> conv_out

The encoder half (`encode`: input_blocks + middle_block) and the decoder half (`decode`:
output_blocks + out) are separate calls, so RetriNet and ControlNet can add residuals to the 12
skips and the middle feature in between (docs/design.md section 3). `context` reaches every
transformer block's text cross-attention (`attn2`) as given, so a method that installs attn2 layers
of its own at construction can hand them more than the text.

Norms are plain `nn.GroupNorm` (eps 1e-5; 1e-6 in the transformers, as in LDM). LDM's GroupNorm32
casts to fp32 around it; torch's kernels already accumulate the statistics in fp32 for half inputs
and autocast runs group_norm in fp32, so the extra casts would only add memory traffic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common.attention import attention, merge_heads, project_tokens, set_attention_options, split_heads
from common.weights import FieldError, check_fields

# Bounds of the values a file may give (UNetConfig.checked): generous, but a count of 10^7 would build
# modules for hours. SD v1.5: 320 channels, 2 res blocks, 4 levels, depth 1; SDXL: depth 10.
UNET_LIMITS = dict(in_channels=(1, 1024), out_channels=(1, 1024), model_channels=(1, 8192),
                   attention_resolutions=(1, 65536), num_res_blocks=(1, 8), channel_mult=(1, 64),
                   transformer_depth=(1, 16), context_dim=(1, 65536), dropout=(0, 1), norm_groups=(1, 8192))
UNET_HEADS = {"num_heads": 1024, "num_head_channels": 8192}  # -1 leaves it to the other


@dataclass
class UNetConfig:
    """LDM yaml names (`unet_config.params`). `num_head_channels` > 0 fixes the head width instead
    of the head count (SD 2); `transformer_depth` may be a list with one entry per level."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple = (1, 2, 4, 4)
    num_heads: int = 8
    transformer_depth: int | tuple = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    num_head_channels: int = -1
    dropout: float = 0.0
    norm_groups: int = 32  # GroupNorm groups everywhere (LDM: always 32; diffusers' norm_num_groups)

    def __post_init__(self):
        # Lists from a yaml / json become tuples; resolutions are a set, kept in LDM's descending order.
        self.attention_resolutions = tuple(sorted(set(self.attention_resolutions), reverse=True))
        self.channel_mult = tuple(self.channel_mult)
        if not isinstance(self.transformer_depth, int):
            self.transformer_depth = tuple(self.transformer_depth)
            if len(self.transformer_depth) != len(self.channel_mult):
                raise ValueError(f"transformer_depth {self.transformer_depth} needs one entry per level "
                                 f"of channel_mult {self.channel_mult}")

    @classmethod
    def sd15(cls) -> "UNetConfig":
        """SD v1.5 (CompVis `v1-inference.yaml`): 859,520,964 parameters."""
        return cls()

    @classmethod
    def checked(cls, values, key: str = "") -> dict:
        """`values` (fields read from a file: --config, a checkpoint's metadata; any may be missing)
        of the types declared here, bounded generously: the counts bound the modules a build makes.
        FieldError (keys prefixed by `key`) for the first that is not."""
        values = check_fields(cls, values, key=key, limits=UNET_LIMITS, lengths={"channel_mult": (1, 8)})
        for name, high in UNET_HEADS.items():
            if name in values and not (values[name] == -1 or 1 <= values[name] <= high):
                raise FieldError(key + name, values[name], f"-1 (unset) or an integer from 1 to {high}")
        levels = len(values.get("channel_mult", cls.channel_mult))
        depth = values.get("transformer_depth")
        if isinstance(depth, (list, tuple)) and len(depth) != levels:
            raise FieldError(key + "transformer_depth", depth, f"an integer or a list of {levels} (one per level of "
                                                               f"channel_mult)")
        return values

    def heads_and_dim(self, channels: int) -> tuple[int, int]:
        if self.num_head_channels == -1:
            if channels % self.num_heads:
                raise ValueError(f"{channels} channels are not divisible by num_heads {self.num_heads}")
            return self.num_heads, channels // self.num_heads
        if channels % self.num_head_channels:
            raise ValueError(f"{channels} channels are not divisible by num_head_channels {self.num_head_channels}")
        return channels // self.num_head_channels, self.num_head_channels

    def depth(self, level: int) -> int:
        d = self.transformer_depth
        return d if isinstance(d, int) else d[level]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cosines first (LDM `util.timestep_embedding`), float32 (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def zero_(module: nn.Module) -> nn.Module:
    """Zero-initialise a layer whose output starts a residual branch (LDM's `zero_module`)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the timestep embedding, GroupNorm-SiLU-dropout-conv, plus a skip
    (1x1 conv when the channel count changes)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        # In-place SiLU after a norm and in-place adds on fresh conv outputs: the same arithmetic with
        # fewer large allocations. (Not in emb_layers: the embedding is shared by every block.)
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(inplace=True),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels), nn.SiLU(inplace=True), nn.Dropout(dropout),
                                        zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h.add_(self.emb_layers(emb)[:, :, None, None].to(h.dtype))
        return self.out_layers(h).add_(self.skip_connection(x))


class CrossAttention(nn.Module):
    """Multi-head attention of x over `context` (itself when None), through the one attention function."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        # Runtime options (UNet.set_attention): fp32 softmax, query chunking.
        self.upcast = False
        self.chunk_size: int | None = None
        # Optional `recorder(module, q, k)` (e.g. retrinet.AttentionRecorder); None on the normal path.
        self.recorder = None

    def forward(self, x, context=None, context_mask=None):
        context = x if context is None else context
        q, k, v = (split_heads(t, self.heads) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = attention(q, k, v, key_padding_mask=context_mask, upcast=self.upcast, chunk_size=self.chunk_size)
        if self.recorder is not None:
            self.recorder(self, q, k)
        return self.to_out(merge_heads(out))


class GEGLU(nn.Module):
    """Linear to 2x width, then value * gelu(gate) (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention on the text context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context, context_mask=None):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, project in, transformer blocks over the h*w tokens, project out, residual.
    Projections are 1x1 convs (SD 1.x) or linear layers (`use_linear`, SD 2)."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 use_linear: bool = False, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth))
        self.proj_out = zero_(nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1))

    def forward(self, x, context, context_mask=None):
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, C, H, W) -> tokens (B, HW, C)
        x = project_tokens(self.proj_in, x)
        for block in self.transformer_blocks:
            x = block(x, context, context_mask)
        x = project_tokens(self.proj_out, x)
        # residual first: the sum takes its memory format (contiguous, or channels_last if x was)
        return residual + x.reshape(b, h, w, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to `size`, the matching skip's, for sizes not divisible by 2^levels),
    then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """A block of the U-Net: passes the timestep embedding to ResBlocks and the context to
    SpatialTransformers (LDM's class of the same name)."""

    def forward(self, x, emb, context, context_mask=None, out_size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            elif isinstance(layer, Upsample):
                x = layer(x, out_size)
            else:
                x = layer(x)
        return x


def _transformer(cfg: UNetConfig, ch: int, level: int) -> SpatialTransformer:
    heads, dim_head = cfg.heads_and_dim(ch)
    return SpatialTransformer(ch, heads, dim_head, cfg.depth(level), cfg.context_dim, cfg.use_linear_in_transformer,
                              cfg.dropout, cfg.norm_groups)


class UNetEncoder(nn.Module):
    """time_embed + input_blocks + middle_block: the encoder half of LDM's U-Net. On its own it is
    the trunk of ControlNet and of RetriNet's retrieval encoder E (same blocks, same key names)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
        self.gradient_checkpointing = False  # runtime switch: recompute each block in backward

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        self.skip_channels, ch, ds = [mc], mc, 1  # channels of the 12 skips (input-block outputs)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * mc, cfg.dropout, cfg.norm_groups)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(_transformer(cfg, ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                self.skip_channels.append(ch)
                ds *= 2
        self.middle_channels = ch
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_dim, ch, cfg.dropout, cfg.norm_groups),
                                                    _transformer(cfg, ch, len(cfg.channel_mult) - 1),
                                                    ResBlock(ch, emb_dim, ch, cfg.dropout, cfg.norm_groups))

    def set_attention(self, *, upcast: bool | None = None, chunk_size: int | None | str = "keep") -> None:
        """Set every attention layer's fp32 upcast and/or query chunk size (None = no chunking)."""
        set_attention_options(self, upcast=upcast, chunk_size=chunk_size)

    def _run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def embed_time(self, timesteps, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """Timestep embedding (B, 4 * model_channels)."""
        t = torch.as_tensor(timesteps, device=self.time_embed[0].weight.device)
        t = t.expand(batch) if t.dim() == 0 else t
        if t.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or shape ({batch},), got {tuple(t.shape)}")
        return self.time_embed(timestep_embedding(t, self.config.model_channels).to(dtype))

    def encode(self, x, emb, context, context_mask=None, hint=None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """input_blocks + middle_block -> (the 12 skip features, the middle feature). `hint` is added
        after the first block (conv_in), as ControlNet adds its hint embedding. `context` and
        `context_mask` go unchanged to every transformer block's attn2."""
        skips, h = [], x
        for i, block in enumerate(self.input_blocks):
            h = self._run(block, h, emb, context, context_mask)
            if i == 0 and hint is not None:
                h = h + hint
            skips.append(h)
        return skips, self._run(self.middle_block, h, emb, context, context_mask)


class UNet(UNetEncoder):
    """`forward(x, timesteps, context) -> eps`: the noise predicted for latents x at `timesteps`
    (int or float, (B,) or scalar) under text `context` (B, L, context_dim). The encoder half comes
    from UNetEncoder; output_blocks and out are the decoder."""

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
        skip_channels, ch = list(self.skip_channels), self.middle_channels
        ds = 2 ** (len(cfg.channel_mult) - 1)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * mc, cfg.dropout, cfg.norm_groups)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(_transformer(cfg, ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(cfg.norm_groups, ch), nn.SiLU(inplace=True), zero_(nn.Conv2d(mc, cfg.out_channels, 3, padding=1)))

    # -- the decoder half and the whole forward pass ---------------------------------------------
    def decode(self, skips, middle, emb, context, context_mask=None, skip_residuals=None, middle_residual=None):
        """output_blocks + out. Residuals (ControlNet / RetriNet) are added to each skip and to the
        middle feature first; `skip_residuals[i]` goes with `skips[i]`. `context` as in `encode`."""
        if len(skips) != len(self.output_blocks):
            raise ValueError(f"decode needs {len(self.output_blocks)} skips, got {len(skips)}")
        if skip_residuals is not None:
            if len(skip_residuals) != len(skips):
                raise ValueError(f"decode needs {len(skips)} skip residuals, got {len(skip_residuals)}")
            skips = [s + r for s, r in zip(skips, skip_residuals)]
        h = middle if middle_residual is None else middle + middle_residual
        skips = list(skips)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            out_size = skips[-1].shape[-2:] if skips else None  # the next skip's size, for odd shapes
            h = self._run(block, h, emb, context, context_mask, out_size)
        return self.out(h)

    def check_inputs(self, x, context) -> None:
        """ValueError unless x is (B, in_channels, H, W) and context (B, L, context_dim)."""
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x must be (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[2] != self.config.context_dim:
            raise ValueError(f"context must be ({x.shape[0]}, L, {self.config.context_dim}), got {tuple(context.shape)}")

    def forward(self, x, timesteps, context, context_mask=None):
        """x (B, in_channels, H, W), timesteps (B,) or scalar, context (B, L, context_dim),
        context_mask (B, L) bool or None (True = attend) -> eps (B, out_channels, H, W)."""
        self.check_inputs(x, context)
        emb = self.embed_time(timesteps, x.shape[0], x.dtype)
        skips, middle = self.encode(x, emb, context, context_mask)
        return self.decode(skips, middle, emb, context, context_mask)
