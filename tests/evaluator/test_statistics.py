"""Confidence intervals and paired comparisons: seeded and reproducible, and honest in simulation."""

from __future__ import annotations

import numpy as np

from services.evaluator.metrics import bootstrap_ci, paired_comparison


def test_the_bootstrap_is_seeded_and_reproducible() -> None:
    rng = np.random.default_rng(1)
    ap = rng.beta(2, 5, size=500)
    ap[::50] = np.nan  # queries without a relevant item are left out, not counted as 0
    first, again = bootstrap_ci(ap, seed=3), bootstrap_ci(ap, seed=3)
    assert first == again
    assert abs(first.estimate - np.nanmean(ap)) < 1e-12
    assert first.low < first.estimate < first.high
    other = bootstrap_ci(ap, seed=4)
    assert other.estimate == first.estimate and (other.low, other.high) != (first.low, first.high)
    # The width is what the central limit theorem says (2 x 1.96 standard errors), within 15 %.
    expected = 2 * 1.96 * np.nanstd(ap, ddof=1) / np.sqrt(np.sum(~np.isnan(ap)))
    assert abs((first.high - first.low) - expected) < 0.15 * expected


def test_the_interval_covers_the_truth_about_95_percent_of_the_time() -> None:
    """Per-query APs drawn from a Beta(2, 5) (true mean 2/7): the 95% interval must cover 2/7 in
    about 95% of 400 simulated evaluations of 200 queries."""
    rng = np.random.default_rng(7)
    truth = 2 / 7
    trials = 400
    covered = sum(_covers(rng.beta(2, 5, size=200), truth, seed=t) for t in range(trials))
    assert 0.92 <= covered / trials <= 0.98, covered / trials


def _covers(sample: np.ndarray, truth: float, seed: int) -> bool:
    ci = bootstrap_ci(sample, seed=seed, resamples=2000)
    return ci.low <= truth <= ci.high


def test_paired_comparison_finds_a_real_difference_and_not_a_false_one() -> None:
    rng = np.random.default_rng(11)
    difficulty = rng.beta(2, 3, size=1000)  # queries differ a lot; systems differ a little
    a = np.clip(difficulty + rng.normal(0, 0.03, 1000), 0, 1)
    b = np.clip(difficulty - 0.02 + rng.normal(0, 0.03, 1000), 0, 1)
    real = paired_comparison(a, b, seed=0)
    assert real.difference.low > 0 and real.p_value < 0.001 and real.n_queries == 1000
    assert abs(real.difference.estimate - float(np.mean(a - b))) < 1e-12
    # Pairing removes the queries' own spread: the interval is far narrower than two independent ones.
    assert real.difference.high - real.difference.low < 0.25 * (bootstrap_ci(a).high - bootstrap_ci(a).low)
    same = paired_comparison(a, a.copy(), seed=0)
    assert same.difference.estimate == 0 and same.p_value == 1.0
    assert paired_comparison(a, b, seed=0) == real  # seeded


def test_the_randomisation_test_is_calibrated_under_the_null() -> None:
    """When the two systems are exchangeable, p < 0.05 happens about 5% of the time."""
    rng = np.random.default_rng(5)
    rejections = 0
    trials = 200
    for t in range(trials):
        base = rng.beta(2, 3, size=150)
        noise = rng.normal(0, 0.05, size=(2, 150))
        rejections += paired_comparison(base + noise[0], base + noise[1], seed=t, resamples=1000).p_value < 0.05
    assert 0.02 <= rejections / trials <= 0.09, rejections / trials


def test_queries_missing_on_either_side_are_left_out() -> None:
    a = np.array([0.5, np.nan, 0.7, 0.9])
    b = np.array([0.4, 0.6, np.nan, 0.8])
    result = paired_comparison(a, b, seed=0)
    assert result.n_queries == 2 and abs(result.difference.estimate - 0.1) < 1e-12
