"""Seeded Gumbel-top-k selection: its law (Plackett-Luce / softmax), limits, strata, threads."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tsqlora_ext import _C

# Chi-square quantiles at 1 - 1e-3 (fixed seeds make the test deterministic; the tolerance is the
# 99.9% acceptance region of a correct sampler, not a tuned number).
CHI2_999 = {4: 18.467, 9: 27.877, 19: 43.820}


def _chi2(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


def test_first_pick_follows_the_softmax():
    q = np.array([0.3, -1.0, 1.2, 0.0, 0.7])
    tau = 0.8
    p = np.exp(q / tau) / np.exp(q / tau).sum()
    trials = 20000
    counts = np.zeros(5)
    for seed in range(trials):
        counts[_C.gumbel_top_k(5, 1, q, None, None, tau, seed, False, 1)[0]] += 1
    assert _chi2(counts, trials * p) < CHI2_999[4]


def test_pairs_follow_plackett_luce():
    q = np.array([1.0, 0.2, -0.5, 0.6, 0.0])
    p = np.exp(q) / np.exp(q).sum()
    pairs = list(itertools.combinations(range(5), 2))
    prob = np.array([p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j]) for i, j in pairs])
    trials = 20000
    counts = np.zeros(len(pairs))
    for seed in range(trials):
        counts[pairs.index(tuple(_C.gumbel_top_k(5, 2, q, None, None, 1.0, seed, False, 1)))] += 1
    assert _chi2(counts, trials * prob) < CHI2_999[9]


def test_temperature_limits():
    q = np.random.default_rng(1).normal(size=1000)
    top = _C.gumbel_top_k(1000, 50, q, None, None, 0.0, 3, False, 2)
    np.testing.assert_array_equal(np.sort(top), np.sort(np.argsort(-q)[:50]))
    trials, counts = 4000, np.zeros(5)
    for seed in range(trials):
        counts[_C.gumbel_top_k(5, 1, q[:5], None, None, float("inf"), seed, False, 1)[0]] += 1
    assert _chi2(counts, np.full(5, trials / 5)) < CHI2_999[4]


def test_temperature_zero_draws_among_tied_scores():
    # Equal scores fell to the lowest row ids whatever the seed: with every score 0 (the default
    # 'uniform' preference) τ = 0 always kept the first k rows.
    picks = {tuple(_C.gumbel_top_k(20, 5, None, None, None, 0.0, seed, False, 1)) for seed in range(20)}
    assert len(picks) > 10 and (0, 1, 2, 3, 4) not in picks
    q = np.repeat([3.0, 2.0, 1.0], 10)  # ties within each level
    for seed in range(20):
        got = _C.gumbel_top_k(30, 15, q, None, None, 0.0, seed, False, 2)
        assert (q[got] == 3.0).sum() == 10 and (q[got] == 2.0).sum() == 5  # strict score order kept
        np.testing.assert_array_equal(got, _C.gumbel_top_k(30, 15, q, None, None, 0.0, seed, False, 1))
    labels = np.arange(30) % 3
    for seed in range(5):  # stratified quotas as before: 3 per class, the best score first
        got = _C.gumbel_top_k(30, 9, q, labels, None, 0.0, seed, True, 1)
        assert np.bincount(labels[got], minlength=3).tolist() == [3, 3, 3] and (q[got] == 3.0).all()
    counts = np.zeros(20)
    for seed in range(2000):
        counts[_C.gumbel_top_k(20, 1, None, None, None, 0.0, seed, False, 1)] += 1
    assert _chi2(counts, np.full(20, 100.0)) < CHI2_999[19]


def test_seeded_and_identical_for_any_thread_count():
    rng = np.random.default_rng(2)
    n = 200_000
    q = rng.normal(size=n)
    labels = rng.integers(0, 3, size=n)
    pool = (rng.random(n) > 0.1).astype(np.uint8)
    ref = _C.gumbel_top_k(n, 30_000, q, labels, pool, 1.0, 7, True, 1)
    for threads in (2, 5):
        np.testing.assert_array_equal(ref, _C.gumbel_top_k(n, 30_000, q, labels, pool, 1.0, 7, True, threads))
    assert not np.array_equal(ref, _C.gumbel_top_k(n, 30_000, q, labels, pool, 1.0, 8, True, 1))
    assert pool[ref].all()


def test_stratified_keeps_each_label_share():
    labels = np.array([0] * 700 + [1] * 200 + [2] * 100)
    q = np.zeros(1000)
    q[:700] = 5.0  # scores alone would take class 0 only
    chosen = _C.gumbel_top_k(1000, 101, q, labels, None, 0.5, 0, True, 2)
    # 101 * (0.7, 0.2, 0.1) = (70.7, 20.2, 10.1): largest remainder gives the extra slot to class 0.
    assert np.bincount(labels[chosen], minlength=3).tolist() == [71, 20, 10]


def test_selection_errors():
    with pytest.raises(ValueError, match="outside"):
        _C.gumbel_top_k(10, 11, None, None, None, 1.0, 0, False, 1)
    with pytest.raises(ValueError, match="not finite"):
        _C.gumbel_top_k(3, 1, np.array([0.0, np.nan, 1.0]), None, None, 1.0, 0, False, 1)
    with pytest.raises(ValueError, match="temperature"):
        _C.gumbel_top_k(3, 1, None, None, None, -1.0, 0, False, 1)


def test_a_tiny_temperature_is_top_k_with_seeded_ties():
    # Q/τ overflowed to inf for a tiny τ: every positive score tied and the lowest row ids won
    # (τ = 1e-307 picked rows 18-22 of scores 0..99); and equal scores ignored the seed once the
    # noise rounded away (τ = 1e-18: rows 0-4 for every seed).
    q = np.arange(100.0)
    for tau in (1e-3, 1e-307, 1e-310):
        np.testing.assert_array_equal(_C.gumbel_top_k(100, 5, q, None, None, tau, 0, False, 1),
                                      [95, 96, 97, 98, 99])
    flat = np.zeros(100)
    for seed in range(3):
        np.testing.assert_array_equal(_C.gumbel_top_k(100, 5, flat, None, None, 1e-18, seed, False, 1),
                                      _C.gumbel_top_k(100, 5, flat, None, None, 0.0, seed, False, 1))
    assert len({tuple(_C.gumbel_top_k(100, 5, flat, None, None, 1e-18, s, False, 1)) for s in range(3)}) == 3
