"""The paper's metrics on feature tensors: CLIP-I, CLIP-T, the VQA score and SWD (Sec. 3.1, Sec. 4,
Supp. A.2).

Every function takes features already computed (see eval.embed) and returns one value per
generation; averaging over generations, and which generations take part, is the caller's business.

* CLIP-I_i = mean over the references k of generation i of cos(image_i, ref_ik)
* CLIP-T_i = cos(image_i, prompt_i)
* VQA_i    = mean over references k and questions q of 1 - cos(answer(image_i, q), answer(ref_ik, q)),
             the answers embedded with CLIP's text tower (a cosine *distance*: higher = more diverse)
* SWD(sim, div) = (1/N) sum_i sim_i div_i  <=  sqrt(mean(sim^2) mean(div^2))   (Eq. 1, Eq. 2)

Cosines are raw (no x100, no clamping) and computed in float32 whatever the features' dtype.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dimension (broadcasting), in float32."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None, dim: int) -> torch.Tensor:
    if mask is None:
        return x.mean(dim)
    mask = mask.to(x.dtype)
    count = mask.sum(dim)
    if (count == 0).any():
        raise ValueError("a generation has no valid reference (all of its mask is False)")
    return (x * mask).sum(dim) / count


@torch.inference_mode()
def clip_i(images: torch.Tensor, refs: torch.Tensor, ref_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP-I per generation: images (N, D), refs (N, K, D) [, ref_mask (N, K) bool] -> (N,).

    The cosine of each generated image with each of its references, averaged over the references
    (those where `ref_mask` is True; generations may have different numbers of references)."""
    if images.dim() != 2 or refs.dim() != 3 or refs.shape[0] != images.shape[0]:
        raise ValueError(f"expected images (N, D) and refs (N, K, D), got {tuple(images.shape)} and "
                         f"{tuple(refs.shape)}")
    return _masked_mean(cosine(images[:, None], refs), ref_mask, dim=1)


@torch.inference_mode()
def clip_t(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """CLIP-T per generation: images (N, D), prompt features texts (N, D) -> (N,)."""
    if images.shape != texts.shape or images.dim() != 2:
        raise ValueError(f"expected images and texts both (N, D), got {tuple(images.shape)} and {tuple(texts.shape)}")
    return cosine(images, texts)


@torch.inference_mode()
def vqa_score(answers: torch.Tensor, ref_answers: torch.Tensor, ref_mask: torch.Tensor | None = None
              ) -> torch.Tensor:
    """VQA score per generation (Supp. A.2): answers (N, Q, D), the text features of the generated
    image's answers to Q questions; ref_answers (N, K, Q, D), the same questions answered for each
    reference [, ref_mask (N, K)] -> (N,), the cosine distance averaged over questions and references."""
    if answers.dim() != 3 or ref_answers.dim() != 4 or ref_answers.shape[0] != answers.shape[0] \
            or ref_answers.shape[2:] != answers.shape[1:]:
        raise ValueError(f"expected answers (N, Q, D) and ref_answers (N, K, Q, D), got {tuple(answers.shape)} "
                         f"and {tuple(ref_answers.shape)}")
    distance = 1 - cosine(answers[:, None], ref_answers).mean(-1)   # (N, K): averaged over questions
    return _masked_mean(distance, ref_mask, dim=1)


class SWD(NamedTuple):
    value: float   # mean of sim_i * div_i
    bound: float   # sqrt(mean(sim^2) * mean(div^2)), Cauchy–Schwarz (Eq. 2)


def swd(sim: torch.Tensor, div: torch.Tensor) -> SWD:
    """Similarity Weighted Diversity (Sec. 4, Eq. 1) of N generations and its Cauchy–Schwarz bound.

    The value reaches the bound exactly when div is proportional to sim, i.e. when every
    generation strikes the same balance; a model whose generations split into "copies the
    reference" and "follows the text" scores lower than a balanced one with the same means."""
    sim = torch.as_tensor(sim, dtype=torch.float64).flatten()
    div = torch.as_tensor(div, dtype=torch.float64).flatten()
    if sim.shape != div.shape:
        raise ValueError(f"sim and div must have the same number of generations, got {sim.numel()} and {div.numel()}")
    if sim.numel() == 0:
        raise ValueError("SWD of no generations")
    if not (torch.isfinite(sim).all() and torch.isfinite(div).all()):
        raise ValueError("SWD of non-finite values")
    value = (sim * div).mean().item()
    bound = math.sqrt((sim ** 2).mean().item() * (div ** 2).mean().item())
    return SWD(value, bound)
