"""The project's one attention function.

Every attention layer (CLIP's text and vision towers, the U-Net, the VAE and RetriNet) calls
`attention`, so there is one place where precision, masking and memory are decided:

* torch's `scaled_dot_product_attention` does the work, so under fp16 / bf16 the fused flash and
  memory-efficient kernels run and, on the CPU, the fused flash kernel handles causal masks;
* `upcast=True` computes in float32 and casts back, for numerically delicate layers;
* `key_padding_mask` (B, Lk) bool, True = attend, hides padded keys;
* `chunk_size` splits the queries so that the score matrix never exceeds chunk_size x Lk per head.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              key_padding_mask: torch.Tensor | None = None, causal: bool = False,
              upcast: bool = False, chunk_size: int | None = None,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q (B, H, Lq, D), k and v (B, H, Lk, D) -> (B, H, Lq, D).

    `scale` defaults to D**-0.5. `causal` lets query i see keys 0..i (aligned at the start, as in a
    decoder-only text encoder). A query row whose keys are all masked returns NaN, as in SDPA.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects (B, H, L, D) tensors, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    out_dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()

    b, _, lq, _ = q.shape
    lk = k.shape[2]
    mask = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, lk) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a bool tensor of shape {(b, lk)}, got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk), broadcast over heads and queries

    if chunk_size is None or chunk_size >= lq:
        out = _sdpa(q, k, v, mask, causal, 0, scale)
    else:
        out = torch.cat([_sdpa(q[:, :, s:s + chunk_size], k, v, mask, causal, s, scale)
                         for s in range(0, lq, chunk_size)], dim=2)
    return out.to(out_dtype)


def _sdpa(q, k, v, mask, causal: bool, q_offset: int, scale):
    if causal and mask is None and q_offset == 0 and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if causal:
        qi = torch.arange(q_offset, q_offset + q.shape[2], device=q.device)[:, None]
        ki = torch.arange(k.shape[2], device=q.device)[None, :]
        mask = (ki <= qi) if mask is None else (mask & (ki <= qi))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads * D) -> (B, heads, L, D), the layout `attention` takes (a view, no copy)."""
    return rearrange(x, "b l (h d) -> b h l d", h=heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, D) -> (B, L, heads * D), the inverse of `split_heads`."""
    return rearrange(x, "b h l d -> b l (h d)")


def set_attention_options(module: nn.Module, *, upcast: bool | None = None,
                          chunk_size: int | None | str = "keep") -> None:
    """Set fp32 upcast and/or query chunk size (None = no chunking; "keep" = unchanged) on every
    attention layer inside `module` (the layers that carry `upcast` and `chunk_size` attributes)."""
    for m in module.modules():
        if hasattr(m, "upcast") and hasattr(m, "chunk_size"):
            if upcast is not None:
                m.upcast = upcast
            if chunk_size != "keep":
                m.chunk_size = chunk_size


def project_tokens(layer: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Apply a 1x1 conv or a linear layer to (B, N, C) tokens. A 1x1 conv is a linear map of each
    pixel's channels, so checkpoints that store attention projections as 1x1 convs (SD 1.x's
    transformer proj_in/out, the VAE's q/k/v) run as one matmul on the tokens, with no layout copies
    (and, on the CPU, without torch's slow path for convs on non-contiguous input)."""
    if isinstance(layer, nn.Conv2d):
        return F.linear(tokens, layer.weight.flatten(1), layer.bias)
    return layer(tokens)
