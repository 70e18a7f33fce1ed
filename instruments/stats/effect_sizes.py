"""Correlations and standardised mean differences, each with its CI and p-value: Pearson r
(Fisher z), Spearman rho (percentile bootstrap), Cohen's d and d_z (Hedges & Olkin 1985).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from instruments.stats.intervals import (DegenerateDataError, Estimate, Items, PairedItems, _as_1d, _estimate, _paired,
                                         _require, _z, bootstrap_ci)


# ----------------------------------------------------------------------------- correlations

def _check_variation(statistic: str, **arrays: np.ndarray) -> None:
    for name, arr in arrays.items():
        if np.ptp(arr) == 0:
            raise DegenerateDataError(f"{statistic}: {name} is constant, so the correlation is undefined")


def pearson_ci(x: PairedItems, y: PairedItems, *, alpha: float = 0.05) -> Estimate:
    """Pearson r with the Fisher-z CI (atanh r ~ Normal(atanh rho, 1/(n-3))); scipy's p-value."""
    a, b = _paired("pearson_ci", x, y, 4)  # the Fisher-z standard error needs n - 3 > 0
    _check_variation("pearson_ci", x=a, y=b)
    r, p = sps.pearsonr(a, b)
    half = _z(alpha) / math.sqrt(a.size - 3)
    with np.errstate(divide="ignore"):
        z = np.arctanh(np.clip(r, -1.0, 1.0))
    return _estimate(r, np.tanh(z - half), np.tanh(z + half), method="pearson, fisher-z", n=a.size, alpha=alpha,
                     p_value=float(p))


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair: Pearson r of average ranks (ties as scipy treats them)."""
    ra = sps.rankdata(a, axis=-1)
    rb = sps.rankdata(b, axis=-1)
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(-1) / np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1))


def spearman_ci(x: PairedItems, y: PairedItems, *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> Estimate:
    """Spearman rho with a percentile bootstrap CI over items, and scipy's p-value.

    Percentile rather than BCa: resampling duplicates items, so many resamples are full of
    ties, and the jackknife acceleration of a rank statistic is then erratic; the percentile
    interval is the usual choice here (and is exact-range: it never leaves [-1, 1]).
    """
    a, b = _paired("spearman_ci", x, y, 3)
    _check_variation("spearman_ci", x=a, y=b)
    rho, p = sps.spearmanr(a, b)
    est = bootstrap_ci((a, b), _spearman_rows, n_boot=n_boot, alpha=alpha, seed=seed, method="percentile",
                       name="spearman_ci")
    return _estimate(rho, est.ci_low, est.ci_high, method=f"spearman, {est.method}",
                     n=a.size, alpha=alpha, p_value=float(p))


# ----------------------------------------------------------------------------- effect sizes

def cohens_d(x: Items, y: Items, *, alpha: float = 0.05) -> Estimate:
    """Standardised mean difference of independent groups, (mean x - mean y) / pooled SD.

    CI from the large-sample variance of d (Hedges & Olkin 1985):
    var(d) = (n1 + n2) / (n1 n2) + d**2 / (2 (n1 + n2)). p-value: Student's t test (the
    same pooled-variance model as d).
    """
    a, b = _as_1d("x", x), _as_1d("y", y)
    _require("cohens_d", min(a.size, b.size), 2, "items per group")
    n1, n2 = a.size, b.size
    pooled = math.sqrt(((n1 - 1) * a.var(ddof=1) + (n2 - 1) * b.var(ddof=1)) / (n1 + n2 - 2))
    if pooled == 0:
        raise DegenerateDataError("cohens_d: both groups are constant, so the pooled SD is 0")
    d = (a.mean() - b.mean()) / pooled
    se = math.sqrt((n1 + n2) / (n1 * n2) + d ** 2 / (2 * (n1 + n2)))
    half = _z(alpha) * se
    p = float(sps.ttest_ind(a, b, equal_var=True).pvalue)
    return _estimate(d, d - half, d + half, method="cohen's d, hedges-olkin normal CI", n=n1 + n2, alpha=alpha,
                     p_value=p)


def cohens_dz(x: PairedItems, y: PairedItems, *, alpha: float = 0.05) -> Estimate:
    """Paired effect size: mean(x - y) / SD(x - y).

    CI from var(dz) = 1/n + dz**2 / (2n) (the paired analogue of Hedges & Olkin); p-value:
    the paired t test.
    """
    a, b = _paired("cohens_dz", x, y, 2)
    d = a - b
    sd = d.std(ddof=1)
    if sd == 0:
        raise DegenerateDataError("cohens_dz: every paired difference is the same, so SD(x - y) is 0")
    dz = d.mean() / sd
    n = d.size
    half = _z(alpha) * math.sqrt(1 / n + dz ** 2 / (2 * n))
    p = float(sps.ttest_rel(a, b).pvalue)
    return _estimate(dz, dz - half, dz + half, method="cohen's dz, normal CI", n=n, alpha=alpha, p_value=p)
