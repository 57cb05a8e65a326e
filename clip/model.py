"""CLIP text and image encoders (Radford et al. 2021), as used by Stable Diffusion v1.5.

Module attribute paths equal the keys of the official files (openai/clip-vit-large-patch14's
`model.safetensors`, SD's `text_encoder/model.safetensors`), so weights load strictly with no
mapping: `text_model.encoder.layers.3.self_attn.q_proj.weight`, `vision_model.pre_layrnorm.bias`
(sic), `text_projection.weight`, `logit_scale`.

Both towers are pre-LayerNorm transformers:
    x = x + attn(layer_norm1(x));  x = x + fc2(act(fc1(layer_norm2(x))))
The text tower is causal and ends in `final_layer_norm`: its last hidden state (B, 77, 768) is
what SD v1.5 conditions on. The pooled text feature is the hidden state at the EOS token; the pooled
image feature is the class token after `post_layernorm`. Projections map both to a shared space.

`CLIPVisionModelWithProjection` is the image tower and its projection alone: IP-Adapter's image
encoder (laion's ViT-H/14, `CLIPVisionConfig.vit_h14()`), whose projected pooled output conditions it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.attention import attention, merge_heads, split_heads
from common.weights import FieldError, check_fields


# transformers' own defaults, which its config.json files leave out when a value equals them.
_HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, layer_norm_eps=1e-5,
                         projection_dim=512, hidden_act="quick_gelu")
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32, layer_norm_eps=1e-5, projection_dim=512,
                           num_channels=3, hidden_act="quick_gelu")


# Bounds of the values a file may give (CLIPTextConfig.checked, CLIPVisionConfig.checked): generous; ViT-H/14:
# width 1280, 32 layers.
CLIP_LIMITS = dict(vocab_size=(1, 1_000_000), hidden_size=(1, 65536), intermediate_size=(1, 262144),
                   num_hidden_layers=(1, 128), num_attention_heads=(1, 1024), max_position_embeddings=(1, 65536),
                   layer_norm_eps=(0, 1), projection_dim=(1, 65536), image_size=(1, 65536), patch_size=(1, 65536),
                   num_channels=(1, 64))
ACTIVATIONS = ("quick_gelu", "gelu")


def _checked(cls, values, key: str) -> dict:
    """`values` (a transformers config dict read from a file) checked as `cls`'s fields; keys we do
    not read are left out. FieldError for the first that is not of its type or within CLIP_LIMITS."""
    values = check_fields(cls, values, key=key, limits=CLIP_LIMITS, choices={"hidden_act": ACTIVATIONS}, unknown=True)
    hidden, heads = values.get("hidden_size"), values.get("num_attention_heads")
    if hidden is not None and heads is not None and hidden % heads:
        raise FieldError(key + "num_attention_heads", heads, f"a divisor of hidden_size {hidden}")
    return values


def _from_hf(cls, d: dict, defaults: dict):
    """A config from a transformers config dict: its values over transformers' defaults; keys we do
    not use are ignored."""
    names = {f.name for f in fields(cls)}
    return cls(**{**defaults, **{k: v for k, v in d.items() if k in names}})


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    hidden_act: str = "quick_gelu"

    @classmethod
    def vit_l14(cls) -> "CLIPTextConfig":
        """Text tower of openai/clip-vit-large-patch14 = SD v1.5's text encoder."""
        return cls()

    @classmethod
    def from_hf(cls, d: dict) -> "CLIPTextConfig":
        """From a transformers CLIPTextConfig dict (`text_encoder/config.json` or `text_config`)."""
        return _from_hf(cls, d, _HF_TEXT_DEFAULTS)

    @classmethod
    def checked(cls, values, key: str = "") -> dict:
        """The fields of a transformers text config dict read from a file, type-checked and bounded
        (`_checked`); FieldError (keys prefixed by `key`) for the first that is not."""
        return _checked(cls, values, key)


@dataclass
class CLIPVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    num_channels: int = 3
    hidden_act: str = "quick_gelu"

    @classmethod
    def vit_l14(cls) -> "CLIPVisionConfig":
        """Image tower of openai/clip-vit-large-patch14."""
        return cls()

    @classmethod
    def vit_h14(cls) -> "CLIPVisionConfig":
        """laion's CLIP-ViT-H-14 image tower: the `image_encoder/` of the official IP-Adapter release
        for SD v1.5. Unlike OpenAI's ViT-L/14 it uses exact (erf) GELU."""
        return cls(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                   image_size=224, patch_size=14, layer_norm_eps=1e-5, projection_dim=1024, num_channels=3,
                   hidden_act="gelu")

    @classmethod
    def from_hf(cls, d: dict) -> "CLIPVisionConfig":
        """From a transformers CLIPVisionConfig dict (`vision_config` of a CLIPModel config.json)."""
        return _from_hf(cls, d, _HF_VISION_DEFAULTS)

    @classmethod
    def checked(cls, values, key: str = "") -> dict:
        """The fields of a transformers vision config dict read from a file, type-checked and bounded
        (`_checked`); FieldError (keys prefixed by `key`) for the first that is not."""
        return _checked(cls, values, key)


def _activation(name: str):
    if name == "quick_gelu":  # OpenAI's sigmoid approximation of GELU
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unsupported hidden_act {name!r}; expected 'quick_gelu' or 'gelu'")


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_attention_heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, causal: bool = False, key_padding_mask=None):
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
        return self.out_proj(merge_heads(out))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.act_name = act
        self.act = _activation(act)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        if self.act_name != "quick_gelu":
            return self.fc2(self.act(self.fc1(x)))
        # quick_gelu(h) = h * sigmoid(1.702 h) = silu(1.702 h) / 1.702. Both scalings ride on the
        # matmuls (addmm's alpha and beta), so the activation is one pass over the widest tensor
        # instead of three: on the CPU that pass is memory-bound and costs as much as a matmul.
        k = 1.702
        h = torch.addmm(self.fc1.bias, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(), beta=k, alpha=k)
        out = torch.addmm(self.fc2.bias, F.silu(h, inplace=True), self.fc2.weight.t(), alpha=1 / k)
        return out.view(*x.shape[:-1], out.shape[-1])


class CLIPEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float, act: str):
        super().__init__()
        self.self_attn = CLIPAttention(dim, heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(dim, hidden, act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, causal: bool = False, key_padding_mask=None):
        x = x + self.self_attn(self.layer_norm1(x), causal, key_padding_mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(
            CLIPEncoderLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
                             cfg.layer_norm_eps, cfg.hidden_act)
            for _ in range(cfg.num_hidden_layers))

    def forward(self, x, causal: bool = False, key_padding_mask=None):
        for layer in self.layers:
            x = layer(x, causal, key_padding_mask)
        return x


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.max_length = cfg.max_position_embeddings

    def forward(self, input_ids, attention_mask=None):
        """input_ids (B, L) -> last hidden state after final_layer_norm (B, L, hidden)."""
        if input_ids.dim() != 2 or not 0 < input_ids.shape[1] <= self.max_length:
            raise ValueError(f"input_ids must have shape (B, L) with 1 <= L <= {self.max_length}, "
                             f"got {tuple(input_ids.shape)}")
        x = self.embeddings(input_ids)
        mask = None if attention_mask is None else attention_mask.bool()
        return self.final_layer_norm(self.encoder(x, causal=True, key_padding_mask=mask))

    @staticmethod
    def pool(hidden, input_ids):
        """Hidden state at the first EOS token. EOS has the largest id in CLIP's vocabulary, so its
        position is argmax(input_ids), as in openai/CLIP."""
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), input_ids.argmax(dim=-1)]


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.image_size = cfg.image_size
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.randn(d) * d ** -0.5)
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(self.num_patches + 1, d)

    def forward(self, pixel_values):
        b = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.to(patches.dtype).expand(b, 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # (sic: the official key)
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.in_shape = (cfg.num_channels, cfg.image_size, cfg.image_size)

    def forward(self, pixel_values):
        """pixel_values (B, 3, S, S), CLIP-normalised -> last hidden state (B, 1 + patches, hidden)."""
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != self.in_shape:
            raise ValueError(f"pixel_values must have shape (B, {', '.join(map(str, self.in_shape))}), got "
                             f"{tuple(pixel_values.shape)}; use clip.preprocess() to resize and crop")
        return self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))

    def pool(self, hidden):
        """The class token after post_layernorm."""
        return self.post_layernorm(hidden[:, 0])

    def embed(self, pixel_values, projection: nn.Linear):
        """`projection` of the pooled image feature: CLIP's image embedding (B, projection_dim)."""
        return projection(self.pool(self(pixel_values)))


class CLIPTextModel(nn.Module):
    """SD v1.5's text encoder: `forward(input_ids) -> (B, L, hidden)` after the final layer norm."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, input_ids, attention_mask=None):
        return self.text_model(input_ids, attention_mask)


class CLIPVisionModel(nn.Module):
    """The image tower alone: `forward(pixel_values) -> last hidden state`, `pooled(...) -> (B, hidden)`."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = CLIPVisionTransformer(cfg)

    def forward(self, pixel_values):
        return self.vision_model(pixel_values)

    def pooled(self, pixel_values):
        return self.vision_model.pool(self.vision_model(pixel_values))


class CLIPVisionModelWithProjection(nn.Module):
    """The image tower and its projection, as transformers' CLIPVisionModelWithProjection (IP-Adapter's
    `image_encoder/`; keys `vision_model.*`, `visual_projection.weight`):
    `forward(pixel_values) -> image_embeds (B, projection_dim)`, un-normalised."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = CLIPVisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, pixel_values):
        return self.vision_model.embed(pixel_values, self.visual_projection)


class CLIPModel(nn.Module):
    """Both towers and their projections into the joint embedding space."""

    def __init__(self, text_cfg: CLIPTextConfig, vision_cfg: CLIPVisionConfig):
        super().__init__()
        if text_cfg.projection_dim != vision_cfg.projection_dim:
            raise ValueError(f"text projection_dim {text_cfg.projection_dim} != vision projection_dim "
                             f"{vision_cfg.projection_dim}")
        self.text_config, self.vision_config = text_cfg, vision_cfg
        self.text_model = CLIPTextTransformer(text_cfg)
        self.vision_model = CLIPVisionTransformer(vision_cfg)
        self.text_projection = nn.Linear(text_cfg.hidden_size, text_cfg.projection_dim, bias=False)
        self.visual_projection = nn.Linear(vision_cfg.hidden_size, vision_cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, input_ids, attention_mask=None):
        """Projected, un-normalised text features (B, projection_dim)."""
        hidden = self.text_model(input_ids, attention_mask)
        return self.text_projection(self.text_model.pool(hidden, input_ids))

    def encode_image(self, pixel_values):
        """Projected, un-normalised image features (B, projection_dim)."""
        return self.vision_model.embed(pixel_values, self.visual_projection)

    def forward(self, input_ids, pixel_values):
        """logits_per_image (B_img, B_text) = exp(logit_scale) * cosine similarity."""
        t = F.normalize(self.encode_text(input_ids), dim=-1)
        i = F.normalize(self.encode_image(pixel_values), dim=-1)
        return self.logit_scale.exp() * i @ t.T
