"""eval.stats: the paired permutation test of the leakage benchmark's claims, against the exact
distribution over every sign flip, and its verdicts."""
import itertools

import numpy as np
import pytest

from eval.stats import paired_permutation_p, verdict


def exact_p(d):
    """The exact one-sided p over all 2^n sign flips (the oracle; small n only)."""
    d = np.asarray(d, float)
    stats = [np.mean(np.array(signs) * d) for signs in itertools.product((-1, 1), repeat=d.size)]
    return np.mean([s >= d.mean() - 1e-12 for s in stats])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_exact_distribution(seed):
    rng = np.random.default_rng(seed)
    d = rng.normal(0.3, 1.0, size=11)
    assert paired_permutation_p(d, draws=40000, seed=seed) == pytest.approx(exact_p(d), abs=0.01)


def test_binary_outcomes_are_mcnemar():
    """0/1 outcomes: only discordant pairs count; 9 of 10 discordant pairs for B gives the exact
    binomial tail P(X >= 9 | 10, 1/2) = 11 / 1024."""
    a = np.array([0] * 9 + [1] + [1] * 20 + [0] * 20)
    b = np.array([1] * 9 + [0] + [1] * 20 + [0] * 20)
    assert paired_permutation_p(b - a, draws=100000) == pytest.approx(11 / 1024, abs=0.002)


def test_no_difference_and_the_opposite():
    assert paired_permutation_p(np.zeros(20)) == 1.0
    d = np.full(30, 0.5)
    assert paired_permutation_p(d) < 1e-3 and paired_permutation_p(-d) == 1.0


def test_refuses_empty_or_nan():
    for bad in ([], [0.1, float("nan")]):
        with pytest.raises(ValueError, match="finite paired differences"):
            paired_permutation_p(bad)


def test_verdicts():
    assert verdict(0.01, 0.99) == "reproduced"
    assert verdict(0.99, 0.01) == "reversed"
    assert verdict(0.2, 0.8) == "not shown"
