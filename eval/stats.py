"""Significance of a paired difference: is B above A more often than luck would have it?

Used for the leakage benchmark's claims (experiments/leakage.py): every sample of setting -a has a
twin in -b (same seed, identity, prompt, references and initial noise), so a claim such as "-b follows
the prompt better than -a" is a one-sided test on the twins' differences. Runs of several training
seeds are pooled: each seed contributes its pairs, and the test flips signs within pairs only.
"""
from __future__ import annotations

import numpy as np


def paired_permutation_p(differences, draws: int = 20000, seed: int = 0) -> float:
    """One-sided p-value that the mean of `differences` (B - A per pair) is above 0 by chance.

    The null hypothesis: A and B are exchangeable within each pair, so each difference is as likely
    negative as positive. The statistic is the mean difference; its null distribution comes from
    `draws` random sign flips (seeded), and p = (1 + flips at least as large) / (1 + draws), never 0.
    Pairs with a zero difference carry no information and change nothing. Binary outcomes (0 / 1)
    make this McNemar's test on the discordant pairs."""
    d = np.asarray(differences, dtype=np.float64).ravel()
    if d.size == 0 or not np.all(np.isfinite(d)):
        raise ValueError(f"need finite paired differences, got {d.size} values")
    observed = d.mean()
    rng = np.random.default_rng(seed)
    hits, done = 0, 0
    while done < draws:   # in chunks: draws x pairs signs at once would be large for big samples
        n = min(2048, draws - done)
        signs = rng.integers(0, 2, size=(n, d.size), dtype=np.int8) * 2 - 1
        hits += int(((signs * d).mean(axis=1) >= observed - 1e-12).sum())
        done += n
    return (1 + hits) / (1 + draws)


def verdict(p_claimed: float, p_opposite: float, alpha: float = 0.05) -> str:
    """"reproduced" when the claimed direction is significant at `alpha`, "reversed" when the
    opposite one is, else "not shown"."""
    if p_claimed < alpha:
        return "reproduced"
    if p_opposite < alpha:
        return "reversed"
    return "not shown"
