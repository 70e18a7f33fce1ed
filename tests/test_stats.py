"""Known identities of the statistics module: textbook values, hand computations, coverage.

Pure numpy; the whole file runs in a few seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from instruments import stats


# ----------------------------------------------------------------------------- proportions

@pytest.mark.parametrize(("k", "n", "low", "high"), [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score).
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_newcombe_table(k, n, low, high):
    est = stats.proportion_ci(k, n, alpha=0.05)
    assert est.value == pytest.approx(k / n)
    assert est.ci_low == pytest.approx(low, abs=5e-5)
    assert est.ci_high == pytest.approx(high, abs=5e-5)
    assert est.method == "wilson" and est.n == n


# ----------------------------------------------------------------------------- bootstrap

@pytest.mark.parametrize(("method", "draw"), [
    # BCa on a skewed distribution (exponential, mean 2): the case it is the default for.
    ("bca", lambda rng: rng.exponential(scale=2.0, size=40)),
    # The percentile interval undercovers skewed means at n=40 (~0.91), so it is checked on
    # symmetric data (normal, mean 2), where it should be close to nominal.
    ("percentile", lambda rng: rng.normal(loc=2.0, scale=1.5, size=40)),
])
def test_bootstrap_ci_of_mean_covers_true_mean(method, draw):
    rng = np.random.default_rng(123)
    covered = sum(stats.bootstrap_ci(draw(rng), n_boot=1000, seed=i, method=method).contains(2.0)
                  for i in range(200))
    assert 0.90 <= covered / 200 <= 0.99


def test_bootstrap_keeps_pairs_together():
    # x - y is the constant 0.7 for every item: any paired resample gives exactly 0.7, an
    # unpaired one would not. The CI collapsing to a point proves the pairing survives.
    rng = np.random.default_rng(0)
    y = rng.normal(size=30)
    est = stats.bootstrap_ci((y + 0.7, y), lambda a, b: (a - b).mean(-1), n_boot=500, seed=1)
    assert est.value == pytest.approx(0.7)
    assert est.ci_low == pytest.approx(0.7) and est.ci_high == pytest.approx(0.7)


def test_bootstrap_is_reproducible_and_seed_dependent():
    x = np.random.default_rng(5).normal(size=25)
    a = stats.bootstrap_ci(x, n_boot=1000, seed=3)
    assert a == stats.bootstrap_ci(x, n_boot=1000, seed=3)
    assert a != stats.bootstrap_ci(x, n_boot=1000, seed=4)


# ----------------------------------------------------------------------------- permutation test

def test_permutation_p_values_are_uniform_under_the_null():
    rng = np.random.default_rng(7)
    p = np.array([stats.paired_permutation_test(rng.normal(size=20), rng.normal(size=20), n_perm=2000,
                                                seed=i).p_value for i in range(200)])
    assert 0.01 <= np.mean(p < 0.05) <= 0.10
    assert 0.4 <= p.mean() <= 0.6
    assert sps.kstest(p, "uniform").pvalue > 0.01


def test_permutation_p_is_tiny_for_a_big_shift():
    rng = np.random.default_rng(8)
    x = rng.normal(size=40)
    result = stats.paired_permutation_test(x + 3.0, x + rng.normal(scale=0.5, size=40), n_perm=5000, seed=0)
    assert not result.exact
    assert result.p_value == pytest.approx(1 / 5001)  # nothing as extreme: the Monte Carlo floor
    assert result.difference.ci_low > 2.0


def test_exact_permutation_matches_hand_count():
    # Ten positive differences: of the 2**10 sign patterns only all-plus and all-minus are
    # as extreme as the observed mean, so the two-sided p is 2/1024 and one-sided 1/1024.
    x = np.arange(1.0, 11.0)
    y = np.zeros(10)
    two = stats.paired_permutation_test(x, y)
    assert two.exact and two.n_perm == 1024
    assert two.p_value == pytest.approx(2 / 1024)
    assert stats.paired_permutation_test(x, y, alternative="greater").p_value == pytest.approx(1 / 1024)
    assert stats.paired_permutation_test(x, y, alternative="less").p_value == pytest.approx(1.0)


# ----------------------------------------------------------------------------- McNemar

def test_mcnemar_exact_matches_binomial_by_hand():
    # b = 6 prompts refused only before, c = 1 refused only after; 2 refused both, 1 neither.
    before = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=bool)
    after = np.array([0, 0, 0, 0, 0, 0, 1, 1, 0, 1], dtype=bool)
    result = stats.mcnemar(before, after)
    assert result.table == ((2, 6), (1, 1))
    assert result.exact
    # two-sided exact binomial: 2 * P(X <= 1 | n=7, p=1/2) = 2 * (1 + 7) / 2**7
    assert result.p_value == pytest.approx(2 * (1 + 7) / 128)
    assert result.statistic == 1
    assert result.rate_before.value == pytest.approx(0.8) and result.rate_after.value == pytest.approx(0.3)
    assert result.difference.value == pytest.approx(-0.5)


def test_mcnemar_chi_square_with_many_discordant_pairs():
    before = np.array([True] * 30 + [False] * 10 + [True] * 5 + [False] * 5)
    after = np.array([False] * 30 + [True] * 10 + [True] * 5 + [False] * 5)
    result = stats.mcnemar(before, after)
    assert not result.exact
    chi2 = (abs(30 - 10) - 1) ** 2 / (30 + 10)  # continuity-corrected
    assert result.statistic == pytest.approx(chi2)
    assert result.p_value == pytest.approx(sps.chi2.sf(chi2, df=1))


def test_mcnemar_without_change_is_not_significant():
    flags = np.array([True, False, True, True])
    result = stats.mcnemar(flags, flags)
    assert result.p_value == 1.0 and result.difference.width == 0


# ----------------------------------------------------------------------------- multiple testing

def test_holm_and_bh_match_hand_adjustment():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04, then
    # running max -> 0.02, 0.03, 0.06, 0.06; back in input order:
    h = stats.holm(p, alpha=0.05)
    assert h.p_adjusted == pytest.approx((0.03, 0.06, 0.06, 0.02))
    assert h.reject == (True, False, False, True)
    # BH: sorted p * 4 / rank -> 0.02, 0.02, 0.04, 0.04, running min from the top (no change).
    bh = stats.benjamini_hochberg(p, alpha=0.05)
    assert bh.p_adjusted == pytest.approx((0.02, 0.04, 0.04, 0.02))
    assert bh.reject == (True, True, True, True)
    assert json.loads(json.dumps(bh.to_dict()))["method"] == "benjamini_hochberg"


def test_adjustment_rejects_invalid_p_values():
    with pytest.raises(ValueError, match="lie in"):
        stats.holm([0.2, 1.5])


# ----------------------------------------------------------------------------- correlations

def test_spearman_on_monotone_data():
    x = np.linspace(0.1, 5, 20)
    est = stats.spearman_ci(x, np.exp(x), n_boot=1000, seed=0)  # monotone but far from linear
    assert est.value == pytest.approx(1.0)
    assert est.contains(1.0) and est.ci_low == pytest.approx(1.0)
    assert est.p_value < 1e-6


def test_spearman_on_independent_data_is_near_zero():
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=300), rng.normal(size=300)
    est = stats.spearman_ci(x, y, n_boot=1000, seed=0)
    assert est.value == pytest.approx(sps.spearmanr(x, y).statistic)
    assert abs(est.value) < 0.15 and est.contains(0.0)
    assert est.p_value > 0.01


def test_pearson_fisher_z_by_hand():
    rng = np.random.default_rng(12)
    x = rng.normal(size=50)
    y = 0.6 * x + rng.normal(size=50)
    est = stats.pearson_ci(x, y, alpha=0.05)
    r = np.corrcoef(x, y)[0, 1]
    half = 1.959963984540054 / math.sqrt(50 - 3)
    assert est.value == pytest.approx(r)
    assert est.ci_low == pytest.approx(math.tanh(math.atanh(r) - half))
    assert est.ci_high == pytest.approx(math.tanh(math.atanh(r) + half))
    assert est.p_value == pytest.approx(sps.pearsonr(x, y).pvalue)


def test_constant_input_is_degenerate():
    with pytest.raises(stats.DegenerateDataError, match="constant"):
        stats.spearman_ci(np.ones(10), np.arange(10.0))


# ----------------------------------------------------------------------------- effect sizes

def test_auc_equals_mann_whitney_u_over_n1_n2():
    rng = np.random.default_rng(13)
    pos = rng.integers(0, 6, size=17).astype(float) + 1  # integers: plenty of ties
    neg = rng.integers(0, 6, size=23).astype(float)
    est = stats.roc_auc(pos, neg, n_boot=1000, seed=0)
    u = sps.mannwhitneyu(pos, neg).statistic
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert est.value == pytest.approx(u / (17 * 23))
    assert est.value == pytest.approx(pairs / (17 * 23))
    assert est.ci_low <= est.value <= est.ci_high
    assert stats.rank_biserial(pos, neg, n_boot=1000, seed=0).value == pytest.approx(2 * est.value - 1)


def test_cohens_d_and_dz_by_hand():
    x = np.array([2.0, 4.0, 6.0, 8.0])
    y = np.array([1.0, 2.0, 3.0, 5.0])
    pooled = math.sqrt((3 * x.var(ddof=1) + 3 * y.var(ddof=1)) / 6)
    d = stats.cohens_d(x, y)
    assert d.value == pytest.approx((x.mean() - y.mean()) / pooled)
    assert d.p_value == pytest.approx(sps.ttest_ind(x, y).pvalue)
    dz = stats.cohens_dz(x, y)
    assert dz.value == pytest.approx((x - y).mean() / (x - y).std(ddof=1))
    assert dz.p_value == pytest.approx(sps.ttest_rel(x, y).pvalue)
    assert dz.ci_low < dz.value < dz.ci_high


# ----------------------------------------------------------------------------- too little data

@pytest.mark.parametrize(("call", "name"), [
    (lambda: stats.spearman_ci([1.0, 2.0], [2.0, 1.0]), "spearman_ci"),
    (lambda: stats.pearson_ci([1.0, 2.0, 3.0], [2.0, 1.0, 3.0]), "pearson_ci"),
    (lambda: stats.bootstrap_ci([1.0]), "bootstrap"),
    (lambda: stats.mean_ci([]), "mean_ci"),
    (lambda: stats.proportion_ci(0, 0), "proportion_ci"),
    (lambda: stats.paired_permutation_test([1.0], [0.0]), "paired_permutation_test"),
    (lambda: stats.mcnemar([], []), "mcnemar"),
    (lambda: stats.roc_auc([1.0], [0.0, 0.5]), "roc_auc"),
    (lambda: stats.cohens_dz([1.0], [0.0]), "cohens_dz"),
    (lambda: stats.benjamini_hochberg([]), "benjamini_hochberg"),
])
def test_too_little_data_is_a_clear_error(call, name):
    with pytest.raises(stats.InsufficientDataError) as info:
        call()
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert name in message and "add" in message and "at least" in message
    assert info.value.n < info.value.minimum


def test_estimate_is_frozen_and_json_safe():
    est = stats.Estimate(value=float("nan"), ci_low=0.0, ci_high=1.0, method="m", n=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        est.value = 1.0  # type: ignore[misc]
    out = json.loads(json.dumps(est.to_dict(), allow_nan=False))
    assert out["value"] is None and out["ci_high"] == 1.0
    with pytest.raises(ValueError, match="ci_low"):
        stats.Estimate(value=0.5, ci_low=1.0, ci_high=0.0, method="m", n=3)
    with pytest.raises(TypeError):
        stats.Estimate(0.5, 0.0, 1.0, "m", 3)  # type: ignore[misc]  keyword-only
