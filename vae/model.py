"""The Stable Diffusion VAE (LDM's `AutoencoderKL`, Rombach et al. 2022) with its native names.

Attribute paths equal the keys under `first_stage_model.` in SD v1.5's single file:

    encoder.conv_in, encoder.down.{i}.block.{j}, encoder.down.{i}.downsample.conv,
    encoder.mid.{block_1, attn_1, block_2}, encoder.norm_out, encoder.conv_out, quant_conv,
    post_quant_conv, decoder.conv_in, decoder.mid.*, decoder.up.{i}.block.{j},
    decoder.up.{i}.upsample.conv, decoder.norm_out, decoder.conv_out

`decoder.up` is indexed by resolution level like the encoder, so the decoder runs it backwards
(up.3 first). The mid-block attention stores q / k / v / proj_out as 1x1 convs.

`encode(x)` -> a diagonal Gaussian posterior over latents; `decode(z)` -> image in [-1, 1] (not
clamped). The 0.18215 latent scale is applied by callers. `tiled_encode` / `tiled_decode` process
large images in overlapping tiles blended with linear ramps, so memory stays bounded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.attention import attention, project_tokens, set_attention_options
from common.weights import check_fields

# Bounds of the values a file may give (VAEConfig.checked): generous; SD v1.5: 128 channels, 4 levels.
VAE_LIMITS = dict(embed_dim=(1, 1024), z_channels=(1, 1024), resolution=(1, 65536), in_channels=(1, 1024),
                  out_ch=(1, 1024), ch=(1, 8192), ch_mult=(1, 64), num_res_blocks=(1, 8), attn_resolutions=(1, 65536),
                  dropout=(0, 1))


@dataclass
class VAEConfig:
    """LDM `first_stage_config.params`: `embed_dim` plus the `ddconfig` names."""
    embed_dim: int = 4
    z_channels: int = 4
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple = ()
    dropout: float = 0.0
    double_z: bool = True

    def __post_init__(self):
        self.ch_mult, self.attn_resolutions = tuple(self.ch_mult), tuple(self.attn_resolutions)

    @classmethod
    def sd15(cls) -> "VAEConfig":
        """SD v1.5 (CompVis `v1-inference.yaml`): 83,653,863 parameters."""
        return cls()

    @classmethod
    def checked(cls, values, key: str = "") -> dict:
        """`values` (fields read from a file; any may be missing) of the types declared here, bounded
        generously; FieldError (keys prefixed by `key`) for the first that is not."""
        return check_fields(cls, values, key=key, limits=VAE_LIMITS, lengths={"ch_mult": (1, 8)})

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.ch_mult) - 1)


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm-swish-conv, norm-swish-dropout-conv, plus the input (1x1 conv when channels change)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        # In-place SiLU / add on fresh intermediates: the same arithmetic, fewer large allocations
        # (at 512 px one activation is 128 MB, and every new one costs page faults on the CPU).
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return h.add_(self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.upcast = False  # fp32 softmax (AutoencoderKL.set_attention)
        self.chunk_size: int | None = None

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, 1, h * w, c)  # one head
        q, k, v = (project_tokens(layer, tokens) for layer in (self.q, self.k, self.v))
        out = attention(q, k, v, upcast=self.upcast, chunk_size=self.chunk_size)
        out = project_tokens(self.proj_out, out).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + out


class Downsample(nn.Module):
    """Pad right and bottom by one, then a stride-2 3x3 conv (LDM's asymmetric downsampling)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (AttnBlocks, if any), and a resampler."""

    def __init__(self, blocks, attns):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, h):
        for j, block in enumerate(self.block):
            h = block(h)
            if self.attn:
                h = self.attn[j](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch_in, res = cfg.ch, cfg.resolution
        for level, mult in enumerate(cfg.ch_mult):
            ch_out = cfg.ch * mult
            blocks = [ResnetBlock(ch_in if j == 0 else ch_out, ch_out, cfg.dropout) for j in range(cfg.num_res_blocks)]
            attns = [AttnBlock(ch_out) for _ in range(cfg.num_res_blocks)] if res in cfg.attn_resolutions else []
            down = _Level(blocks, attns)
            if level != len(cfg.ch_mult) - 1:
                down.downsample = Downsample(ch_out)
                res //= 2
            self.down.append(down)
            ch_in = ch_out
        self.mid = _Mid(ch_in, cfg.dropout)
        self.norm_out = Normalize(ch_in)
        self.conv_out = nn.Conv2d(ch_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for down in self.down:
            h = down(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        levels = len(cfg.ch_mult)
        ch_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, ch_in, 3, padding=1)
        self.mid = _Mid(ch_in, cfg.dropout)
        up = [None] * levels
        for level in reversed(range(levels)):  # built (and run) from the lowest resolution up
            ch_out = cfg.ch * cfg.ch_mult[level]
            blocks = [ResnetBlock(ch_in if j == 0 else ch_out, ch_out, cfg.dropout) for j in range(cfg.num_res_blocks + 1)]
            attns = [AttnBlock(ch_out) for _ in range(cfg.num_res_blocks + 1)] if res in cfg.attn_resolutions else []
            up[level] = _Level(blocks, attns)
            if level != 0:
                up[level].upsample = Upsample(ch_out)
                res *= 2
            ch_in = ch_out
        self.up = nn.ModuleList(up)  # indexed by level, as in the checkpoint
        self.norm_out = Normalize(ch_in)
        self.conv_out = nn.Conv2d(ch_in, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for up in reversed(self.up):
            h = up(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class DiagonalGaussian:
    """The encoder's posterior N(mean, std^2) per latent element; log-variance clamped to [-30, 20]."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        z2 = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.quant_conv = nn.Conv2d(z2, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def set_attention(self, *, upcast: bool | None = None, chunk_size: int | None | str = "keep") -> None:
        """Set every attention layer's fp32 upcast and/or query chunk size (None = no chunking)."""
        set_attention_options(self, upcast=upcast, chunk_size=chunk_size)

    def _moments(self, x):
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> posterior over (B, 4, H/8, W/8)."""
        f = self.config.downscale
        if x.dim() != 4 or x.shape[1] != self.config.in_channels or x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"encode expects (B, {self.config.in_channels}, H, W) with H, W multiples of {f}, "
                             f"got {tuple(x.shape)}")
        return DiagonalGaussian(self._moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) (unscaled) -> image (B, 3, 8h, 8w), nominally in [-1, 1]."""
        if z.dim() != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"decode expects (B, {self.config.embed_dim}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def tiled_encode(self, x: torch.Tensor, tile: int = 512, overlap: int = 128) -> DiagonalGaussian:
        """`encode` over `tile`-pixel tiles overlapping by `overlap` pixels (multiples of 8)."""
        f = self.config.downscale
        self.encode(x[..., :f, :f])  # validates the shape cheaply
        return DiagonalGaussian(_tiled(self._moments, x, tile, overlap, 1 / f))

    def tiled_decode(self, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
        """`decode` over `tile`-latent tiles overlapping by `overlap` latents."""
        return _tiled(self.decode, z, tile, overlap, self.config.downscale)


def _ramp(n: int, ramp: int, fade_start: bool, fade_end: bool) -> torch.Tensor:
    """1-D blending weights: 1 inside, rising linearly from 0 over `ramp` samples at faded ends
    (0 at a tile's outermost sample, the one its own zero padding disturbs most)."""
    w = torch.ones(n)
    if ramp > 0:
        r = torch.arange(ramp) / ramp
        if fade_start:
            w[:ramp] = torch.minimum(w[:ramp], r)
        if fade_end:
            w[n - ramp:] = torch.minimum(w[n - ramp:], r.flip(0))
    return w


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _tiled(fn, x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """Apply `fn` (which scales spatial size by `scale`) to overlapping tiles of x and blend the
    results: each output pixel is the weighted mean of the tiles covering it, with weights that
    ramp linearly across the overlaps, so seams fade instead of cutting."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got tile {tile}, overlap {overlap}")
    h, w = x.shape[-2:]
    ys, xs = _starts(h, tile, tile - overlap), _starts(w, tile, tile - overlap)
    out = weight = None
    ramp = int(overlap * scale)
    for y in ys:
        for x0 in xs:
            th, tw = min(tile, h), min(tile, w)
            piece = fn(x[..., y:y + th, x0:x0 + tw])
            oh, ow = piece.shape[-2:]
            wy = _ramp(oh, ramp, y > 0, y + th < h)
            wx = _ramp(ow, ramp, x0 > 0, x0 + tw < w)
            wt = (wy[:, None] * wx[None, :]).to(piece)
            if out is None:
                out = piece.new_zeros(*piece.shape[:-2], int(h * scale), int(w * scale))
                weight = piece.new_zeros(int(h * scale), int(w * scale))
            oy, ox = int(y * scale), int(x0 * scale)
            out[..., oy:oy + oh, ox:ox + ow] += piece * wt
            weight[oy:oy + oh, ox:ox + ow] += wt
    return out / weight
