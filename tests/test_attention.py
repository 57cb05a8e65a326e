"""The one attention function: agrees with explicit softmax attention in every mode."""
import pytest
import torch

from common.attention import attention
from helpers import rel_err


def _reference(q, k, v, key_padding_mask=None, causal=False):
    scores = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    allowed = torch.ones(scores.shape[-2:], dtype=torch.bool)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed.expand(scores.shape).clone()
    if key_padding_mask is not None:
        allowed &= key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v.double()).float()


def _qkv(b=3, h=5, lq=37, lk=37, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g), torch.randn(b, h, lk, d, generator=g),
            torch.randn(b, h, lk, d, generator=g))


@pytest.mark.parametrize("chunk", [None, 1, 8, 36, 37, 100])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_modes_agree_with_reference(chunk, causal, masked):
    q, k, v = _qkv()
    mask = None
    if masked:  # variable key lengths per sample; key 0 always kept so no row is empty
        mask = torch.arange(37)[None] < torch.tensor([37, 20, 5])[:, None]
    got = attention(q, k, v, key_padding_mask=mask, causal=causal, chunk_size=chunk)
    assert rel_err(got, _reference(q, k, v, mask, causal)) <= 1e-5


def test_cross_attention_lengths_and_chunks():
    q, k, v = _qkv(lq=50, lk=13, seed=1)
    mask = torch.arange(13)[None] < torch.tensor([13, 1, 7])[:, None]
    ref = _reference(q, k, v, mask)
    assert rel_err(attention(q, k, v, key_padding_mask=mask), ref) <= 1e-5
    assert rel_err(attention(q, k, v, key_padding_mask=mask, chunk_size=7), ref) <= 1e-5


def test_upcast_keeps_dtype_and_is_more_accurate():
    q, k, v = (t.to(torch.bfloat16) * 4 for t in _qkv(seed=2))
    ref = _reference(q.float(), k.float(), v.float())
    up = attention(q, k, v, upcast=True)
    plain = attention(q, k, v)
    assert up.dtype == plain.dtype == torch.bfloat16
    assert rel_err(up.float(), ref) <= 1e-2
    assert rel_err(up.float(), ref) <= rel_err(plain.float(), ref) + 1e-6


def test_bad_mask_is_rejected():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor of shape"):
        attention(q, k, v, key_padding_mask=torch.ones(3, 36, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        attention(q, k, v, key_padding_mask=torch.ones(3, 37))
    with pytest.raises(ValueError, match=r"\(B, H, L, D\)"):
        attention(q[0], k[0], v[0])
