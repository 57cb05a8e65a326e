"""IP-Adapter (Ye et al. 2023), a baseline of the paper (Sec. 3.1): the reference image's projected
CLIP image embedding becomes a few extra tokens, which every text cross-attention of the frozen SD
U-Net attends to through its own key / value projections (decoupled cross-attention):

    reference --CLIP image encoder (frozen)--> e (B, D)
    e --image_proj: Linear(D -> N * C), reshape (B, N, C), LayerNorm--> c_img (N = 4 tokens)
    in each attn2:  out = to_out( Attn(q, k_text, v_text) + scale * Attn(q, to_k_ip(c_img), to_v_ip(c_img)) )

Only image_proj and the to_k_ip / to_v_ip pairs train (lock "decoder", as in the official training).
IPAdapterUNet installs the image attention at construction: each transformer block's attn2 becomes a
`DecoupledCrossAttention`, which keeps that layer's to_q / to_k / to_v / to_out modules (SD's keys and
weights unchanged) and has no weights of its own. Given a tensor context it is SD's cross-attention,
so the U-Net stays plain SD for every other caller; `IPAdapterUNet.forward` hands the U-Net a
`DecoupledContext` instead (the text, each layer's image keys and values from the adapter, the scale),
which `UNet.encode` / `UNet.decode` pass to every attn2 as they pass a text context.

Official files (`ip-adapter_sd15.safetensors`) hold `image_proj.proj.*`, `image_proj.norm.*` and
`ip_adapter.{n}.to_{k,v}_ip.weight`, n the layer's position among diffusers' attention processors
(down blocks, up blocks, then the mid block; self- and cross-attention alternate, so n is odd);
`official_numbers` is the one table between those numbers and our module order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from clip.preprocess import CLIP_MEAN, CLIP_STD
from common.attention import attention, merge_heads, split_heads
from common.images import fit_and_pad
from common.weights import CheckpointError, FieldError, check_fields, read_header, read_tensors
from diffusion.sd15 import ClassifierFreeGuidance
from unet import UNet, UNetConfig
from unet.model import BasicTransformerBlock, CrossAttention
from .base import METADATA_KEY, MethodOptions, ReferenceUNet, file_metadata


# The default negative prompt of IP-Adapter's official pipeline (ip_adapter/ip_adapter.py, IPAdapter.generate;
# sample.py --ip-adapter-negative).
IP_ADAPTER_NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"


@dataclass
class IPAdapterConfig:
    image_embed_dim: int = 768   # the image encoder's projected embedding (1024 for the official ViT-H/14)
    num_tokens: int = 4          # image tokens the embedding becomes

    @classmethod
    def checked(cls, values, key: str = "", unet: UNetConfig | None = None) -> dict:
        """`values` (fields read from a checkpoint's metadata) of the types declared here, bounded
        generously (num_tokens x the context width is image_proj's output); FieldError otherwise."""
        return check_fields(cls, values, key=key, limits={"image_embed_dim": (1, 65536), "num_tokens": (1, 1024)})


# -- where the cross-attention layers are -------------------------------------------------------------

def cross_attention_layers(cfg: UNetConfig) -> list[tuple[str, int]]:
    """(part, channels) of each transformer block of the U-Net `cfg` describes, in our module order
    (input_blocks, middle_block, output_blocks; the order of `IPAdapter.layers`); part is
    "down", "mid" or "up". SD v1.5: 6 down, 1 mid, 9 up."""
    mc, levels = cfg.model_channels, range(len(cfg.channel_mult))
    attends = [lv for lv in levels if 2 ** lv in cfg.attention_resolutions]  # LDM: ds = 2^level
    down = [("down", cfg.channel_mult[lv] * mc) for lv in attends for _ in range(cfg.num_res_blocks * cfg.depth(lv))]
    mid = [("mid", cfg.channel_mult[-1] * mc)] * cfg.depth(len(cfg.channel_mult) - 1)
    up = [("up", cfg.channel_mult[lv] * mc) for lv in reversed(attends)
          for _ in range((cfg.num_res_blocks + 1) * cfg.depth(lv))]
    return down + mid + up


def official_numbers(cfg: UNetConfig) -> list[int]:
    """Entry i: the number n under which official IP-Adapter files store our cross-attention layer i
    (`ip_adapter.{n}.to_k_ip.weight`). The official numbering counts every attention processor in
    diffusers' `UNet2DConditionModel.attn_processors` order, which visits down_blocks, up_blocks and
    only then mid_block (the order the modules were registered); self- (even) and cross-attention
    (odd) alternate. SD v1.5: ours 0-5 -> 1, 3, ..., 11; ours 6 (middle) -> 31; ours 7-15 -> 13, ..., 29."""
    parts = [part for part, _ in cross_attention_layers(cfg)]
    order = [i for want in ("down", "up", "mid") for i, part in enumerate(parts) if part == want]
    number = {i: 2 * position + 1 for position, i in enumerate(order)}
    return [number[i] for i in range(len(parts))]


def official_key_map(cfg: UNetConfig) -> dict[str, str]:
    """{official key: our key (in IPAdapter)} for every tensor of an official IP-Adapter file."""
    keys = {f"image_proj.{k}": f"image_proj.{k}" for k in ("proj.weight", "proj.bias", "norm.weight", "norm.bias")}
    for i, n in enumerate(official_numbers(cfg)):
        for kv in ("to_k_ip", "to_v_ip"):
            keys[f"ip_adapter.{n}.{kv}.weight"] = f"layers.{i}.{kv}.weight"
    return keys


def is_official_file(keys) -> bool:
    """Keys of an official IP-Adapter file: top-level `image_proj.` and `ip_adapter.<number>.`."""
    keys = list(keys)
    return any(k.startswith("image_proj.") for k in keys) and any(
        k.startswith("ip_adapter.") and k.split(".")[1].isdigit() for k in keys)


def official_config(header: dict, path, context_dim: int | None = None) -> IPAdapterConfig:
    """The config an official file's shapes imply: image_embed_dim = proj.weight's columns,
    num_tokens = its rows // context_dim (the U-Net's when given, else the file's own, from
    image_proj.norm.weight)."""
    need = ["image_proj.proj.weight"] + ([] if context_dim else ["image_proj.norm.weight"])
    missing = [k for k in need if k not in header]
    if missing:
        raise CheckpointError(f"{path}: official IP-Adapter file without {', '.join(missing)}")
    ranks = {"image_proj.proj.weight": 2, "image_proj.norm.weight": 1}
    for key in need:
        shape = header[key]["shape"]
        if len(shape) != ranks[key] or 0 in shape:
            raise CheckpointError(f"{path}: official IP-Adapter tensor {key} has shape {shape}; expected "
                                  f"{ranks[key]} non-zero dimensions")
    rows, dim = header["image_proj.proj.weight"]["shape"]
    ctx = context_dim or header["image_proj.norm.weight"]["shape"][0]
    if rows % ctx:
        raise CheckpointError(f"{path}: image_proj.proj.weight has {rows} rows, not a multiple of the context "
                              f"dimension {ctx} (made for another base U-Net?)")
    values = {"image_embed_dim": dim, "num_tokens": rows // ctx}
    try:
        return IPAdapterConfig(**IPAdapterConfig.checked(values))
    except FieldError as e:
        raise CheckpointError(f"{path}: the config its shapes imply is out of bounds: {e}") from None


# -- the module -------------------------------------------------------------------------------------

class ImageProjection(nn.Module):
    """(B, image_embed_dim) -> (B, num_tokens, context_dim): Linear, reshape, LayerNorm (keys proj, norm)."""

    def __init__(self, image_embed_dim: int, num_tokens: int, context_dim: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(image_embed_dim, num_tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.proj(image_embeds.to(self.proj.weight.dtype))
        return self.norm(x.reshape(x.shape[0], self.num_tokens, -1))


class ImageKV(nn.Module):
    """One cross-attention layer's image keys and values: to_k_ip, to_v_ip (context_dim -> inner)."""

    def __init__(self, context_dim: int, inner: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
        self.to_v_ip = nn.Linear(context_dim, inner, bias=False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_heads(self.to_k_ip(tokens), self.heads), split_heads(self.to_v_ip(tokens), self.heads)


class IPAdapter(nn.Module):
    """image_proj plus one ImageKV per transformer block of the U-Net (`layers.{i}`, our module order)."""

    def __init__(self, unet_cfg: UNetConfig, image_embed_dim: int = 768, num_tokens: int = 4):
        super().__init__()
        ctx = unet_cfg.context_dim
        self.image_proj = ImageProjection(image_embed_dim, num_tokens, ctx)
        self.layers = nn.ModuleList(ImageKV(ctx, ch, unet_cfg.heads_and_dim(ch)[0])
                                    for _, ch in cross_attention_layers(unet_cfg))

    def forward(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """image_embeds (B, image_embed_dim) -> one (k, v) per cross-attention layer (`layers` order),
        k and v (B, heads, num_tokens, dim_head): a DecoupledContext's `image_kv`."""
        tokens = self.image_proj(image_embeds)
        return [layer(tokens) for layer in self.layers]


class DecoupledContext(NamedTuple):
    """The context IPAdapterUNet hands the U-Net: the text context (B, L, context_dim), the adapter's
    image keys and values (one (k, v) per cross-attention layer, `IPAdapter.forward`) and the weight
    of the image attention."""
    text: torch.Tensor
    image_kv: list[tuple[torch.Tensor, torch.Tensor]]
    scale: float


class DecoupledCrossAttention(CrossAttention):
    """IP-Adapter's decoupled cross-attention, installed in place of a transformer block's attn2 (`attn`),
    whose projection modules it keeps: same keys, same weights, no parameters of its own. Given a
    DecoupledContext, out = to_out(Attn(q, k_text, v_text) + scale * Attn(q, k_ip, v_ip)) with
    (k_ip, v_ip) the context's entry `index`, through the same attention function and options; the
    text mask applies to the text alone. Given anything else, it is `attn`: plain SD."""

    def __init__(self, attn: CrossAttention, index: int):
        nn.Module.__init__(self)  # not CrossAttention.__init__: the projections are attn's, not new ones
        self.heads = attn.heads
        self.to_q, self.to_k, self.to_v, self.to_out = attn.to_q, attn.to_k, attn.to_v, attn.to_out
        self.upcast, self.chunk_size, self.recorder = attn.upcast, attn.chunk_size, attn.recorder
        self.training = attn.training
        self.index = index  # this layer's position among the U-Net's cross-attention layers (module order)

    def forward(self, x, context=None, context_mask=None):
        if not isinstance(context, DecoupledContext):
            return super().forward(x, context, context_mask)
        text = context.text
        q, k, v = (split_heads(t, self.heads) for t in (self.to_q(x), self.to_k(text), self.to_v(text)))
        out = attention(q, k, v, key_padding_mask=context_mask, upcast=self.upcast, chunk_size=self.chunk_size)
        if self.recorder is not None:
            self.recorder(self, q, k)
        k_ip, v_ip = context.image_kv[self.index]
        out = out + context.scale * attention(q, k_ip, v_ip, upcast=self.upcast, chunk_size=self.chunk_size)
        return self.to_out(merge_heads(out))


class ImageGuidance(ClassifierFreeGuidance):
    """Classifier-free guidance as IP-Adapter's official pipeline (IPAdapter.generate): the negative
    branch gets the negative prompt and a zero image embedding (through image_proj, as training's
    dropped image), the positive branch the prompt and the reference's, in one batched call:
        out = eps(x, negative, 0) + scale * (eps(x, prompt, e) - eps(x, negative, 0))
    `scale` <= 1 runs the positive branch alone. `model(x, t, context, drop_image)` is
    `IPAdapterUNet.denoiser`'s, drop_image (B,) bool: True = the zero embedding."""

    drop = None  # (2B,) the first half (the negative branch) drops the image; made at the first step

    def __call__(self, x: torch.Tensor, t: torch.Tensor, negative: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.scale <= 1.0:
            return self.model(x, t, context)
        b = x.shape[0]
        if self.drop is None or self.drop.shape[0] != 2 * b:
            self.drop = torch.arange(2 * b, device=x.device) < b
        uncond, cond = self.model(torch.cat([x] * 2), t, torch.cat([negative, context]),
                                  drop_image=self.drop).chunk(2)
        return uncond + self.scale * (cond - uncond)


# -- CLIP preprocessing of training pixels ----------------------------------------------------------

def clip_pixels(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> CLIP's input (N, 3, size, size) float32: shortest side to `size`
    (bicubic, antialiased), centre crop, clamp to [0, 1] (as uint8 pixels would be), CLIP mean / std.
    clip.preprocess as a tensor op, for batches already on the device."""
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (N, 3, H, W) in [-1, 1], got {tuple(pixels.shape)}")
    x = (pixels.float() + 1) / 2
    h, w = x.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    new_hw = (size, new_long) if h <= w else (new_long, size)
    if new_hw != (h, w):
        x = F.interpolate(x, size=new_hw, mode="bicubic", antialias=True, align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[:, :, top:top + size, left:left + size].clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _image_size(encoder: nn.Module) -> int:
    """The input size of an image encoder: `config.image_size` (ours and transformers'), else `image_size`."""
    size = getattr(getattr(encoder, "config", None), "image_size", None) or getattr(encoder, "image_size", None)
    if not isinstance(size, int):
        raise ValueError(f"cannot tell the input size of the image encoder {type(encoder).__name__} (it has neither "
                         f"config.image_size nor image_size)")
    return size


# -- the conditioning model -------------------------------------------------------------------------

class IPAdapterUNet(ReferenceUNet):
    """The SD U-Net with an IP-Adapter: `forward(x, timesteps, context, image_embeds, scale=1.0) -> eps`,
    image_embeds (B, image_embed_dim) the projected CLIP image embedding of each sample's reference.

    `image_encoder` (optional; a clip.CLIPVisionModelWithProjection, pixel_values -> (B, D)) turns
    reference pixels into those embeddings (`encode_references`, `denoiser`). It is frozen, moves with
    the model and is no part of its checkpoints. The default lock, "decoder", trains the adapter alone
    with SD frozen, as the official training; "none" also trains SD's decoder; LockB does not apply."""

    method, title, prefix, config_class = "ip-adapter", "IP-Adapter", "ip_adapter.", IPAdapterConfig
    references, needs_image_encoder, image_scale = 1, True, True
    locks = ("none", "decoder")  # no encoder of its own for LockB to freeze
    # As the official tutorial_train.py: one reference, SD and the image encoder frozen, and its own
    # dropout of image, text or both (`training_inputs`), so no prompt dropout by the loader; no face
    # loss (Sec. 3.1 trains the baselines "without extra training tricks"). Its optimisation as the
    # script (the learning rate stays the preset's, one for all methods, Supp. A.3): AdamW(lr,
    # weight_decay=1e-2) with torch's eps 1e-8, no scheduler (constant), no warm-up, no gradient clipping.
    training_defaults = dict(refs=references, lock="decoder", prompt_drop=0.0, face_weight=0.0,
                             schedule="constant", warmup=0, clip_grad=0.0, weight_decay=1e-2, adam_eps=1e-8)
    drops = (0.05, 0.05, 0.05)  # probabilities of dropping the image alone, the text alone, both

    def __init__(self, unet: UNet, image_embed_dim: int = 768, num_tokens: int = 4, lock: str = "decoder",
                 train_base: bool = False, image_encoder: nn.Module | None = None):
        super().__init__(unet, IPAdapterConfig(image_embed_dim, num_tokens))
        self.adapter = self._like_unet(IPAdapter(unet.config, image_embed_dim, num_tokens))
        blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
        if len(self.adapter.layers) != len(blocks):
            raise ValueError(f"the U-Net has {len(blocks)} transformer blocks, its config "
                             f"describes {len(self.adapter.layers)}")
        # As the official tutorial_train.py: each to_k_ip / to_v_ip starts as a copy of its layer's
        # text to_k / to_v, so the image tokens are first read the way text tokens are.
        with torch.no_grad():
            for layer, block in zip(self.adapter.layers, blocks):
                layer.to_k_ip.weight.copy_(block.attn2.to_k.weight)
                layer.to_v_ip.weight.copy_(block.attn2.to_v.weight)
        # The image attention goes into the U-Net itself. A U-Net that already has it (another
        # IP-Adapter around the same U-Net) keeps it: the layers hold no adapter weights, each
        # call brings its own, so every IP-Adapter around one U-Net stays independent.
        for i, block in enumerate(blocks):
            if not isinstance(block.attn2, DecoupledCrossAttention):
                block.attn2 = DecoupledCrossAttention(block.attn2, i)
        self.image_encoder = None
        self.attach_image_encoder(image_encoder)
        self.set_lock(lock, train_base)

    @property
    def added(self) -> IPAdapter:
        return self.adapter

    def attach_image_encoder(self, encoder: nn.Module | None) -> None:
        """Use `encoder` (frozen, in eval mode) for `encode_references`; None detaches it."""
        if encoder is not None:
            encoder.requires_grad_(False).eval()
        self.image_encoder = encoder

    def set_lock(self, lock: str, train_base: bool = False) -> None:
        if lock == "both":
            self.lockb_frozen()
        super().set_lock(lock, train_base)

    def lockb_frozen(self) -> list[nn.Module]:
        raise ValueError("LockB does not apply to IP-Adapter: it has no encoder of its own to freeze "
                         "(use lock 'decoder' or 'none')")

    def frozen_parts(self) -> list[nn.Module]:
        """SD's frozen parts under the lock, and the image encoder (never trained)."""
        return super().frozen_parts() + ([self.image_encoder] if self.image_encoder is not None else [])

    def train(self, mode: bool = True):
        super().train(mode)
        if self.image_encoder is not None:
            self.image_encoder.eval()
        return self

    def forward(self, x, timesteps, context, image_embeds, scale: float = 1.0):
        """With scale 0 the adapter is skipped: plain SD, exactly. Otherwise the U-Net runs on a
        DecoupledContext; gradients reach the adapter through its (frozen) cross-attention layers."""
        b, d = x.shape[0], self.config.image_embed_dim
        if image_embeds.dim() != 2 or tuple(image_embeds.shape) != (b, d):
            raise ValueError(f"image_embeds must be ({b}, {d}), got {tuple(image_embeds.shape)}")
        unet = self.unet
        if scale == 0:
            return unet(x, timesteps, context)
        unet.check_inputs(x, context)
        context = DecoupledContext(context, self.adapter(image_embeds), scale)
        emb = unet.embed_time(timesteps, b, x.dtype)
        skips, middle = unet.encode(x, emb, context)
        return unet.decode(skips, middle, emb, context)

    # -- references -------------------------------------------------------------------------------
    def encode_references(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, H, W) in [-1, 1] (as the training loader gives them) -> the image encoder's
        projected embeddings (N, image_embed_dim), without gradients."""
        enc = self.image_encoder
        if enc is None:
            raise ValueError("the IP-Adapter has no image encoder: build or load it with image_encoder=... "
                             "(e.g. clip.load_image_encoder(...)) to encode reference images")
        p = next(enc.parameters())
        with torch.no_grad():
            out = enc(clip_pixels(pixels, _image_size(enc)).to(p.device, p.dtype))
        out = getattr(out, "image_embeds", out)  # transformers' output object, or a tensor
        if out.dim() != 2 or out.shape[1] != self.config.image_embed_dim:
            raise ValueError(f"the image encoder gives {tuple(out.shape)}, the IP-Adapter takes "
                             f"(N, {self.config.image_embed_dim})")
        return out

    @classmethod
    def build(cls, unet: UNet, options: MethodOptions) -> "IPAdapterUNet":
        encoder = options.image_encoder
        if encoder is None:
            raise ValueError("the IP-Adapter is built with its image encoder (MethodOptions.image_encoder)")
        return cls(unet, image_embed_dim=encoder.config.projection_dim, lock=options.lock,
                   train_base=options.train_base, image_encoder=encoder)

    @classmethod
    def option_problems(cls, args) -> list[str]:
        problems = super().option_problems(args)
        if args.lock == "both":
            problems.append("--lock both (LockB) freezes an encoder the IP-Adapter does not have; use none or decoder")
        if "prompt_drop" in args.explicit:
            problems.append("--prompt-drop: the IP-Adapter drops the text, the image or both with probability 0.05 "
                            "each, as its official training; it takes no --prompt-drop")
        if args.preset != "tiny" and not args.image_encoder:
            problems.append(f"--method ip-adapter with --preset {args.preset} needs --image-encoder (CLIP vision "
                            f"weights: the official image_encoder/ folder or openai/clip-vit-large-patch14)")
        if args.preset == "tiny" and args.image_encoder:
            problems.append("--preset tiny takes its image encoder from its stack's CLIP: --image-encoder belongs to "
                            "the sd15 presets")
        if args.image_encoder and not Path(args.image_encoder).exists():
            problems.append(f"--image-encoder {args.image_encoder}: no such file or folder")
        return problems

    @classmethod
    def official_key_map(cls, cfg: UNetConfig) -> dict[str, str]:
        return official_key_map(cfg)

    # -- training ---------------------------------------------------------------------------------
    def training_inputs(self, sd, text, batch: dict, gens: list, u, ref_drop: float) -> dict:
        """The one reference's CLIP image embedding (frozen encoder). As IP-Adapter's official training
        script: with probability 0.05 each, the image embedding is zeroed, the text emptied, or both."""
        p_image, p_text, p_both = self.drops
        drop_image = (u < p_image) | ((u >= p_image + p_text) & (u < p_image + p_text + p_both))
        drop_text = (u >= p_image) & (u < p_image + p_text + p_both)
        # The empty prompt's embedding where the text is dropped, chosen on the device (no host sync).
        context = torch.where(drop_text[:, None, None], text([""]), text(batch["prompt"]))
        embeds = self.encode_references(batch["refs"][:, 0].to(sd.device, non_blocking=True))
        return dict(context=context, image_embeds=embeds * (~drop_image).to(embeds.dtype)[:, None])

    # -- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def denoiser(self, sd, references: list[Image.Image], concepts: list[str], *, ref_size: int, height: int,
                 width: int, scale: float = 1.0):
        """`(x, t, context, drop_image=None) -> eps` with the one reference's embedding (fitted and
        padded to `ref_size` as the training loader does, then CLIP-encoded once) for every sample of
        the batch; a zero embedding instead where `drop_image` (B,) is True (`guided_predictor`)."""
        if len(references) != 1:
            raise ValueError(f"the IP-Adapter baseline takes one reference image, got {len(references)}")
        pixels = fit_and_pad(references[0], ref_size)[0][None].to(sd.device)
        embeds = self.encode_references(pixels).to(sd.device, sd.dtype)  # (1, D)

        def eps(x, t, context, drop_image=None):
            e = embeds.expand(x.shape[0], -1)
            if drop_image is not None:
                e = torch.where(drop_image[:, None], torch.zeros_like(e), e)
            return self(x, t, context, e, scale)
        return eps

    def guided_predictor(self, denoiser, guidance: float) -> ImageGuidance:
        """As the official pipeline: the negative branch without the reference (`ImageGuidance`)."""
        return ImageGuidance(denoiser, guidance)

    # -- files ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, unet: UNet, lock: str = "decoder",
             image_encoder: nn.Module | None = None) -> "IPAdapterUNet":
        """A file written by `save` (its own lock), or an official IP-Adapter file (which takes `lock`)."""
        if METADATA_KEY in file_metadata(path):
            model = super().load(path, unet)
            model.attach_image_encoder(image_encoder)
            return model
        return cls.load_official(path, unet, lock, image_encoder)

    @classmethod
    def load_official(cls, path: str | Path, unet: UNet, lock: str = "decoder",
                      image_encoder: nn.Module | None = None) -> "IPAdapterUNet":
        """An official IP-Adapter file, strictly: every key of `official_key_map`, nothing else, each
        of the shape the model has; errors name the file and the official keys."""
        header = read_header(path)
        if not is_official_file(header):
            raise CheckpointError(f"{path}: not an IP-Adapter file (no 'image_proj.' and 'ip_adapter.<n>.' keys, "
                                  f"no '{METADATA_KEY}' metadata); first keys: {', '.join(list(header)[:3])}")
        config = official_config(header, path, unet.config.context_dim)
        model = cls(unet, config.image_embed_dim, config.num_tokens, lock=lock, image_encoder=image_encoder)
        table = official_key_map(unet.config)
        own = model.adapter.state_dict()
        missing = [k for k in table if k not in header]
        unexpected = [k for k in header if k not in table]
        shapes = [f"{k} (file {tuple(header[k]['shape'])}, model {tuple(own[table[k]].shape)})"
                  for k in table if k in header and tuple(header[k]["shape"]) != tuple(own[table[k]].shape)]
        if missing or unexpected or shapes:
            problems = [f"{len(v)} {what}: {_first(v)}" for what, v in
                        (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches (made for another base U-Net?)", shapes)) if v]
            raise CheckpointError(f"{path}: official IP-Adapter file does not fit this U-Net "
                                  f"({len(model.adapter.layers)} cross-attention layers): " + "; ".join(problems))
        p = next(unet.parameters())
        state = read_tensors(path, list(table), rename=table.__getitem__, device=p.device, dtype=p.dtype)
        model.adapter.load_state_dict(state, strict=True)
        return model


def _first(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_ip_adapter(path: str | Path, unet: UNet, image_encoder: nn.Module | None = None) -> IPAdapterUNet:
    """An IP-Adapter around `unet` from our file or an official one (`ip-adapter_sd15.safetensors`)."""
    return IPAdapterUNet.load(path, unet, image_encoder=image_encoder)
