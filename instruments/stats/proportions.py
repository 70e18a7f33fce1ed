"""Proportions with their intervals: k successes of n (Wilson, Clopper-Pearson), and the AUC,
P(score_pos > score_neg), with its rank-biserial form.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as sps

from instruments.stats.intervals import Estimate, Items, _as_1d, _bca_bounds, _estimate, _leave_one_out, _require


def proportion_ci(k: int, n: int, alpha: float = 0.05, *, method: str = "wilson") -> Estimate:
    """k successes of n with the Wilson score interval (good coverage even at 0/n and n/n).

    ``method="beta"`` gives the exact Clopper-Pearson interval, never below its nominal
    coverage: what a false-positive rate is bounded with.
    """
    from statsmodels.stats.proportion import proportion_confint

    _require("proportion_ci", int(n), 1, "trials")
    if not 0 <= k <= n:
        raise ValueError(f"proportion_ci: need 0 <= k <= n, got k={k}, n={n}")
    if method not in ("wilson", "beta"):
        raise ValueError(f"proportion_ci: method must be 'wilson' or 'beta' (Clopper-Pearson), got {method!r}")
    low, high = proportion_confint(int(k), int(n), alpha=alpha, method=method)
    return _estimate(k / n, float(low), float(high), method="clopper-pearson" if method == "beta" else method,
                     n=int(n), alpha=alpha)


def _auc_rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUC of each row pair, from ranks: (rank sum of pos - n1 (n1 + 1) / 2) / (n1 n2)."""
    n1, n2 = pos.shape[-1], neg.shape[-1]
    ranks = sps.rankdata(np.concatenate([pos, neg], axis=-1), axis=-1)
    return (ranks[..., :n1].sum(-1) - n1 * (n1 + 1) / 2) / (n1 * n2)


def roc_auc(scores_pos: Items, scores_neg: Items, *, n_boot: int = 2000, seed: int = 0,
            alpha: float = 0.05) -> Estimate:
    """P(score_pos > score_neg) + 0.5 P(tie): the Mann-Whitney U of pos over n1 n2.

    CI: BCa bootstrap, resampling each group separately (stratified, so each resample keeps
    n1 positives and n2 negatives); the acceleration comes from the jackknife over all
    n1 + n2 items. p-value: the two-sided Mann-Whitney U test (AUC = 0.5).
    """
    pos, neg = _as_1d("scores_pos", scores_pos), _as_1d("scores_neg", scores_neg)
    _require("roc_auc", min(pos.size, neg.size), 2, "items per group")
    auc = float(_auc_rows(pos, neg))
    rng = np.random.default_rng(seed)
    boot = _auc_rows(pos[rng.integers(0, pos.size, (n_boot, pos.size))],
                     neg[rng.integers(0, neg.size, (n_boot, neg.size))])
    # jackknife over all n1 + n2 items: leave out one positive, then one negative, at a time
    jack_pos = _auc_rows(pos[_leave_one_out(pos.size)], np.broadcast_to(neg, (pos.size, neg.size)))
    jack_neg = _auc_rows(np.broadcast_to(pos, (neg.size, pos.size)), neg[_leave_one_out(neg.size)])
    low, high = _bca_bounds(auc, boot, np.concatenate([jack_pos, jack_neg]), alpha)
    p = float(sps.mannwhitneyu(pos, neg, alternative="two-sided").pvalue)
    return _estimate(auc, low, high, method=f"auc, stratified bootstrap-bca (B={n_boot})",
                     n=pos.size + neg.size, alpha=alpha, p_value=p)


def rank_biserial(scores_pos: Items, scores_neg: Items, *, n_boot: int = 2000, seed: int = 0,
                  alpha: float = 0.05) -> Estimate:
    """Rank-biserial correlation 2 AUC - 1 (in [-1, 1]; 0 = no separation), CI mapped from the AUC's."""
    auc = roc_auc(scores_pos, scores_neg, n_boot=n_boot, seed=seed, alpha=alpha)
    return _estimate(2 * auc.value - 1, 2 * auc.ci_low - 1, 2 * auc.ci_high - 1,
                     method=f"rank-biserial from {auc.method}", n=auc.n, alpha=alpha, p_value=auc.p_value)
